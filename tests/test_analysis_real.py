"""The Fig 3 notebook on REAL records: a quick sweep trained here (tiny model, a few CPU steps)
through the CLI, then rendered top to bottom; the table must hold the runs' own numbers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from analysis import render
from analysis.records import load_runs

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data.image_size=32", "train.batch_size=2", "train.steps=2",
        "eval.num_images=4", "eval.batch_size=4", "eval.metrics=[psnr,ssim]"]


def test_quick_sweep_records_render_into_the_fig3_table(tmp_path):
    sweep_dir = tmp_path / "fig3_quantizer"
    out = subprocess.run(
        [sys.executable, "-m", "wetok.train", "-m", "+sweep=fig3_quantizer", *TINY,
         f"hydra.sweep.dir={sweep_dir}"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/summary.json")}
    assert len(summaries) == 3 and all(s["status"] == "finished" for s in summaries.values())

    runs = load_runs(sweep_dir)
    assert sorted(runs["quantizer.groups"]) == [1, 2, 16]

    result = render.render_notebook("fig3_quantizer", sweep_dir, tmp_path / "out")
    assert result.error is None, result.error
    assert (tmp_path / "out" / "fig3_quantizer_final.png").stat().st_size > 0
    table = result.markdown
    for run, summary in summaries.items():
        row = next(line for line in table.splitlines() if run in line)
        assert f"{summary['final']['psnr']:.2f}" in row, (run, row)
