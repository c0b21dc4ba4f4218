"""Is the whole evaluation GPU-bound? The real loop (image folder -> DataLoader workers ->
``EvalPass.step``) with a torch.profiler trace of a few steady batches.

    python tools/eval_gpu_profile.py --batches 130           # on the GPU (bash tools/gpu_report.sh profile OUT)

Two passes over the same JPEG folder (the evaluation benchmark's 500x375 files): the first
over a data set (baselines and the references' Inception features computed) and a later one
(both read from eval.cache_dir, as the first pass wrote them). Per window of 20 batches: the
wall ms per batch and the ms per batch the main process waited for the loader. For the
profiled batches: the GPU's busy share (union of its kernels' and copies' intervals over
their span), its largest gaps, and the top operators by GPU time. The model is randomly
initialised and LPIPS / Inception have RANDOM weights when their files are missing (speed
only; no values are printed).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from wetok.bench.common import compose_config, sync
from wetok.bench.evaluate import (DEFAULT_OVERRIDES, folder_config, metric_weights_missing,
                                  random_model, write_folders)
from wetok.data import build_loader
from wetok.evaluate import EvalPass, evaluating

WINDOW = 20


def busy_share(intervals: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """-> (span, busy time, the 5 largest gaps) of non-empty (start, end) intervals."""
    intervals = sorted(intervals)
    busy, gaps, (lo, hi) = 0.0, [], intervals[0]
    for start, end in intervals[1:]:
        if start > hi:
            busy, gaps, lo = busy + hi - lo, gaps + [start - hi], start
        hi = max(hi, end)
    busy += hi - lo
    return max(e for _, e in intervals) - intervals[0][0], busy, sorted(gaps)[-5:]


def profiled_pass(run: EvalPass, cfg, device, args, label: str) -> None:
    loader, stats = build_loader(cfg.data, "val", cfg.eval.batch_size, seed=0,
                                 num_workers=cfg.eval.num_workers,
                                 pin_memory=device.type == "cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    prof, stamps, waits = profile(activities=activities), [], []
    first, last = args.profile_at, args.profile_at + args.profile_batches - 1
    with evaluating(run.model):
        for i, x in enumerate(_timed(loader, waits)):
            if i == first:
                prof.__enter__()
            run.step(x)
            if i == last:
                sync(device)
                prof.__exit__(None, None, None)
            stamps.append(time.perf_counter())
    sync(device)
    run.result(bad_images=stats.skipped)  # a first pass writes the caches the later one reads
    for a in range(WINDOW // 2, len(stamps) - WINDOW, WINDOW):
        print(f"{label}: batches {a}-{a + WINDOW}: "
              f"{(stamps[a + WINDOW] - stamps[a]) / WINDOW * 1e3:.1f} ms/batch, loader wait "
              f"{sum(waits[a + 1:a + WINDOW + 1]) / WINDOW * 1e3:.2f} ms/batch")
    gpu = [(e.time_range.start, e.time_range.end) for e in prof.events()
           if e.device_type == torch.autograd.DeviceType.CUDA]
    if gpu:
        span, busy, gaps = busy_share(gpu)
        n = args.profile_batches
        print(f"{label}: {n} profiled batches: GPU span {span / n / 1e3:.1f} ms/batch, busy "
              f"{busy / n / 1e3:.1f} ms/batch ({100 * busy / span:.0f}%), largest gaps (us): "
              f"{[round(g) for g in gaps]}")
    table = prof.key_averages()
    if gpu:
        print(table.table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
    print(table.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))


def _timed(loader, waits: list):
    """The loader's batches, appending to waits the seconds each took to arrive."""
    batches = iter(loader)
    while True:
        t = time.perf_counter()
        x = next(batches, None)
        waits.append(time.perf_counter() - t)
        if x is None:
            return
        yield x


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, default=130, help="batches per pass")
    p.add_argument("--profile-at", type=int, default=60, help="first profiled batch")
    p.add_argument("--profile-batches", type=int, default=3)
    p.add_argument("--overrides", nargs="*", default=[*DEFAULT_OVERRIDES, "eval.compile=true"])
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.profile_at + args.profile_batches > args.batches:
        raise SystemExit("--profile-at + --profile-batches: expected at most --batches")
    random_weights = metric_weights_missing()
    with tempfile.TemporaryDirectory() as tmp:
        n = args.batches * compose_config(args.overrides).eval.batch_size
        cfg = folder_config(args.overrides, write_folders(Path(tmp), [n])[n], Path(tmp), device)
        model = random_model(cfg, device)
        print(f"device: {device}; {torch.get_num_threads()} CPU threads in the main process "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}); config: "
              f"{' '.join(args.overrides)}; metric networks: "
              f"{'RANDOM weights' if random_weights else 'pretrained'}")
        for label in ("first pass", "later pass"):
            run = EvalPass(model, cfg, device, fid_ref_name="profile",
                           random_weights=random_weights)
            profiled_pass(run, cfg, device, args, label)


if __name__ == "__main__":
    main()
