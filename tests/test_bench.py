"""The benchmarks (wetok.bench) on the CPU: the training step (tiny model, 32^2, 2 steps), runs
side by side, entropy gradients, evaluation, the memory table, the shared OOM test."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wetok.bench import train_step as bench

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--device", "cpu", "--image-size", "32", "--batch-size", "2", "--warmup", "1",
        "--steps", "2", "--modes", "eager", "--eval-warmup", "1", "--eval-steps", "2",
        "--overrides", "model=tiny", "eval.batch_size=2", "eval.metrics=[psnr,ssim]"]


def _table_row(table: str, mode: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == mode:
            return cells
    raise AssertionError(f"no row {mode!r} in\n{table}")


def test_train_step_benchmark_cpu(tmp_path, capsys):
    out_csv, out_json = tmp_path / "bench.csv", tmp_path / "bench.json"
    result = bench.run(bench.parse_args([*TINY, "--csv", str(out_csv), "--json", str(out_json)]))

    text = capsys.readouterr().out
    assert "| mode | ms/step (median) | img/s | peak GiB | compile s | TFLOP/step | TFLOP/s |" in text
    assert "318 ms/step = 50 img/s, peak 50.7 GiB" in text
    assert "RANDOM VGG16 trunk" in text or "pretrained VGG16 trunk" in text
    assert not re.search(r"lpips[^\n]*=\s*[0-9]", text, re.I)  # never an LPIPS value

    (row,) = result["rows"]
    assert row["mode"] == "eager" and row["status"] == "ok", row
    assert row["loss_finite"]
    assert len(row["times_ms"]) == 2 and all(t > 0 for t in row["times_ms"])
    assert row["ms_median"] > 0 and row["img_s"] == pytest.approx(2e3 / row["ms_median"])
    assert row["tflop_step"] > 0 and row["tflop_s"] > 0
    assert row["peak_gib"] is None  # no GPU counter on the CPU

    cells = _table_row(result["table"], "eager")
    ms, img_s, tflop = float(cells[1]), float(cells[2]), float(cells[5])
    assert ms > 0 and img_s > 0 and tflop > 0
    assert img_s == pytest.approx(row["img_s"], abs=0.06)

    evals = result["eval"]
    assert [e["status"] for e in evals] == ["ok", "ok"], evals
    assert all(e["img_s"] > 0 for e in evals)
    assert "eval: EMA encode+decode" in text

    with open(out_csv) as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["mode"] == "eager" and rows[0]["status"] == "ok"
    assert float(rows[0]["ms_median"]) > 0 and float(rows[0]["img_s"]) > 0
    assert len(rows) == 3  # eager + two eval rows
    saved = json.loads(out_json.read_text())
    assert saved["train"][0]["status"] == "ok" and saved["info"]["model"] == "tiny"


def test_failed_mode_is_reported_not_hidden(tmp_path, capsys):
    """A mode that cannot run is a row with its error status and a non-zero exit code."""
    args = [*TINY[:-3], "model=tiny", "model.channels=48", "--eval-steps", "0",
            "--csv", str(tmp_path / "bad.csv")]
    # channels=48 is not a multiple of 32: config validation fails inside the mode
    assert bench.main(args) == 1
    (row,) = list(csv.DictReader(open(tmp_path / "bad.csv")))
    assert row["status"].startswith("error") and row["ms_median"] == ""
    assert "| eager | error" in capsys.readouterr().out


def test_profile_names_copy_sites(tmp_path, capsys):
    """--profile prints the heaviest ops, then aten::copy_ by input shape and by call site (the
    ops around each copy, e.g. Adam's dtype casts on the CPU)."""
    args = [*TINY, "--eval-steps", "0", "--no-flops", "--profile", "1"]
    (row,) = bench.run(bench.parse_args(args))["rows"]
    text = row["profile"]
    assert "aten::copy_ by input shape:" in text and "aten::copy_ by call site:" in text
    sites = text.split("aten::copy_ by call site:")[1].strip().splitlines()
    assert sites and all(re.match(r"\s*[0-9.]+ ms\s+x\d+\s+\S.* @ ", s) for s in sites), sites
    assert "[eager] profile of 1 steps" in capsys.readouterr().out


def test_side_by_side_runs_real_training_processes(tmp_path, capsys):
    """Two real `python -m wetok.train` processes side by side (tiny, CPU): img/s per run."""
    from wetok.bench import side_by_side

    side_by_side.main(["--device", "cpu", "--settings", "tiny", "--runs", "2", "--steps", "6",
                       "--log-every", "2", "--eval-every", "4", "--keep", str(tmp_path),
                       "--json", str(tmp_path / "rows.json"),
                       "--overrides", "eval.num_images=4", "eval.batch_size=4"])
    text = capsys.readouterr().out
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["runs"] == 2 and row["codes"] == [0, 0] and len(row["per_run"]) == 2
    assert all(r["steady_img_s"] > 0 and r["wall_img_s"] > 0 for r in row["per_run"])
    assert all(r["eval_s"] > 0 for r in row["per_run"])  # the step-4 evaluation was timed
    assert "train.cpu_threads" not in " ".join(row["overrides"])  # variant auto: the defaults
    assert re.search(r"\| tiny \| auto \| 2 \| [0-9.]+ \([0-9]+, [0-9]+\) \| - \|", text), text


def test_entropy_gradients_reductions_differ_by_g(capsys):
    from wetok.bench import entropy_gradients

    args = ["--image-size", "32", "--batch-size", "2", "--groups", "1", "4", "16",
            "--overrides", "model=tiny"]
    entropy_gradients.main(args)
    text = capsys.readouterr().out
    rows, factor = entropy_gradients.measure(entropy_gradients.argparse.Namespace(
        d=16, groups=[1, 4, 16], modes=["grouped", "pooled"], image_size=32, batch_size=2,
        overrides=["model=tiny"]))
    by = {(r["g"], r["mode"], r["reduction"]): r for r in rows}
    for g in (1, 4, 16):
        for mode in ("grouped", "pooled"):
            s, m = by[g, mode, "sum"], by[g, mode, "mean"]
            assert s["grad_token"] == pytest.approx(g * m["grad_token"], rel=1e-4)
            assert s["grad_codebook"] == pytest.approx(g * m["grad_codebook"], rel=1e-4)
            assert s["ratio"] > 0 and s["grad_l1"] == m["grad_l1"] > 0
    assert factor["sum"] == pytest.approx(4 * factor["mean"], rel=1e-5)
    assert "| 16 | 1 | pooled | mean |" in text and "factor 4.0000" in text


def test_evaluation_benchmark_cpu(tmp_path, capsys):
    """wetok.bench.evaluate: parts, loader, whole evaluation at two sizes, implied 50k time."""
    from wetok.bench import evaluate as bench_eval

    args = ["--device", "cpu", "--images", "4", "8", "--steps", "1", "--warmup", "1",
            "--json", str(tmp_path / "eval.json"), "--overrides", "model=tiny",
            "data.image_size=32", "eval.batch_size=2", "eval.num_workers=0",
            "eval.metrics=[psnr,ssim]"]
    result = bench_eval.run(bench_eval.parse_args(args))
    text = capsys.readouterr().out
    assert "| part | ms/batch | img/s | share of EvalPass.step |" in text  # no steady rate
    once = result["info"]["one_time"]
    assert once["eval_pass_s"] > 0 and once["first_step_s"] > 0
    assert "once per process: metric networks built in" in text
    assert re.search(r"Inductor cache \S+ \((empty|filled) before\)", text)
    parts = {p["part"]: p for p in result["parts"]}
    assert {"model: encode + decode", "PSNR + SSIM", "EvalPass.step (all of it)"} <= set(parts)
    assert all(p["img_s"] > 0 for p in parts.values())
    assert [(w["pass"], w["images"]) for w in result["whole"]] == [
        ("first", 4), ("first", 8), ("cached", 4), ("cached", 8)]
    assert all(w["metrics"] == ["psnr", "ssim"] and w["peak_gib"] is None for w in result["whole"])
    steps = ("setup_s", "first_batch_s", "first_step_s", "batches_s", "result_s")
    for w in result["whole"]:  # evaluate_model's timings: its whole wall time, split in five
        assert min(w[k] for k in steps) >= 0 and 0 <= w["loader_wait_s"] <= w["batches_s"]
        assert sum(w[k] for k in steps) == pytest.approx(w["wall_s"], abs=0.25)
    assert all(w["gpu_idle_s"] is None for w in result["whole"])  # a CPU: no device timeline
    assert "| batches s | of which loader wait s | GPU idle s | result s |" in text
    # 4 and 8 images are 2 batches apart: too close for a rate, and said so
    assert result["first"]["steady_img_s"] is None is result["cached"]["implied_50k_s"]
    assert "later passes (baselines and references' statistics cached): no steady rate: the " \
           "sizes 4 and 8 are 2 batches apart (a rate needs 20)" in text
    assert json.loads((tmp_path / "eval.json").read_text())["parts"]


def test_evaluation_benchmark_parts_only(capsys):
    """--parts-only: the parts and the loader, no whole evaluation (and it says so); the
    process runs with train.cpu_threads torch threads."""
    from wetok.bench import evaluate as bench_eval

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        result = bench_eval.run(bench_eval.parse_args([
            "--device", "cpu", "--images", "4", "8", "--steps", "1", "--warmup", "1",
            "--parts-only", "--overrides", "model=tiny", "data.image_size=32",
            "eval.batch_size=2", "eval.num_workers=0", "eval.metrics=[psnr,ssim]",
            "train.cpu_threads=1"]))
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert "torch CPU threads 1 (train.cpu_threads)" in text  # the setting reached the process
    assert result["whole"] == [] and "EvalPass.step (all of it)" in text
    assert "| whole evaluation |" not in text and "no steady rate: not run (--parts-only)" in text


def test_evaluation_benchmark_steady_rate_between_two_sizes():
    """The rate is the larger size's extra images over its extra time; start-up what is left."""
    from wetok.bench.evaluate import steady

    got = steady({"images": 1024, "wall_s": 10.0}, {"images": 50000, "wall_s": 130.0}, 64)
    assert got["steady_img_s"] == pytest.approx(48976 / 120)
    assert got["startup_s"] == pytest.approx(10 - 1024 * 120 / 48976)
    assert got["implied_50k_s"] == pytest.approx(got["startup_s"] + 50000 * 120 / 48976)
    close = steady({"images": 1024, "wall_s": 10.0}, {"images": 2048, "wall_s": 11.0}, 64)
    assert close["steady_img_s"] is None and "16 batches apart" in close["why_none"]


def test_evaluation_benchmark_folders_hold_exactly_each_size(tmp_path):
    """Each timed size reads a folder of exactly that many images (no loader cut short)."""
    from wetok.bench.evaluate import write_folders
    from wetok.data.imagefolder import list_images

    folders = write_folders(tmp_path, [3, 5])
    assert sorted(folders) == [3, 5]
    for n, root in folders.items():
        val = list_images(root / "val")
        assert len(val) == n and [Path(p).name for p in val] == [f"{i:06d}.jpg" for i in range(n)]
        assert len(list_images(root / "train")) == 1


def test_out_of_memory_is_told_from_other_errors(capsys):
    """One test for every benchmark: torch's and Python's out-of-memory errors and the CPU
    allocator's message are OOM; any other error is "error: <type>" with its traceback."""
    from wetok.bench.common import failure, is_oom

    assert is_oom(torch.OutOfMemoryError("CUDA out of memory")) and is_oom(MemoryError())
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert not is_oom(RuntimeError("shape mismatch")) and not is_oom(ValueError("memory"))
    try:
        raise KeyError("x")
    except KeyError as exc:
        assert failure(exc) == "error: KeyError"
    assert "KeyError" in capsys.readouterr().err


def test_memory_table_lives_in_bench_and_runs_as_wetok_memory(tmp_path, capsys):
    """Paper Table 1: wetok.bench.memory measures and writes; `python -m wetok.memory` is its
    Hydra entry on conf/memory.yaml (CPU: the quantizer's own tensor memory)."""
    from hydra import compose, initialize_config_dir

    from wetok import memory as entry
    from wetok.bench import memory as table

    assert entry.report is table.report
    assert table.quantizer_settings("gq", 12, 8) is None
    assert table.quantizer_settings("bsq", 8, 8)["groups"] == 8
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("memory", overrides=["dims=[8,16]", "methods=[lfq_naive,gq]",
                                           "device=cpu", f"run_dir={tmp_path / 'direct'}"])
    table.report(cfg)
    rows = list(csv.DictReader(open(tmp_path / "direct" / "memory.csv")))
    assert [(r["method"], r["d"], r["status"]) for r in rows] == [
        ("lfq_naive", "8", "ok"), ("lfq_naive", "16", "ok"), ("gq", "8", "ok"), ("gq", "16", "ok")]
    assert float(rows[1]["peak_gib"]) > float(rows[3]["peak_gib"]) > 0  # 2^16 vs 2 x 2^8 codes
    assert "| method | d = 8 | d = 16 |" in capsys.readouterr().out

    out = subprocess.run([sys.executable, "-m", "wetok.memory", "dims=[8]", "methods=[gq]",
                          f"hydra.run.dir={tmp_path / 'cli'}"], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "cli" / "memory.md").read_text().startswith("| method | d = 8 |")
