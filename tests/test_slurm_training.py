"""Training through real Slurm (tests/slurm_cluster.py) with the project's `slurm` launcher preset:
a quick sweep, preemption -> checkpoint -> requeue -> resume, and DDP over two Slurm tasks.

Each test starts a Hydra multirun as a subprocess (`python -m wetok.train -m ...`), which blocks
until its jobs are done, like a user would. Everything lands under tmp_path (hydra.sweep.dir).
Slow: about 20 s (sweep), 50 s (preemption: includes Slurm's requeue hold) and 25 s (DDP).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import submitit
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from test_train import TINY, make_cfg, read_jsonl, train_losses
from wetok.config import run_id
from wetok.train import train

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_MIN = 15  # >= 10 min: submitit then classes a USR2 as preemption, not as a time-out


def multirun(cluster, sweep_dir: Path, *overrides: str, tasks_per_node: int = 1) -> list[str]:
    return [sys.executable, "-m", "wetok.train", "-m",
            *cluster.launcher_overrides(timeout_min=JOB_TIMEOUT_MIN, launcher="slurm",
                                        tasks_per_node=tasks_per_node),
            f"hydra.sweep.dir={sweep_dir}", *TINY, *overrides]


def run_multirun(cluster, cmd: list[str], cwd: Path, timeout_s: float) -> subprocess.CompletedProcess:
    try:
        out = subprocess.run(cmd, cwd=cwd, env={**cluster.env, "HYDRA_FULL_ERROR": "1"},
                             capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"multirun still running after {timeout_s} s\n{cluster.squeue()}\n"
                    f"{job_logs(cwd)}\n{exc.stdout}\n{exc.stderr}")
    assert out.returncode == 0, f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}\n{job_logs(cwd)}"
    return out


def job_logs(root: Path, tail: int | None = 4000) -> str:
    """The submitit job logs under root (their last `tail` characters; None: all)."""
    parts = []
    for log in sorted(root.rglob(".submitit/*/*_log.*")):
        text = log.read_text(errors="replace")
        parts.append(f"--- {log.name}\n{text[-tail:] if tail else text}")
    return "\n".join(parts)


def job_folders(sweep_dir: Path) -> list[Path]:
    """One folder per Slurm job (<id>, or <array id>_<index> for an array): one per sweep point."""
    return sorted(p.parent for p in (sweep_dir / ".submitit").glob("*/*_submitted.pkl"))


def wait_completed(cluster, folders: list[Path], timeout_s: float = 30) -> None:
    """Wait until Slurm says each job (named by its submitit folder) COMPLETED.

    The multirun returns as soon as the result files exist; the job's processes may still be
    exiting. A job that hangs on exit or fails after writing its result would show here.
    """
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        for folder in folders:
            states[folder.name] = subprocess.run(
                ["squeue", "-h", "--states=all", f"--jobs={folder.name}", "-o", "%T"],
                env=cluster.env, capture_output=True, text=True, timeout=10).stdout.strip()
        if all(state == "COMPLETED" for state in states.values()):
            return
        if any(state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
               for state in states.values()):
            break
        time.sleep(0.5)
    pytest.fail(f"Slurm job states {states}, expected COMPLETED\n{cluster.squeue()}")


def run_dirs(sweep_dir: Path) -> list[Path]:
    return sorted(p.parent for p in sweep_dir.glob("*/summary.json"))


def expected_run_folder(run_dir: Path) -> str:
    """The folder name conf/config.yaml gives these overrides (hydra.sweep.subdir)."""
    cfg = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.job.config.override_dirname
    task = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    parsed = OverridesParser.create().parse_overrides(task)
    lines = sorted(o.input_line for o in parsed if o.key_or_group not in cfg.exclude_keys)
    return run_id(cfg.item_sep.join(lines))


def test_quick_sweep_runs_two_jobs_in_stable_folders(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    cmd = multirun(slurm_cluster, sweep_dir, "+sweep=fig3_quantizer",
                   "experiment=table06_gfq,table08_bsq", "train.steps=3")
    run_multirun(slurm_cluster, cmd, cwd=tmp_path, timeout_s=120)

    folders = job_folders(sweep_dir)
    assert len(folders) == 2, folders  # one Slurm array task per sweep point
    wait_completed(slurm_cluster, folders)
    # the jobs run the submitting Python (submitit puts sys.executable in the sbatch script)
    (script,) = (sweep_dir / ".submitit").glob("*/*_submission.sh")  # one sbatch for the array
    assert f"{shlex.quote(sys.executable)} -u -m submitit.core._submit" in script.read_text()

    runs = run_dirs(sweep_dir)
    assert len(runs) == 2, [p.name for p in sweep_dir.iterdir()]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    for run, summary in zip(runs, summaries):
        assert summary["status"] == "finished" and summary["steps"] == 3, summary
        assert summary["sweep"] == "fig3_quantizer"
        assert [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"] == [1, 2, 3]
        assert run.name == expected_run_folder(run)  # same overrides -> same folder (resume)
    assert {s["choices"]["experiment"] for s in summaries} == {"table06_gfq", "table08_bsq"}
    assert {s["choices"]["quantizer"] for s in summaries} == {"gq", "bsq"}
    assert {s["params"]["quantizer.groups"] for s in summaries} == {2, 16}


def test_preempted_training_resumes_and_matches_uninterrupted_run(slurm_cluster, tmp_path):
    steps = 40
    overrides = [f"train.steps={steps}", "train.ckpt_every=1000"]  # only the preemption checkpoint
    sweep_dir = tmp_path / "sweep"
    log_path = tmp_path / "multirun.log"
    env = {**slurm_cluster.env, "HYDRA_FULL_ERROR": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(multirun(slurm_cluster, sweep_dir, *overrides), cwd=tmp_path,
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def train_rows() -> int:
            metrics = list(sweep_dir.glob("*/metrics.jsonl"))
            return len(read_jsonl(metrics[0])) if metrics else 0

        deadline = time.monotonic() + 60
        while train_rows() < 3:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"no training progress (multirun rc {proc.returncode})\n"
                            f"{slurm_cluster.squeue()}\n{log_path.read_text()}\n{job_logs(tmp_path)}")
            time.sleep(0.2)
        (folder,) = job_folders(sweep_dir)
        job = submitit.SlurmJob(folder=sweep_dir / ".submitit" / "%j", job_id=folder.name)
        signalled_at = train_rows()
        job._interrupt()  # preemption as Slurm does it: SIGTERM, then submitit's USR2

        # the uninterrupted reference, while Slurm holds the requeued job
        reference = tmp_path / "reference"
        assert train(make_cfg(reference, *overrides))["steps"] == steps
        proc.wait(timeout=300)  # the requeued job on 2 busy cores: 150 s was seen too short
    except subprocess.TimeoutExpired:
        pytest.fail(f"multirun still running\n{slurm_cluster.squeue()}\n{job_logs(tmp_path)}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{log_path.read_text()[-3000:]}\n{job_logs(tmp_path)}"
    wait_completed(slurm_cluster, [folder])

    (run,) = run_dirs(sweep_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == steps, summary
    assert summary["final"]["psnr"] > 0  # the resumed attempt ran the final evaluation

    logs = job_logs(tmp_path, tail=None)
    assert "this job is preempted" in logs and "Requeued job" in logs, logs
    stdout = (folder / f"{folder.name}_0_log.out").read_text()
    assert stdout.count("Starting with JobEnvironment") == 2, stdout  # two attempts of one job
    resumed = [line for line in logs.splitlines() if "resumed from" in line]
    assert len(resumed) == 1, logs
    k = int(resumed[0].rsplit("at step", 1)[1].split()[0])
    assert signalled_at <= k < steps, (signalled_at, k)
    ckpt_steps = [line for line in logs.splitlines() if f"preempted at step {k}:" in line]
    assert len(ckpt_steps) == 1, logs

    rows = [r for r in read_jsonl(run / "metrics.jsonl") if r["split"] == "train"]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))  # each step once, in order
    got, want = train_losses(run), train_losses(reference)
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-6), step


def test_ddp_over_two_slurm_tasks(slurm_cluster, tmp_path):
    if slurm_cluster.cpus < 2:
        pytest.skip(f"two tasks need 2 CPUs; the node has {slurm_cluster.cpus}")
    sweep_dir = tmp_path / "sweep"
    cmd = multirun(slurm_cluster, sweep_dir, "train.steps=3", "train.global_batch_size=4",
                   "train.batch_size=2", tasks_per_node=2)
    run_multirun(slurm_cluster, cmd, cwd=tmp_path, timeout_s=120)

    (run,) = run_dirs(sweep_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 3, summary
    assert summary["params"]["train.global_batch_size"] == 4
    # rank 0 alone writes records: one line per logged step, not one per rank
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["split"] == "val"] == [3]

    (folder,) = job_folders(sweep_dir)
    wait_completed(slurm_cluster, [folder])
    task_logs = {t: (folder / f"{folder.name}_{t}_log.err").read_text() +
                 (folder / f"{folder.name}_{t}_log.out").read_text() for t in (0, 1)}
    for t, text in task_logs.items():  # two Slurm tasks, world size 2 (accumulation 1)
        assert f"global_rank={t}(2)" in text, text
        assert "Traceback" not in text, text
    assert "step 3/3" in task_logs[0] and "step 3/3" not in task_logs[1]
