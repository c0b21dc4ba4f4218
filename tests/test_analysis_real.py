"""Notebooks on REAL records: quick sweeps trained here through the CLI (tiny model, a few CPU
steps), then rendered top to bottom; each table must hold the runs' own numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis import notebook_view
from analysis.record_reader import load_memory, load_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data.image_size=32", "train.batch_size=2", "train.steps=2",
        "eval.num_images=4", "eval.batch_size=4", "eval.metrics=[psnr,ssim]"]


def run_cli(*args: str) -> None:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]


def summaries(sweep_dir: Path) -> dict[Path, dict]:
    return {p.parent: json.loads(p.read_text()) for p in sweep_dir.rglob("summary.json")}


@pytest.mark.parametrize("sweep, jobs, groups", [
    ("fig3_quantizer", 3, [1, 2, 16]),
    ("fig4_groups", 6, [1, 2, 4, 8, 16, 32]),
    ("tab2_generative_decoder", 2, [4, 4]),
    ("lfq_exact_d24", 2, [1, 3]),
])
def test_quick_sweep_records_render_into_the_table(tmp_path, sweep, jobs, groups):
    sweep_dir = tmp_path / sweep
    run_cli("-m", "wetok.train", "-m", f"+sweep={sweep}", *TINY, f"hydra.sweep.dir={sweep_dir}")
    found = summaries(sweep_dir)
    assert len(found) == jobs and all(s["status"] == "finished" for s in found.values())
    assert sorted(load_runs(sweep_dir)["quantizer.groups"]) == groups

    result = notebook_view.render_notebook(sweep, sweep_dir, tmp_path / "out")
    assert result.error is None, result.error
    assert any(f.suffix == ".png" and f.stat().st_size > 0 for f in result.files)
    for summary in found.values():
        psnr = f"{summary['final']['psnr']:.2f}"
        assert psnr in result.markdown, (sweep, psnr)


def test_memory_table_on_the_cpu_renders(tmp_path):
    run_cli("-m", "wetok.memory", "dims=[8,16]", "methods=[lfq_naive,gq]",
            f"hydra.run.dir={tmp_path}/mem")
    table = load_memory(tmp_path / "mem" / "memory.csv")
    assert list(table["status"]) == ["ok"] * 4
    result = notebook_view.render_notebook("tab1_memory", tmp_path / "mem", tmp_path / "out")
    assert result.error is None, result.error
    assert "d = 16" in result.markdown


def test_memory_table_goes_to_wandb_when_logging_is_on(tmp_path):
    run_cli("-m", "wetok.memory", "dims=[8]", "methods=[gq]", "logger=wandb",
            "logger.mode=offline", f"hydra.run.dir={tmp_path}/mem")
    assert (tmp_path / "mem" / "memory.csv").exists()
    runs = list((tmp_path / "mem" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), "an offline W&B run with the table"
