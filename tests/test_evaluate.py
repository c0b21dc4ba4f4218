"""Evaluation: the trivial baselines, sharded evaluation (2 gloo processes against 1), the
command line on a run and on a sweep folder. CPU, tiny model, 32^2 images."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

import wetok.config  # noqa: F401  (run_id resolver)
from wetok import baselines as BL
from wetok import metrics as M
from wetok.evaluate import EvalPass, evaluate_model, expand_argv, pending_runs, shard_size
from wetok.losses import WeTokLoss
from wetok.model import build_model
from wetok.record_schema import EVAL_FIELDS

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data.image_size=32", "train.batch_size=2", "train.log_every=1",
        "train.eval_every=1000", "eval.num_images=7", "eval.batch_size=2",
        "eval.metrics=[psnr,ssim]"]


def make_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=[*TINY, "run_dir=unused", *overrides])


# ---- baselines -------------------------------------------------------------------------------


def test_mean_colour_is_perfect_on_a_flat_image():
    flat = torch.tensor([0.2, -0.5, 0.9]).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    ev = M.Evaluator(metrics=BL.BASELINE_METRICS)
    ev.update(flat, BL.predict("mean_colour", flat, 4))
    values, _ = ev.compute()
    assert math.isinf(values["psnr"]) and values["ssim"] == pytest.approx(1.0)
    ramp = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(1, 3, 16, 16)
    assert not torch.allclose(BL.mean_colour(ramp), ramp)


def test_avg_pool_identity_at_factor_one_and_better_than_mean_colour_on_a_ramp():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(BL.avg_pool(x, 1), x)
    ramp = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32)
    err = {n: float((BL.predict(n, ramp, 4) - ramp).abs().mean()) for n in BL.BASELINES}
    assert err["avg_pool"] < 0.05 < err["mean_colour"]
    with pytest.raises(ValueError, match="multiple"):
        BL.avg_pool(x, 3)
    with pytest.raises(ValueError, match="unknown baseline"):
        BL.predict("median", x, 1)


def test_avg_pool_at_a_bit_budget_codes_each_cell_mean_in_that_many_bits():
    assert [BL.colour_bits(b) for b in (3, 8, 16, 24, 256)] == [
        (1, 1, 1), (3, 3, 2), (5, 6, 5), (8, 8, 8), (8, 8, 8)]
    with pytest.raises(ValueError, match="at least 3 bits"):
        BL.colour_bits(2)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    for bits in (3, 8, 16):
        levels = torch.tensor([2 ** b for b in BL.colour_bits(bits)]).view(1, 3, 1, 1)
        cells = BL.avg_pool(x, 1, bits=bits)  # factor 1: each pixel is a cell, not upsampled
        k = (cells + 1) / 2 * levels - 0.5  # bin centres: integers 0 .. levels - 1
        assert torch.allclose(k, k.round(), atol=1e-5) and k.min() >= 0 and (k <= levels - 1).all()
        assert len(k[:, 0].round().unique()) == 2 ** BL.colour_bits(bits)[0]  # every red bin used
    ramp = torch.linspace(-1, 1, 64).view(1, 1, 1, 64).expand(1, 3, 64, 64)
    err = [float((BL.avg_pool(ramp, 4, bits=b) - BL.avg_pool(ramp, 4)).abs().max())
           for b in (3, 8, 16)]
    assert err[0] > err[1] > err[2] and err[2] < 2 / 2 ** 5  # within one 5-bit bin


def test_shard_sizes_cover_the_first_images_once():
    assert [shard_size(7, r, 2) for r in range(2)] == [4, 3]
    assert sum(shard_size(10, r, 4) for r in range(4)) == 10
    assert shard_size(None, 1, 2) is None and shard_size(1, 1, 2) == 0


# ---- the evaluation batch --------------------------------------------------------------------


def test_eval_pass_step_scores_its_reconstruct_and_the_mode_comes_back():
    """EvalPass.reconstruct is what step scores (and what the benchmarks time as encode +
    decode); evaluate_model puts the model in eval mode and gives it back in its own mode."""
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quantizer).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    run = EvalPass(model, cfg, torch.device("cpu"))
    x_dev, x_rec, indices = run.reconstruct(x)
    assert torch.equal(x_dev, x) and x_rec.dtype == torch.float32
    h = 32 // run.factor
    assert x_rec.abs().max() <= 1 and indices.shape == (2, cfg.quantizer.groups, h, h)
    run.step(x)
    values, _, _ = run.result()
    ref = M.Evaluator(metrics=("psnr", "ssim"))
    ref.update(x, x_rec)
    assert values["psnr"] == pytest.approx(ref.compute()[0]["psnr"]) and values["num_images"] == 2
    model.train()
    evaluate_model(model, cfg, torch.device("cpu"), num_images=2)
    assert model.training


def test_the_garbage_collector_is_paused_for_the_first_step_only(monkeypatch):
    """evaluate_model's first step (eval.compile's compilation) runs without Python's cyclic
    garbage collector; the later steps and the caller have it back, also after an error."""
    import gc

    cfg = make_cfg("eval.batch_size=2")
    model = build_model(cfg.model, cfg.quantizer)
    seen, real_step = [], EvalPass.step
    monkeypatch.setattr(EvalPass, "step", lambda self, x: (seen.append(gc.isenabled()),
                                                           real_step(self, x)))
    evaluate_model(model, cfg, torch.device("cpu"), num_images=6)
    assert seen == [False, True, True] and gc.isenabled()

    def failing(self, x):
        raise RuntimeError("step failed")
    monkeypatch.setattr(EvalPass, "step", failing)
    with pytest.raises(RuntimeError, match="step failed"):
        evaluate_model(model, cfg, torch.device("cpu"), num_images=6)
    assert gc.isenabled()


def test_a_short_batch_padded_to_the_batch_size_scores_the_same():
    """On a GPU a short last batch is padded to eval.batch_size (pad_to); the padded rows are
    dropped, so the reconstruction and the indices of the real images do not change (float64:
    in fp32 the CPU's convolutions pick other kernels for another batch size, 1e-5 apart)."""
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quantizer).eval().double()
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64) * 2 - 1
    plain = EvalPass(model, cfg, torch.device("cpu"))
    padded = EvalPass(model, cfg, torch.device("cpu"))
    padded.pad_to = 8
    assert plain.pad_to == 0  # the CPU path is unpadded
    got, want = padded.reconstruct(x), plain.reconstruct(x)
    assert got[1].shape == want[1].shape == x.shape and got[2].shape == want[2].shape
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    for run in (plain, padded):  # the whole step: metrics, baselines, usage on the 3 images
        run.step(x)
    (v_plain, _, b_plain), (v_padded, _, b_padded) = plain.result(), padded.result()
    assert v_padded["num_images"] == 3 and v_padded == v_plain and b_padded == b_plain


# ---- sharded evaluation ----------------------------------------------------------------------


def _evaluate(cfg, model_state):
    model = build_model(cfg.model, cfg.quantizer)
    model.load_state_dict(model_state)
    loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights, perceptual=False)
    return evaluate_model(model, cfg, torch.device("cpu"), loss)


def _fid_statistics(images: torch.Tensor) -> dict:
    rank, world = (tdist.get_rank(), tdist.get_world_size()) if tdist.is_initialized() else (0, 1)
    ev = M.Evaluator(metrics=("rfid",), random_weights=True, fid_feature="64")
    for batch in images[rank::world].split(3):
        ev.update(batch, batch.flip(-1))
    values, _ = ev.compute()
    return {**ev._real.statistics(), "rfid": values["rfid_random_weights"]}


def _worker(rank, world, port, out, job, *args):
    """One gloo rank: rank 0 saves what job(*args) returns."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = job(*args)
        if rank == 0:
            torch.save(result, out)
    finally:
        tdist.destroy_process_group()


def _run_two(tmp_path, job, *args):
    """job(*args) on 2 gloo processes -> rank 0's result."""
    import socket

    out = tmp_path / "sharded.pt"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(2, port, out, job, *args), nprocs=2)
    return torch.load(out, weights_only=False)


def _evaluate_and_fid(cfg, state, images):
    return _evaluate(cfg, state), _fid_statistics(images)


def _spawn_two(tmp_path, cfg, state, images):
    return _run_two(tmp_path, _evaluate_and_fid, cfg, state, images)


def test_two_gloo_processes_equal_one(tmp_path):
    """Same images, sharded over 2 processes or not. Batches of 1: a conv's float rounding
    depends on which images share its batch, and that alone can flip a uint8 pixel."""
    cfg = make_cfg("eval.batch_size=1", f"eval.cache_dir={tmp_path}/one")
    torch.manual_seed(0)
    state = build_model(cfg.model, cfg.quantizer).state_dict()
    images = torch.rand(11, 3, 32, 32) * 2 - 1
    single = (_evaluate(cfg, state), _fid_statistics(images))
    (values, skipped, baselines), stats = _spawn_two(tmp_path, make_cfg(
        "eval.batch_size=1", f"eval.cache_dir={tmp_path}/two"), state, images)
    (values1, skipped1, baselines1), stats1 = single
    assert values["num_images"] == values1["num_images"] == 7
    assert skipped == skipped1
    for key in ("psnr", "ssim", "val_loss"):
        assert values[key] == pytest.approx(values1[key], abs=1e-6), key
    assert values["usage_per_group"] == values1["usage_per_group"]
    assert values["joint_codes"] == values1["joint_codes"]
    assert set(baselines) == {"mean_colour", "avg_pool"}
    for name, vals in baselines1.items():
        assert set(vals) == {"psnr", "ssim"}
        for key, v in vals.items():
            assert baselines[name][key] == pytest.approx(v, abs=1e-6), (name, key)
    assert baselines1["avg_pool"]["psnr"] > baselines1["mean_colour"]["psnr"]
    for key in ("mu", "sigma"):
        assert abs(stats[key] - stats1[key]).max() < 1e-4, key
    assert stats["rfid"] == pytest.approx(stats1["rfid"], rel=1e-4, abs=1e-4)


def test_baselines_are_cached_per_data_set_and_skipped_on_the_next_pass(tmp_path, caplog):
    """The baselines do not depend on the model: the first pass over a data set writes them
    beside the rFID statistics, the next (another model) reads them instead of scoring them;
    a cache for another number of images gives no baselines and says which file."""
    cfg = make_cfg(f"eval.cache_dir={tmp_path}")
    torch.manual_seed(0)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    runs, results = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        run = EvalPass(build_model(cfg.model, cfg.quantizer).eval(), cfg, torch.device("cpu"),
                       fid_ref_name="imgs")
        run.step(x)
        runs.append(run)
        results.append(run.result())
    (v0, _, b0), (v1, _, b1) = results
    assert runs[0].baselines and not runs[1].baselines and b1 == b0
    plain = EvalPass(runs[0].model, cfg, torch.device("cpu"))  # no reference name: no cache
    plain.step(x)
    assert plain.result()[2] == b0 and set(b0) == {"mean_colour", "avg_pool"}
    third = EvalPass(runs[0].model, cfg, torch.device("cpu"), fid_ref_name="imgs")
    third.step(x)
    assert not third.baselines and third.result()[2] == b0  # the file, as it was written
    assert v0["psnr"] != v1["psnr"]  # two models, one set of baselines
    file = tmp_path / "imgs.baselines.json"
    assert json.loads(file.read_text())["num_images"] == 3
    other = EvalPass(runs[0].model, cfg, torch.device("cpu"), fid_ref_name="imgs")
    other.step(x[:2])
    with caplog.at_level("WARNING"):
        assert other.result()[2] == {}
    assert "imgs.baselines.json holds 3 images, this evaluation has 2" in caplog.text
    file.write_text("{not json")
    assert EvalPass(runs[0].model, cfg, torch.device("cpu"), fid_ref_name="imgs").baselines


def test_sharded_passes_read_the_cached_baselines(tmp_path):
    """Two gloo ranks that both find the cache use it (and give the one-process values)."""
    cfg = make_cfg("eval.batch_size=1", f"eval.cache_dir={tmp_path}/c")
    torch.manual_seed(0)
    state = build_model(cfg.model, cfg.quantizer).state_dict()
    _, _, want = _evaluate(cfg, state)
    file = next((tmp_path / "c").glob("*.baselines.json"))
    record = json.loads(file.read_text())
    record["baselines"]["avg_pool"]["psnr"] = 99.0  # only a cache read can give this value
    file.write_text(json.dumps(record))
    (_, _, baselines), _ = _spawn_two(tmp_path, cfg, state, torch.rand(2, 3, 32, 32))
    assert baselines["avg_pool"]["psnr"] == 99.0
    assert baselines["mean_colour"] == want["mean_colour"]


def _fid_with_cache_on_rank_1(images, root):
    """rFID with a reference cache that only rank 1 finds (another job wrote it between the
    ranks' reads): the cache must be ignored by both, or rank 0 would use its half alone."""
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    ev = M.Evaluator(metrics=("rfid",), random_weights=True, fid_feature="64",
                     fid_cache_dir=root / f"rank{rank}", fid_ref_name="imgs")
    for batch in images[rank::2 if tdist.is_initialized() else 1].split(3):
        ev.update(batch, batch.flip(-1))
    return ev.compute()[0]["rfid_random_weights"]


def test_a_reference_cache_that_not_every_rank_reads_is_ignored(tmp_path, caplog):
    images = torch.rand(8, 3, 32, 32) * 2 - 1
    (tmp_path / "rank0").mkdir()
    want = _fid_with_cache_on_rank_1(images, tmp_path)  # one process: writes rank0/
    cached = next((tmp_path / "rank0").glob("imgs*.npz"))
    (tmp_path / "rank1").mkdir()
    with np.load(cached) as f:  # statistics of other images: used, they would change rFID
        np.savez(tmp_path / "rank1" / cached.name, mu=f["mu"] + 1, sigma=f["sigma"],
                 num_images=f["num_images"])
    cached.unlink()
    got = _run_two(tmp_path, _fid_with_cache_on_rank_1, images, tmp_path)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    cached.write_bytes(b"not an npz")  # unreadable: a warning, computed again
    with caplog.at_level("WARNING"):
        assert _fid_with_cache_on_rank_1(images, tmp_path) == pytest.approx(want, rel=1e-6)
    assert "unreadable" in caplog.text


# ---- the command line ------------------------------------------------------------------------


def _run(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WETOK_EVAL_LOGS": str(cwd / "logs")}
    return subprocess.run([sys.executable, "-m", "wetok.evaluate", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_evaluates_the_pending_runs_of_a_sweep(tmp_path):
    from wetok.train import train

    sweep = tmp_path / "sweep"
    for name in ("a=1,b=2", "other"):
        train(make_cfg("train.steps=1", f"run_dir='{sweep / name}'", "eval.num_images=4"))
    (sweep / "broken").mkdir()
    (sweep / "broken" / "summary.json").write_text(json.dumps({"status": "failed"}))
    summary = json.loads((sweep / "other" / "summary.json").read_text())
    assert set(summary["baselines"]) == {"mean_colour", "avg_pool"}
    assert set(summary["baselines"]["avg_pool"]) == {"psnr", "ssim"}
    assert [r.name for r in pending_runs(sweep)] == ["a=1,b=2", "other"]
    assert expand_argv([str(sweep / "other")]) == [f"path={sweep / 'other'}"]

    done = _run(str(sweep), "+run.eval.num_images=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("a=1,b=2", "other"):
        record = json.loads((sweep / name / "eval.json").read_text())
        assert record["values"]["num_images"] == 3 and record["weights"] == "ema"
        assert record["values"]["psnr"] > 0
        assert set(record["baselines"]) == {"mean_colour", "avg_pool"}
        assert tuple(record) == EVAL_FIELDS  # the declared record, timings included
        t = record["timings"]
        assert t["wall_s"] >= t["batches_s"] > 0 and t["img_s"] == 3 / t["wall_s"]
        assert t["gpu_idle_s"] is None  # a CPU
    assert "3 images in" in done.stdout
    assert not (sweep / "broken" / "eval.json").exists()
    assert pending_runs(sweep) == []
    again = _run(str(sweep), cwd=tmp_path)
    assert again.returncode == 0 and "nothing to evaluate" in again.stdout

    bad = _run(f"path={tmp_path / 'missing'}", cwd=tmp_path)
    assert bad.returncode == 2 and "no such checkpoint or run folder" in bad.stderr
    before = (sweep / "other" / "eval.json").read_text()
    for args, says in ((("num_images=-5",), "error: num_images: expected null"),
                       (("device=tpu",), "error: device: expected auto|cpu|cuda, got 'tpu'"),
                       (("+run.eval.batch_size=0",), "config error: eval.batch_size: expected"),
                       (("compile_cache_dir=3",), "error: compile_cache_dir: expected null or")):
        bad = _run(str(sweep / "other"), *args, cwd=tmp_path)
        lines = [line for line in bad.stderr.splitlines() if line.strip()]
        assert bad.returncode == 2 and says in lines[-1], (args, bad.stderr[-2000:])
    assert (sweep / "other" / "eval.json").read_text() == before  # nothing overwritten


def test_evaluate_compiles_into_its_compile_cache_dir(tmp_path, monkeypatch):
    """python -m wetok.evaluate's compile_cache_dir is Inductor's cache folder for the pass, the
    run's train.cpu_threads its torch CPU threads (16 threads beside 14 loader workers made the
    host's torch.unique of codebook usage 60x slower on the H200 machine), train.deterministic
    and train.dist_timeout_s its kernels and collective timeout (sharded == one process on a
    GPU needs the same kernels in both); its timings place the call in time."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    from wetok import distributed
    from wetok.evaluate import evaluate_checkpoint
    from wetok.train import train

    run = tmp_path / "run"
    train(make_cfg("train.steps=1", f"run_dir={run}"))
    calls = []
    real_setup = distributed.setup
    monkeypatch.setattr(distributed, "setup", lambda *a: calls.append(a) or real_setup(*a))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "unset below")  # restored after the test
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        opts = compose("evaluate", overrides=[f"path={run}", "num_images=2",
                                              f"compile_cache_dir={tmp_path / 'cc'}",
                                              "+run.train.cpu_threads=1",
                                              "+run.train.deterministic=true",
                                              "+run.train.dist_timeout_s=45"])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        t0 = time.time()
        record = evaluate_checkpoint(opts)
        assert record["values"]["num_images"] == 2
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    assert cache_dir() == str(tmp_path / "cc")
    # device, eval.cudnn_benchmark (false; not the run's train.cudnn_benchmark, true), the two
    # +run overrides above
    assert calls == [("auto", False, 45, True)]
    t = record["timings"]
    assert t0 <= t["started_at"] < t["finished_at"] <= time.time()
    load = t["checkpoint_s"] + t["device_s"] + t["model_s"]
    assert min(t["checkpoint_s"], t["device_s"], t["model_s"]) >= 0
    assert 0 < load < t["finished_at"] - t["started_at"] - t["wall_s"] + 1e-3
    assert 0 <= t["loader_s"] <= t["setup_s"] < t["wall_s"]
    assert 0 < t["first_step_s"] < t["wall_s"]


def test_idle_between_sums_the_gaps_from_each_end_to_the_next_start():
    """evaluate_model's gpu_idle_s: the device's waits for the host between batches only (not
    the batches' own time), from (start, end) event pairs; events stand in for CUDA's here."""
    from wetok.evaluate import idle_between

    class Event:  # a CUDA event's elapsed_time(other): milliseconds from self to other
        def __init__(self, ms):
            self.ms = ms

        def elapsed_time(self, other):
            return other.ms - self.ms

    marks = [(Event(0), Event(100)), (Event(100), Event(250)), (Event(275), Event(400)),
             (Event(1400), Event(1500))]
    assert idle_between(marks) == pytest.approx((0 + 25 + 1000) / 1e3)
    assert idle_between(marks[:1]) == 0 == idle_between([])
