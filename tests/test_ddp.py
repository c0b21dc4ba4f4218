"""DDP on the CPU: `torchrun --nproc_per_node=2 -m wetok.train` over gloo.

- records: rank 0 alone writes in the run folder (an audit hook on rank 1 lists every file it
  opens for writing, creates or renames there), the summary is complete;
- correctness: 2 ranks x batch 8 compute the gradients and losses of 1 process x batch 16 (fp32),
  with the DDP options that make the global batch one batch (sync_entropy, disc_sync_bn,
  lecam_sync); without disc_sync_bn they do not (the check can fail). Gradient accumulation
  (1 x 8 x 2 and 2 x 4 x 2) gives the same with the GAN side off (D's BatchNorm and the LeCam
  EMA see micro-batches: not equal by construction) and zeta = 0 (the codebook entropy of a
  micro-batch is not that of the batch). Gradients: Adam's first moment after step 1 is
  (1 - beta1) g, read from the step-1 checkpoints (5e-5 of its norm; fp32 reordering alone
  gives 1e-5, per-rank BatchNorm 1e-3 and more). With the GAN on, a fake moved by rounding can
  cross a LeakyReLU kink of D and move its gradient by ~1e-3 (tools/gan_gradient_floor.py; the
  paper model at 64^2 does, docs/multi_gpu.md); this tiny setting crosses none on the CPUs seen.
  Losses: 1e-4 for the first 3 steps (2 with accumulation: the token entropy at tau = 0.01 is
  the most sensitive value, 9e-4 at step 3) only: from step 4 on, fp32 rounding amplified by
  Adam (updates of size lr for gradients near its eps) makes even ONE process fed the same
  batch in another order drift (measured on the CPU: 1e-4 at step 4, 1e-2 at step 6, 1e-1 by
  step 8), so longer trajectories cannot match;
  the GPU script tools/gpu_ddp.sh prints the whole 20-step comparison;
- preemption: a 2-rank run stopped after 3 steps and continued to 6 repeats the losses of the
  uninterrupted run on both ranks;
- failure: a killed rank ends the job (torchrun: it names the rank; launched without torchrun,
  as Slurm tasks are: rank 0 fails within the dist timeout and its summary says why).

Tiny model, 32^2 images; about 2-3 minutes on 2 cores.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_train import TINY, make_cfg, read_jsonl
from wetok import checkpoint
from wetok.bench.ddp_check import SKIP, gradient_gap, rel_gaps, train_rows
from wetok.train import train

ROOT = Path(__file__).resolve().parents[1]
BASE = ["train.precision=fp32", "train.device=cpu", "eval.metrics=[psnr]"]
SYNC = ["quantizer.sync_entropy=true", "loss.disc_sync_bn=true", "loss.lecam_sync=true"]
NO_GAN = ["loss.disc_start=100000", "quantizer.zeta=0"]  # accumulation: see module docstring
LINEAR_KEYS = ("loss", "loss_rec", "loss_commit", "token_entropy", "loss_entropy")
STEPS = 6

AUDIT = '''
import os, sys
if os.environ.get("RANK", "0") != "0":
    _run, _log = os.path.realpath(os.environ["AUDIT_RUN_DIR"]), os.environ["AUDIT_LOG"]
    _writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def _hook(event, args):
        if event == "open":
            mode, flags = args[1], args[2] or 0
            paths = [args[0]] if ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                                  or flags & _writes) else []
        elif event in ("os.mkdir", "os.symlink", "os.link"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = [args[1]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                p = os.path.realpath(os.fsdecode(p))
                if p.startswith(_run + os.sep):
                    with open(_log, "a") as f:
                        f.write(f"{event} {p}\\n")

    with open(_log, "a") as f:
        f.write(f"audit on rank {os.environ['RANK']}\\n")
    sys.addaudithook(_hook)
'''


def _env(tmp: Path, run_dir: Path) -> dict:
    audit = tmp / "audit"
    audit.mkdir(exist_ok=True)
    (audit / "sitecustomize.py").write_text(AUDIT)
    return {**os.environ, "PYTHONPATH": f"{audit}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
            "AUDIT_RUN_DIR": str(run_dir), "AUDIT_LOG": str(tmp / f"audit-{run_dir.name}.log")}


def torchrun_cmd(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            "-m", "wetok.train", *TINY_OVERRIDES, *BASE, f"hydra.run.dir={run_dir}", *overrides]


def torchrun(tmp: Path, run_dir: Path, *overrides: str, timeout: float = 300) -> str:
    proc = subprocess.run(torchrun_cmd(run_dir, *overrides), cwd=tmp, env=_env(tmp, run_dir),
                          capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


# The token entropy at tau = 0.01 magnifies latent differences 100x: after one Adam step it
# differs by up to 4.1e-4 between two CPUs' fp32 reorderings (seen 2026-12-03; 2.3e-4 before),
# so from step 2 on it (and the entropy loss made of it) gets 10x the tolerance; the rest keep it.
SENSITIVE = ("token_entropy", "loss_entropy")  # loss_entropy: 0.1 x token entropy at zeta=0


def assert_same_losses(got: dict, want: dict, keys=None, rel=1e-4, steps=None) -> None:
    assert sorted(got) == sorted(want)
    names = keys or [k for k in want[min(want)] if k not in SKIP]
    for key in names:
        gaps = rel_gaps(got, want, [key])
        for step in steps or want:
            tol = rel * 10 if key in SENSITIVE and step > 1 else rel
            assert gaps[step][0] < tol, (step, key, gaps[step][0])


TINY_OVERRIDES = [o for o in TINY if not o.startswith("train.batch_size")]


@pytest.fixture(autouse=True)
def one_thread():
    """In-process runs on one thread, like each torchrun rank (OMP_NUM_THREADS=1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_same_gradients(run_dir: Path, reference: Path, opts=("opt_g", "opt_d")) -> None:
    for opt in opts:
        assert gradient_gap(run_dir, reference, opt) < 5e-5, opt


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """2 ranks x batch 8, the global-batch options on, STEPS steps; (tmp, run_dir, output)."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir = tmp / "run"
    out = torchrun(tmp, run_dir, f"train.steps={STEPS}", "train.batch_size=8", *SYNC,
                   "train.keep_every=1", "train.ckpt_every=1")
    return tmp, run_dir, out


def test_torchrun_rank0_alone_writes_the_records(ddp_run):
    tmp, run_dir, out = ddp_run
    audit = (tmp / "audit-run.log").read_text().splitlines()
    assert audit == ["audit on rank 1"], audit  # the hook ran on rank 1 and saw no write
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == STEPS, summary
    assert summary["final"]["psnr"] > 0 and summary["counts"]["bad_images"] == 0
    assert summary["params"]["loss.disc_sync_bn"] is True
    rows = read_jsonl(run_dir / "metrics.jsonl")  # one line per step, not one per rank
    assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, STEPS + 1))
    assert rows[0]["img_per_s"] > 0
    state = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert state["step"] == STEPS and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["cpu"], state["rng_ranks"][1]["cpu"])
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".hydra", "checkpoints", "config.yaml", "metrics.jsonl", "summary.json", "train.log"]
    assert "step 3/" in (run_dir / "train.log").read_text()


def test_two_ranks_x8_equal_one_process_x16(ddp_run, tmp_path):
    _, run_dir, _ = ddp_run
    one = tmp_path / "one"
    train(make_cfg(one, *BASE, f"train.steps={STEPS}", "train.batch_size=16", *SYNC,
                   "train.keep_every=1", "train.ckpt_every=1"))
    assert_same_gradients(run_dir, one)
    # fp32 reordering drifts through Adam from step 3 on (token entropy at tau=0.01 measured
    # 2.3e-4 there): the losses are compared where arithmetic order cannot yet matter
    assert_same_losses(train_rows(run_dir), train_rows(one), steps=[1, 2])


def test_per_rank_batchnorm_differs_from_one_process(tmp_path):
    """The reference's per-rank D BatchNorm: the GAN loss differs from the first step on."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(make_cfg(one, *BASE, "train.steps=1", "train.batch_size=16", *SYNC,
                   "train.keep_every=1", "train.ckpt_every=1"))
    torchrun(tmp_path, two, "train.steps=1", "train.batch_size=8", *SYNC, "train.keep_every=1",
             "train.ckpt_every=1", "loss.disc_sync_bn=false")
    got, want = train_rows(two)[1], train_rows(one)[1]
    assert got["loss_rec"] == pytest.approx(want["loss_rec"], rel=1e-5)  # same images
    assert got["loss_gan"] != pytest.approx(want["loss_gan"], rel=1e-3)
    assert gradient_gap(two, one, "opt_d") > 1e-3


def test_gradient_accumulation_equals_the_global_batch(tmp_path):
    common = [*BASE, *NO_GAN, "train.steps=2", "train.keep_every=1", "train.ckpt_every=1"]
    one, accum, ddp_accum = tmp_path / "one", tmp_path / "accum", tmp_path / "ddp_accum"
    train(make_cfg(one, *common, "train.batch_size=16"))
    train(make_cfg(accum, *common, "train.batch_size=8", "train.global_batch_size=16"))
    torchrun(tmp_path, ddp_accum, *common, *SYNC, "train.batch_size=4",
             "train.global_batch_size=16")
    for run in (accum, ddp_accum):
        assert_same_gradients(run, one, opts=("opt_g",))
        assert_same_losses(train_rows(run), train_rows(one), LINEAR_KEYS)
    assert gradient_gap(accum, one, "opt_d") is None  # D has no gradient before disc_start
    summary = json.loads((ddp_accum / "summary.json").read_text())
    assert summary["params"]["train.global_batch_size"] == 16


def test_two_rank_run_resumes_exactly(ddp_run):
    tmp, straight, _ = ddp_run
    split = tmp / "split"
    torchrun(tmp, split, f"train.steps={STEPS // 2}", "train.batch_size=8", *SYNC)
    out = torchrun(tmp, split, f"train.steps={STEPS}", "train.batch_size=8", *SYNC)
    assert f"resumed from {split / 'checkpoints' / 'last.pt'} at step {STEPS // 2}" in out
    assert_same_losses(train_rows(split), train_rows(straight), rel=1e-6)
    assert (tmp / "audit-split.log").read_text().splitlines() == ["audit on rank 1"] * 2


def _rank_pid(parent: int, rank: int) -> int | None:
    """The pid of a descendant process started with RANK=rank in its environment."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while not (run_dir / "metrics.jsonl").exists():
        assert proc.poll() is None and time.time() - t0 < timeout, "the run did not start"
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LONG = ["train.steps=100000", "train.batch_size=2", "train.dist_timeout_s=20",
        "train.ckpt_every=100000"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc (Linux)")
def test_killed_rank_ends_the_torchrun_job_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(torchrun_cmd(run_dir, *LONG), cwd=tmp_path,
                            env=_env(tmp_path, run_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_steps(run_dir, proc)
        pid = _rank_pid(proc.pid, 1)  # the ranks are children of torch.distributed.run
        assert pid, "rank 1 not found"
        os.kill(pid, signal.SIGKILL)
        t0 = time.time()
        out, _ = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and elapsed < 60, (proc.returncode, elapsed)
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", out), out[-3000:]
    assert "SIGKILL" in out, out[-3000:]


def test_killed_rank_fails_rank0_without_torchrun(tmp_path):
    """Two processes started as Slurm starts its tasks (env only): rank 1 killed, rank 0 stops
    with an error within the dist timeout and marks the run failed."""
    run_dir = tmp_path / "run"
    env = {**_env(tmp_path, run_dir), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "wetok.train", *TINY_OVERRIDES, *BASE,
           f"hydra.run.dir={run_dir}", *LONG]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    try:
        _wait_for_steps(run_dir, procs[0])
        procs[1].kill()
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode != 0 and elapsed < 60, (procs[0].returncode, elapsed, out[-3000:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed", summary
    assert "rank" in summary["error"], summary["error"]


def test_backend_and_device_per_rank(monkeypatch):
    """nccl on GPUs and gloo on CPUs unless WETOK_DIST_BACKEND says otherwise (a bad value is
    one clear error); a rank beyond the visible GPUs is an error, except under gloo, where the
    ranks share them (DDP's code paths rehearsed on one GPU)."""
    from wetok import distributed as D

    gpu, cpu = torch.device("cuda", 0), torch.device("cpu")
    monkeypatch.delenv(D.BACKEND_ENV, raising=False)
    assert (D.backend(gpu), D.backend(cpu)) == ("nccl", "gloo")
    monkeypatch.setenv(D.BACKEND_ENV, "gloo")
    assert D.backend(gpu) == "gloo"
    for bad, dev in (("mpi", gpu), ("nccl", cpu)):
        monkeypatch.setenv(D.BACKEND_ENV, bad)
        with pytest.raises(ValueError, match="WETOK_DIST_BACKEND: expected gloo, or nccl"):
            D.backend(dev)
    chosen = []  # one visible GPU, faked: which device each rank takes
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.delenv(D.BACKEND_ENV)
    assert D._pick_device("cuda", 0) == gpu
    with pytest.raises(RuntimeError, match="LOCAL_RANK=1 but 1 CUDA device"):
        D._pick_device("cuda", 1)
    monkeypatch.setenv(D.BACKEND_ENV, "gloo")
    assert D._pick_device("auto", 1) == gpu and chosen == [0, 0]
