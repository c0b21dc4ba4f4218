"""`python -m wetok.evaluate <sweep folder> hydra/launcher=slurm` through real Slurm
(tests/slurm_cluster.py): one job per pending run, each sharded over two Slurm tasks (gloo),
eval.json beside each summary.json. About 40 s."""
from __future__ import annotations

import json
import sys

import pytest

from test_evaluate import make_cfg
from test_slurm_training import job_folders, run_multirun, wait_completed
from wetok.train import train

pytestmark = pytest.mark.slurm


def test_sweep_evaluated_through_slurm_with_two_tasks(slurm_cluster, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip(f"two tasks need 2 CPUs; the node has {slurm_cluster.cpus}")
    sweep = tmp_path / "sweep"
    for name in ("a", "b"):
        train(make_cfg("train.steps=1", f"run_dir={sweep / name}"))
    logs = tmp_path / "eval_logs"
    cmd = [sys.executable, "-m", "wetok.evaluate", str(sweep),
           *slurm_cluster.launcher_overrides(timeout_min=10, launcher="slurm", tasks_per_node=2),
           f"hydra.sweep.dir={logs}"]
    run_multirun(slurm_cluster, cmd, cwd=tmp_path, timeout_s=180)
    for name in ("a", "b"):
        record = json.loads((sweep / name / "eval.json").read_text())
        assert record["values"]["num_images"] == 7, record  # both shards counted, once
        assert set(record["baselines"]) == {"mean_colour", "avg_pool"}
    folders = job_folders(logs)
    assert len(folders) == 2
    wait_completed(slurm_cluster, folders)
    for folder in folders:
        for t in (0, 1):
            text = (folder / f"{folder.name}_{t}_log.err").read_text() + \
                (folder / f"{folder.name}_{t}_log.out").read_text()
            assert f"global_rank={t}(2)" in text and "Traceback" not in text, text
