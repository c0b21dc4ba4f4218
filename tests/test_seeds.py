"""`+seeds=N` on a sweep: N seeds per setting, each its own run folder, and the seed really
changes initialisation and data order (the Trainer's model and the training batches)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from wetok.config import ConfigError, seed_sweep
from wetok.data import build_loader
from wetok.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train import make_cfg  # noqa: E402


def test_seed_sweep_values():
    assert seed_sweep(None, 0) == "0"
    assert seed_sweep(3, 0) == "0,1,2"
    assert seed_sweep(2, 5) == "5,6"
    for bad in (0, -1, "3", True):
        with pytest.raises(ConfigError, match="seeds"):
            seed_sweep(bad, 0)


def _jobs(*cli):
    """Jobs of `python -m wetok.train -m +sweep=fig3_quantizer <cli>` (Hydra's own code)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+sweep=fig3_quantizer", *cli],
                      return_hydra_config=True)
        params = cfg.hydra.sweeper.params
        exclude = set(cfg.hydra.job.config.override_dirname.exclude_keys)
    args = [f"{k}={v}" for k, v in params.items()] + ["+sweep=fig3_quantizer", *cli]
    (batch,) = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
    GlobalHydra.instance().clear()
    # the run folder: the job's overrides minus the excluded keys (Hydra's override_dirname)
    return [",".join(sorted(o for o in job if o.lstrip("+").split("=")[0] not in exclude))
            for job in batch]


def test_seeds_multiply_the_jobs_and_keep_stable_folders():
    one = _jobs()
    three = _jobs("+seeds=3")
    assert len(one) == 3 and len(three) == 9 and len(set(three)) == 9
    assert set(one) <= set(three)  # seed 0's folder is the same with or without +seeds
    assert {d.split("seed=")[1].split(",")[0] for d in three} == {"0", "1", "2"}
    assert all("seeds" not in d for d in three)


def test_seed_changes_initialisation_and_data_order(tmp_path):
    def model_and_batch(seed):
        cfg = make_cfg(tmp_path / f"s{seed}", f"seed={seed}")
        model = Trainer(cfg).model.state_dict()
        loader, _ = build_loader(cfg.data, "train", 4, seed=seed)
        return model, next(iter(loader))

    m0, b0 = model_and_batch(0)
    m0_again, b0_again = model_and_batch(0)
    m1, b1 = model_and_batch(1)
    key = "encoder.conv_in.weight"
    assert torch.equal(m0[key], m0_again[key]) and torch.equal(b0, b0_again)
    assert not torch.equal(m0[key], m1[key])
    assert not torch.equal(b0, b1)
