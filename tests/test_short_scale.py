"""scale=short: the Fig 3 / Fig 4 sweeps compose on the wallpaper image folder, validate, and
repeat over seeds; tools/search_table.py reads the search's run folders."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from wetok.config import validate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import fixtures_records as fx  # noqa: E402
from test_seeds import _jobs  # noqa: E402


@pytest.fixture()
def wallpapers(tmp_path, monkeypatch):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
    monkeypatch.setenv("WETOK_WALLPAPERS", str(tmp_path))
    return tmp_path


def _compose(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", ["table06_gfq", "table07_lfq", "table08_bsq",
                                        "table11_g1", "table16_g32"])
def test_short_scale_shrinks_the_fig3_fig4_presets(wallpapers, experiment):
    cfg = _compose("+sweep=fig3_quantizer", f"experiment={experiment}", "scale=short")
    validate(cfg)
    assert cfg.data.name == "imagefolder" and cfg.data.root == str(wallpapers)
    assert cfg.data.image_size == 128 and cfg.model.name == "small"
    assert cfg.model.downsample == 16 and cfg.train.compile is True
    assert cfg.loss.perceptual_weight == 0 and cfg.train.global_batch_size is None
    assert cfg.train.steps < 250250 and cfg.eval.num_images is None


def test_short_scale_sweep_with_seeds():
    jobs = _jobs("scale=short", "+seeds=3")
    assert len(jobs) == 9 and all("scale=short" in j for j in jobs)


def test_search_table(tmp_path):
    fx.write_run(tmp_path / "runs" / "base", sweep=None, name="search_base", q=0.9)
    fx.write_run(tmp_path / "runs" / "bsq", sweep=None, name="search_bsq", q=0.1)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "search_table.py"),
                          str(tmp_path / "runs")], capture_output=True, text=True, check=True)
    lines = out.stdout.splitlines()
    base = next(line for line in lines if line.startswith("| base |"))
    bsq = next(line for line in lines if line.startswith("| bsq |"))
    assert "above both" in base and "below baseline" in bsq
    assert "| 18.50 |" in base  # the mean-colour baseline beside the run


def test_bit_budget_baseline_table():
    """tools/bit_budget_baseline.py on the bundled photos: more bits per token, closer to the
    float avg pool; the config's own d (quick GQ: g=4, d'=8 -> 32 bits) is always a row."""
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "bit_budget_baseline.py"),
                          "eval.num_images=16", "--bits", "3", "16"],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in out.stdout.splitlines() if line.startswith("| ") and "PSNR" not in line}
    psnr = {name: float(cells[2]) for name, cells in rows.items()}
    three, sixteen = psnr["avg pool, 3-bit means (1, 1, 1)"], psnr["avg pool, 16-bit means (5, 6, 5)"]
    assert three < sixteen <= psnr["avg pool (float means)"] + 0.05
    assert "avg pool, 32-bit means (8, 8, 8)" in psnr and "16 validation images" in out.stdout
