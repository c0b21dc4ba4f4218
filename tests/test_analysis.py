"""analysis/: records -> DataFrames -> figures/tables (from the registry), the CLI, and the
notebooks executed by notebook_view.py.

Synthetic run folders come from tests/fixtures_records.py (same layout as wetok/record_writer.py).
All seven notebooks run in one kernel (render_notebooks), so the module takes ~20-30 s.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_records as fx  # noqa: E402

from analysis import notebook_view, paper, render, spread, tables, wandb_reader  # noqa: E402
from analysis import record_reader as reader  # noqa: E402
from analysis.registry import FIGURES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("records")
    fx.make_all(path)
    return path


# ----------------------------------------------------------------------------- records
def test_labels_tell_entropy_reductions_apart():
    runs = pd.DataFrame({"run": ["a", "b"], "choice.quantizer": ["gq", "gq"],
                         "quantizer.groups": [4, 4], "quantizer.entropy_reduction": ["mean", "sum"]})
    assert list(tables.setting_labels(runs)) == ["H over g=mean", "H over g=sum"]


def test_load_runs_fig3(root):
    runs = reader.load_runs(root / "fig3_quantizer")
    assert len(runs) == 9  # 3 settings x 3 seeds
    for col in ("run", "path", "name", "sweep", "stage", "status", "steps", "wall_time_s",
                "peak_mem_gib", "choice.quantizer", "choice.model", "quantizer.groups",
                "quantizer.group_dim", "model.channels", "train.steps", "final.val_loss",
                "final.lpips", "final.ssim", "final.psnr", "final.usage", "final.joint_codes",
                "skipped", "counts.bad_images", "setting", "baseline.mean_colour.psnr",
                "baseline.avg_pool.ssim"):
        assert col in runs.columns, col
    assert "final.rfid" not in runs.columns  # skipped in these runs
    gq = runs[runs["seed"] == 0].set_index("choice.quantizer").loc["gq"]
    assert gq["run"] == "quantizer=gq,seed=0"
    assert gq["baseline.mean_colour.psnr"] == fx.BASELINES["mean_colour"]["psnr"]
    assert runs["setting"].nunique() == 3  # the seeds of a setting share it
    assert (gq["quantizer.groups"], gq["quantizer.group_dim"]) == (2, 8)
    assert gq["final.psnr"] == pytest.approx(fx.FINAL[("fig3_quantizer", "quantizer=gq,seed=0")]["psnr"])
    assert gq["sweep"] == "fig3_quantizer" and gq["status"] == "finished" and gq["steps"] == 40
    assert gq["skipped"] == {"rfid": "no Inception weights (offline)"}
    assert gq["model.channel_mult"] == (1, 2, 2)  # lists become tuples (hashable)
    assert set(runs["choice.quantizer"]) == {"lfq", "bsq", "gq"}
    assert (runs["final_from"] == "summary").all()


def test_load_runs_tolerates_live_and_broken_runs(root, tmp_path):
    runs = reader.load_runs(root / "fig4_groups")
    assert len(runs) == 4  # found two levels down
    live = runs.set_index("quantizer.groups").loc[8]
    assert live["status"] == "running" and live["final_from"] == "history"
    assert live["steps"] == 20  # no steps in summary: last val step
    summary = root / "fig4_groups" / "multirun" / "quantizer.groups=8" / "summary.json"
    copy = tmp_path / "copy" / "g8"
    copy.mkdir(parents=True)
    (copy / "metrics.jsonl").write_text((summary.parent / "metrics.jsonl").read_text())
    (copy / "summary.json").write_text(json.dumps({**json.loads(summary.read_text()), "steps": 10}))
    assert reader.load_runs(tmp_path / "copy").iloc[0]["steps"] == 20  # a checkpoint's 10: stale
    assert live["final.psnr"] == pytest.approx(fx.FINAL[("fig4_groups", "quantizer.groups=8")]
                                               ["psnr"])
    # unreadable summary: skipped with a warning, not a crash
    bad = tmp_path / "sweep" / "bad"
    bad.mkdir(parents=True)
    (bad / "summary.json").write_text('{"name": ')
    fx.write_run(tmp_path / "sweep" / "good", sweep="x", write_final=False, status="failed")
    with pytest.warns(UserWarning, match="unreadable"):
        runs = reader.load_runs(tmp_path / "sweep")
    assert list(runs["run"]) == ["good"] and runs.loc[0, "status"] == "failed"
    # a run folder given directly; an empty folder
    assert reader.load_runs(tmp_path / "sweep" / "good").loc[0, "run"] == "good"
    (tmp_path / "empty").mkdir()
    empty = reader.load_runs(tmp_path / "empty")
    assert empty.empty and "run" in empty.columns
    assert reader.load_history(tmp_path / "empty").empty
    with pytest.raises(FileNotFoundError):
        reader.load_runs(tmp_path / "nowhere")


def test_list_valued_metrics_are_kept(tmp_path):
    run = tmp_path / "r"
    fx.write_run(run, sweep="x", extra={"final": {"psnr": 20.0, "usage_per_group": [0.5, 0.6]}})
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 50, "time_s": 1.0, "split": "val", "psnr": 20.0,
                            "usage_per_group": [0.5, 0.6]}) + "\n")
    runs = reader.load_runs(run)
    assert runs.loc[0, "final.usage_per_group"] == (0.5, 0.6)
    assert runs.loc[0, "final.psnr"] == 20.0
    hist = reader.load_history(run)
    assert hist["usage_per_group"].iloc[-1] == (0.5, 0.6) and hist["psnr"].dtype == float
    assert "PSNR ↑" in tables.final_table(runs)[0].columns


def test_load_history_wide_and_deduplicated(root, tmp_path):
    hist = reader.load_history(root / "fig3_quantizer")
    assert {"run", "split", "step", "time_s", "loss", "val_loss", "psnr"} <= set(hist.columns)
    assert set(hist["split"]) == {"train", "val"}
    gq_val = hist[(hist["run"] == "quantizer=gq,seed=0") & (hist["split"] == "val")]
    assert list(gq_val["step"]) == [20, 40]
    assert gq_val["psnr"].iloc[-1] == pytest.approx(fx.FINAL[("fig3_quantizer", "quantizer=gq,seed=0")]
                                                    ["psnr"])
    assert hist["rfid"].isna().all() if "rfid" in hist.columns else True
    # a resumed run logs step 40 again: the last row wins; truncated tail ignored
    run = tmp_path / "r"
    fx.write_run(run, sweep="x", truncated_tail=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 40, "time_s": 1.0, "split": "val", "psnr": 99.0}) + "\n")
        f.write('{"step": 50, "spl')
    hist = reader.load_history(run)
    val40 = hist[(hist["split"] == "val") & (hist["step"] == 40)]
    assert len(val40) == 1 and val40["psnr"].iloc[0] == 99.0
    assert reader.load_history(root, runs=["fig3_quantizer/quantizer=gq,seed=0"])["run"].nunique() == 1


def test_load_memory(root, tmp_path):
    mem = reader.load_memory(root / "tab1_memory")  # folder: finds memory.csv
    assert list(mem.columns[:7]) == list(reader.MEMORY_COLUMNS)
    oom = mem[(mem["method"] == "lfq_naive") & (mem["d"] == 24)].iloc[0]
    assert oom["status"] == "OOM" and math.isnan(oom["peak_gib"])
    assert mem.loc[mem["method"] == "gq", "d_prime"].tolist()[:3] == [8, 8, 8]
    assert mem.loc[mem["method"] == "gq", "d_prime"].isna().tolist() == [False] * 3 + [True]
    table = paper.memory_table(mem)
    assert list(table.columns) == ["d = 8", "d = 12", "d = 16", "d = 24"]
    assert table.loc["LFQ (naive entropy)", "d = 24"] == "OOM"
    assert table.loc["LFQ (exact entropy)", "d = 24"] == "10.51 GiB"
    assert table.loc["GQ", "d = 16"] == "10.58 GiB" and table.loc["GQ", "d = 12"] == "n/a"
    assert table.loc["BSQ", "d = 12"] == "—"  # not measured
    bad = tmp_path / "memory.csv"
    bad.write_text("method,d,peak\nLFQ,8,1.0\n")
    with pytest.raises(ValueError, match="lacks columns"):
        reader.load_memory(bad)


def test_select_sweep(root):
    runs = reader.load_runs(root)
    assert set(reader.select_sweep(runs, "fig5_architecture")["sweep"]) == {"fig5_architecture"}
    assert len(reader.select_sweep(runs, "no_such_sweep")) == len(runs)  # nothing matches: all


# ----------------------------------------------------------------------------- W&B
def test_load_wandb_without_key_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(RuntimeError, match="W&B API key"):
        wandb_reader.load_wandb("me", "wetok", "fig3_quantizer")


def test_load_wandb_column_mapping():
    run = types.SimpleNamespace(
        name="quantizer=gq", url="https://wandb.ai/me/wetok/runs/abc", group="fig3_quantizer",
        job_type="stage1", state="finished", tags=["quantizer:gq", "model:tiny", "smoke"],
        config={"quantizer.groups": 2, "model.channel_mult": [1, 2], "name": "fig3_quantizer",
                "_wandb": {}},
        summary={"psnr": 21.5, "val/ssim": 0.61, "_step": 300, "_runtime": 42.0,
                 "peak_mem_gib": {"max": 3.25}, "baselines/mean_colour/psnr": 15.8,
                 "baselines/avg_pool/ssim": 0.39})

    class FakeApi:
        def runs(self, path, filters=None):
            assert path == "me/wetok" and filters == {"group": "fig3_quantizer"}
            return [run]

    df = wandb_reader.load_wandb("me", "wetok", "fig3_quantizer", api=FakeApi())
    row = df.iloc[0]
    assert row["run"] == "quantizer=gq" and row["sweep"] == "fig3_quantizer"
    assert row["stage"] == 1 and row["steps"] == 300 and row["wall_time_s"] == 42.0
    assert row["peak_mem_gib"] == 3.25 and row["choice.quantizer"] == "gq"
    assert row["quantizer.groups"] == 2 and row["model.channel_mult"] == (1, 2)
    assert row["final.psnr"] == 21.5 and row["final.ssim"] == 0.61
    assert "_wandb" not in df.columns and "final.rfid" not in df.columns
    assert row["baseline.mean_colour.psnr"] == 15.8 and row["baseline.avg_pool.ssim"] == 0.39


# ----------------------------------------------------------------------------- figures
def test_missing_metrics_are_omitted(root, tmp_path):
    runs = reader.load_runs(root / "fig3_quantizer")
    hist = reader.load_history(root / "fig3_quantizer")
    report = paper.REPORTS["fig3_quantizer"](runs, hist, tmp_path / "out")
    md = (tmp_path / "out" / "fig3_quantizer.md").read_text()
    assert "rFID ↓" not in md and "Omitted" in md and "no Inception weights" in md
    assert (tmp_path / "out" / "fig3_quantizer_curves.png").stat().st_size > 1000
    # nothing at all: no final values, no history -> no plots, no crash
    bare = runs.drop(columns=[c for c in runs.columns if c.startswith("final.")])
    report = paper.REPORTS["fig3_quantizer"](bare, hist.iloc[:0], tmp_path / "bare")
    assert [p.suffix for p in report.files] == [".md"]
    assert "Omitted" in report.markdown
    for name, fn in paper.REPORTS.items():  # empty inputs
        empty = pd.DataFrame(columns=list(reader.MEMORY_COLUMNS)) if name == "tab1_memory" \
            else reader.load_runs(tmp_path / "out")
        no_history = reader.load_history(tmp_path / "out")
        args = (empty,) if name == "tab1_memory" else (empty, no_history)
        assert fn(*args, tmp_path / "empty").files


def test_stage_table_marks(root):
    runs = reader.load_runs(root / "tab2_generative_decoder")
    table, missing = paper.stage_table(runs)
    assert missing == [] and list(table["Stage2"]) == ["✗", "✓"]
    assert "setting" not in table.columns  # both stages share one setting


# ----------------------------------------------------------------------------- registry
def test_every_figure_has_its_sweep_and_every_sweep_a_figure():
    sweeps = {p.stem: yaml.safe_load(p.read_text()) for p in (ROOT / "sweeps").glob("*.yaml")}
    for name in FIGURES:
        assert sweeps[name]["sweep"] == name, name
    for stem, sweep in sweeps.items():  # fig5_architecture_tables renders as fig5_architecture
        assert any(sweep["sweep"].startswith(name) for name in FIGURES), stem
    assert list(paper.REPORTS) == list(FIGURES)


def test_render_cli_does_not_need_the_notebooks(root, tmp_path):
    code = ("import sys; from analysis import render; "
            f"assert render.main([{str(root / 'fig4_groups')!r}, '--out', {str(tmp_path)!r}]) "
            "== 0; assert not {'nbformat', 'nbclient'} & set(sys.modules)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "fig4_groups.md").is_file()
    assert not (tmp_path / "fig4_groups.ipynb").exists()


# ----------------------------------------------------------------------------- notebooks
def test_committed_notebooks_match_generator():
    for name in FIGURES:
        path = notebook_view.NOTEBOOK_DIR / f"{name}.ipynb"
        assert path.exists(), f"missing {path}: python -m analysis.render --write-notebooks"
        committed = nbformat.read(path, as_version=4)
        nbformat.validate(committed)
        assert committed == notebook_view.build_notebook(name), f"{path} is stale: regenerate it"
        assert f'paper.report("{name}"' in "".join(c.source for c in committed.cells)


def test_detect_notebooks(root):
    for name in FIGURES:
        assert render.detect_figures(root / name) == [name]
    assert render.detect_figures(root) == list(FIGURES)


@pytest.fixture(scope="module")
def rendered(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("analysis")
    results = notebook_view.render_notebooks(list(FIGURES), root, out)
    return out, {r.name: r for r in results}


def _fin(sweep, run, metric):
    """The final value written by the fixture, formatted as the tables print it (resolved
    once the fixture folders exist)."""
    return lambda: tables.fmt(metric, fx.FINAL[(sweep, run)][metric])


EXPECTED = {  # notebook -> (files beside <name>.md, numbers the markdown must hold)
    "fig3_quantizer": (["_curves.png", "_final.png"],
                       [_fin("fig3_quantizer", "quantizer=gq,seed=1", "psnr"),
                        _fin("fig3_quantizer", "quantizer=bsq,seed=2", "ssim"),
                        _fin("fig3_quantizer", "quantizer=lfq,seed=0", "val_loss")]),
    "fig4_groups": (["_curves.png", "_final.png", "_vs_g.png"],
                    [_fin("fig4_groups", "quantizer.groups=2", "rfid"),
                     _fin("fig4_groups", "quantizer.groups=8", "psnr"), "g=8"]),
    "fig5_architecture": (["_curves.png", "_final.png", "_grid.png"],
                          [_fin("fig5_architecture", "model=c256_b4", "lpips"), "C=256, B=4"]),
    "fig6_data_schedule": (["_curves.png", "_final.png"],
                           [_fin("fig6_data_schedule",
                                 "experiment=table27_general,schedule=constant", "psnr"),
                            "| GD, constant LR |", "| ImageNet, warm-up + cosine |"]),
    "tab1_memory": ([".png"], ["| LFQ (naive entropy) | 10.51 GiB | — | 10.62 GiB | OOM |",
                               "d = 24"]),
    "tab2_generative_decoder": (["_curves.png"],
                                [_fin("tab2_generative_decoder", "stage2", "rfid"),
                                 _fin("tab2_generative_decoder", "stage1", "psnr"), "✗"]),
    "lfq_exact_d24": (["_curves.png", "_final.png", "_train.png"],
                      [_fin("lfq_exact_d24", "quantizer=lfq", "psnr"), "3.50"]),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_executes(rendered, name):
    out, results = rendered
    res = results[name]
    assert res.error is None, res.error
    suffixes, numbers = EXPECTED[name]
    for suffix in [".ipynb", ".md", *suffixes]:
        path = out / f"{name}{suffix}"
        assert path in res.files and path.stat().st_size > 0, path
    md = (out / f"{name}.md").read_text()
    assert md == res.markdown
    for number in numbers:
        number = number() if callable(number) else number
        assert number in md, (number, md)
    executed = nbformat.read(out / f"{name}.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert all(o.get("output_type") != "error" for c in executed.cells
               for o in c.get("outputs", []))


def test_cli(root, tmp_path, capsys):
    csv_file = root / "tab1_memory" / "dims=8,16,24" / "memory.csv"
    assert render.main([str(csv_file), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {tmp_path / 'tab1_memory.md'}" in printed and "| BSQ |" in printed
    assert render.main([str(tmp_path), "--list"]) == 0  # no records there
    assert "no notebook fits" in capsys.readouterr().out
    assert render.main([str(tmp_path)]) == 2
    assert "no notebook fits" in capsys.readouterr().err


# ----------------------------------------------------------------------------- seeds, baselines
def test_settings_spread_and_orderings(root):
    runs = reader.load_runs(root / "fig3_quantizer")
    labels = tables.setting_labels(runs, keys=[("choice.quantizer", "")], exclude=("seed",),
                                    unique=False)
    per = spread.settings(runs, ["psnr", "ssim", "lpips"], labels).set_index("label")
    assert list(per["n"]) == [3, 3, 3]
    psnr = [fx.FINAL[("fig3_quantizer", f"quantizer=gq,seed={s}")]["psnr"] for s in range(3)]
    assert per.loc["GQ", "psnr.mean"] == pytest.approx(sum(psnr) / 3)
    assert (per.loc["GQ", "psnr.min"], per.loc["GQ", "psnr.max"]) == (min(psnr), max(psnr))
    assert per.loc["GQ", "psnr.std"] == pytest.approx(pd.Series(psnr).std())
    pairs = {frozenset((p["better"], p["worse"])): p
             for p in spread.orderings(per.reset_index(), "psnr", lower_is_better=False)}
    assert not pairs[frozenset(("GQ", "LFQ"))]["resolved"]  # seed ranges overlap
    gq_bsq = pairs[frozenset(("GQ", "BSQ"))]
    assert gq_bsq["resolved"] and gq_bsq["better"] == "GQ" and gq_bsq["text"] == "GQ > BSQ"
    # one seed each: nothing is resolved, however far apart
    single = spread.settings(runs[runs["seed"] == 0], ["psnr"], labels[runs["seed"] == 0])
    assert not any(p["resolved"] for p in spread.orderings(single, "psnr", False))
    # lower is better: the order flips
    low = {p["text"] for p in spread.orderings(per.reset_index(), "lpips", True) if p["resolved"]}
    assert "GQ < BSQ" in low


def test_baseline_flags():
    assert spread.baseline_flag(15.0, 16.0, 19.0) == "below baseline"
    assert spread.baseline_flag(17.0, 16.0, 19.0) == "below avg pool"
    assert spread.baseline_flag(20.0, 16.0, 19.0) == "above both"
    assert spread.baseline_flag(20.0, math.nan, math.nan) == "—"  # older record


def test_fig3_report_shows_spread_baselines_and_orderings(root, tmp_path):
    runs = reader.load_runs(root / "fig3_quantizer")
    report = paper.REPORTS["fig3_quantizer"](runs, reader.load_history(root / "fig3_quantizer"),
                                             tmp_path)
    md = report.markdown
    settings = report.tables["settings"]
    settings = settings.set_index(settings["setting"].str.split(",").str[0])
    assert list(settings["seeds"]) == [3, 3, 3]
    assert " ± " in settings.loc["BSQ", "PSNR ↑"] and "[" in settings.loc["BSQ", "PSNR ↑"]
    assert settings.loc["BSQ", "vs baselines"] == "below baseline"
    assert settings.loc["GQ", "vs baselines"] == "above both"
    assert settings.loc["GQ", "mean colour PSNR"] == tables.fmt("psnr", 18.5)
    assert settings.loc["GQ", "avg pool SSIM"] == tables.fmt("ssim", 0.42)
    per_run = report.tables["final"]
    assert list(per_run["seed"][:3]) == ["0", "1", "2"] and "vs baselines" in per_run.columns
    assert (per_run["vs baselines"] == "below baseline").sum() == 3
    bsq, gq, lfq = "BSQ, g=16, d'=1", "GQ, g=2, d'=8", "LFQ, g=1, d'=16"
    assert f"PSNR ↑: resolved: {gq} > {bsq}; {lfq} > {bsq}. Unresolved: {gq} vs {lfq}." in md
    assert "No baselines" not in md


def test_records_without_baselines_show_them_missing(root, tmp_path):
    runs = reader.load_runs(root / "fig4_groups")
    assert not any(c.startswith("baseline.") for c in runs.columns)
    report = paper.REPORTS["fig4_groups"](runs, reader.load_history(root / "fig4_groups"), tmp_path)
    assert set(report.tables["final"]["mean colour PSNR"]) == {"—"}
    assert set(report.tables["final"]["vs baselines"]) == {"—"}
    assert "No baselines" in report.markdown
    assert "No ordering is resolved: every setting has one seed" in report.markdown


def test_stopped_run_takes_final_and_baselines_from_eval_json(tmp_path):
    run = tmp_path / "stopped"
    fx.write_run(run, sweep="x", status="running", write_final=False, baselines=None)
    (run / "eval.json").write_text(json.dumps({
        "checkpoint": str(run / "checkpoints" / "last.pt"), "step": 30, "weights": "ema",
        "values": {"psnr": 23.5, "ssim": 0.61}, "skipped": {},
        "baselines": {"mean_colour": {"psnr": 15.8, "ssim": 0.29},
                      "avg_pool": {"psnr": 24.0, "ssim": 0.6}}}))
    row = reader.load_runs(run).iloc[0]
    assert row["final_from"] == "eval.json" and row["steps"] == 30
    assert row["final.psnr"] == 23.5 and row["baseline.avg_pool.psnr"] == 24.0
    table, _ = tables.final_table(reader.load_runs(run))
    assert table.loc[0, "vs baselines"] == "below avg pool"
    assert "eval.json" in table.loc[0, "status"]


def test_tab2_with_seeds_groups_stages(tmp_path):
    for seed in range(2):
        s1 = tmp_path / f"seed={seed}" / "stage1"
        fx.write_run(s1, sweep="tab2_generative_decoder", q=0.5 + 0.01 * seed, stage=1,
                     params={"seed": seed})
        fx.write_run(s1.parent / "stage2", sweep="tab2_generative_decoder", q=0.7 + 0.01 * seed,
                     stage=2, params={"seed": seed, "init_from": str(s1)})
    runs = reader.load_runs(tmp_path)
    report = paper.REPORTS["tab2_generative_decoder"](runs, reader.load_history(tmp_path),
                                                      tmp_path / "o")
    assert list(report.tables["stages"]["seed"]) == ["0", "1", "0", "1"]
    assert list(report.tables["settings"]["setting"]) == ["stage 1", "stage 2"]
    assert "PSNR ↑: resolved: stage 2 > stage 1." in report.markdown
