"""Evaluation benchmark: img/s and peak memory of the whole evaluation and of each part.

    python -m wetok.bench.evaluate                                   # paper ablation model, 256^2
    python -m wetok.bench.evaluate --overrides experiment=table06_gfq eval.compile=true

The model is randomly initialised (speed does not depend on its weights). LPIPS and Inception
use their pretrained files when both are found, else seeded RANDOM weights -- the same compute,
labelled so, their values meaningless (none is printed).

Parts: each on ``--steps`` fixed device batches of eval.batch_size after ``--warmup`` batches
(CUDA events): the model (``EvalPass.reconstruct``: encode + decode under the run's
precision), PSNR + SSIM, LPIPS, Inception features (references and reconstructions), the two
baselines, codebook usage, and one whole ``EvalPass.step``; the data loader alone (JPEG
decode + resize + crop in eval.num_workers workers). Whole evaluation: ``evaluate_model`` end
to end (loader, model, every metric, the final FID) on ``--images`` JPEG files (500x375, like
ImageNet val; a temporary image folder of exactly that many per size), after one warm-up pass;
each size gets its own peak memory, so that memory flat in the number of images shows, and
its seconds of set-up, wait for the first batch, first step, batches (and how much of them
the main process waited for the loader, and the GPU sat idle between batches: the host bound)
and result (``evaluate_model``'s ``timings``). Each size runs twice: the first pass over its
images, and a later one (baselines and the references' rFID statistics from the cache, as in
a run's later evaluations). The 50k-image time is start-up + 50,000 / the rate between the two
sizes (at least 20 batches apart), for either pass; its start-up leaves out what a process
pays once, printed apart: the metric networks' construction and the first step's compilation.

``step_rows`` times the same two ``EvalPass`` calls on a training run's EMA model for the
evaluation rows of ``wetok.bench.train_step``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch._inductor.runtime.cache_dir_utils import cache_dir

from wetok import distributed
from wetok import metrics as M
from wetok import weights as W
from wetok.baselines import BASELINES, predict
from wetok.bench.common import compose_config, free, inputs, spread, sync, time_calls
from wetok.config import use_compile_cache
from wetok.evaluate import EvalPass, evaluate_model, evaluating
from wetok.model import build_model

DEFAULT_OVERRIDES = ["experiment=table06_gfq", "eval.batch_size=64", "eval.num_workers=12"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="wetok-bench-eval", description=__doc__.splitlines()[0])
    p.add_argument("--overrides", nargs="*", default=DEFAULT_OVERRIDES,
                   help="config overrides (default: %(default)s)")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, nargs=2, default=[1000, 5000],
                   help="two whole-evaluation sizes (images)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--parts-only", action="store_true",
                   help="the parts and the loader only (a quick comparison of settings)")
    return p.parse_args(argv)


def _photo(args) -> None:
    """A smooth random 500x375 picture with fine noise, as a JPEG (decode cost like a photo)."""
    path, seed = args
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
    img = np.asarray(small.resize((500, 375), Image.BICUBIC), dtype=np.int16)
    img = np.clip(img + rng.integers(-8, 9, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, quality=90)


def write_folders(root: Path, sizes: list[int]) -> dict[int, Path]:
    """max(sizes) JPEGs once, and per size an image folder of exactly that many (links), so
    that every timed evaluation reads its folder to the end: one cut short would pay for its
    DataLoader workers' prefetch of batches it never uses (24 batches at 12 workers), which
    made the first size slower and the rate between the sizes too high."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    paths = [photos / f"{i:06d}.jpg" for i in range(max(sizes))]
    with Pool() as pool:
        pool.map(_photo, [(p, i) for i, p in enumerate(paths)], 64)
    folders = {}
    for n in sorted(set(sizes)):
        folders[n] = root / f"n{n}"
        (folders[n] / "val" / "x").mkdir(parents=True)
        (folders[n] / "train" / "x").mkdir(parents=True)
        (folders[n] / "train" / "x" / "0.jpg").symlink_to(paths[0])
        for p in paths[:n]:
            (folders[n] / "val" / "x" / p.name).symlink_to(p)
    return folders


@torch.no_grad()
def step_rows(model, loss, cfg, device, warmup: int, steps: int, buffers: int) -> list[dict]:
    """Evaluation img/s of a training run's (EMA) model for ``wetok.bench.train_step``: per batch
    what ``evaluate_model`` does (``EvalPass.step``, no loader), then encode + decode alone, on
    ``buffers`` fixed device batches of eval.batch_size."""
    bs = cfg.eval.batch_size
    bufs = inputs(buffers, bs, cfg.data.image_size, device, channels_last=False, seed=4321)
    run = EvalPass(model, cfg, device, loss)
    skipped = run.evaluator.skipped
    used = [m for m in cfg.eval.metrics if m not in skipped]
    rows = []
    with evaluating(model):
        for label, fn in ((f"eval: EMA encode+decode+metrics ({','.join(used) or 'none'})"
                           f" + val loss", run.step),
                          ("eval: EMA encode+decode only", run.reconstruct)):
            times = time_calls(fn, bufs, device, warmup, steps)
            med = statistics.median(times)
            rows.append({"mode": label, "status": "ok", "ms_median": med, "img_s": bs * 1e3 / med,
                         **spread(times), "images_per_step": bs,
                         "note": "skipped: " + ", ".join(sorted(skipped)) if skipped else ""})
    return rows


@torch.no_grad()
def first_step(model, cfg, device, random_weights: bool) -> dict:
    """What a fresh process pays once before its first evaluation's batches: the EvalPass
    (metric networks built and moved) and its first step (with eval.compile: the model's and
    the metric networks' compilation, from Inductor's on-disk cache when it holds them:
    ``compile_cache`` says whether compile_cache_dir held files before)."""
    cache = Path(cache_dir())  # TORCHINDUCTOR_CACHE_DIR (use_compile_cache) or Inductor's /tmp
    filled = any(cache.iterdir())
    t0 = time.perf_counter()
    run = EvalPass(model, cfg, device, random_weights=random_weights)
    t1 = time.perf_counter()
    x = inputs(1, cfg.eval.batch_size, cfg.data.image_size, device, False, seed=1)[0]
    with evaluating(model):
        run.step(x)
    sync(device)
    return {"eval_pass_s": t1 - t0, "first_step_s": time.perf_counter() - t1,
            "compile_cache": f"{cache} ({'filled' if filled else 'empty'} before)"}


@torch.no_grad()
def bench_parts(run: EvalPass, cfg, device, args) -> list[dict]:
    bs, size = cfg.eval.batch_size, cfg.data.image_size
    xs = inputs(2, bs, size, device, run.channels_last, seed=0)
    ev = run.evaluator
    outs = [run.reconstruct(x) for x in xs]
    u8 = [(M.to_uint8(x), M.to_uint8(x_rec)) for x, x_rec, _ in outs]
    idx = [indices for _, _, indices in outs]
    pairs = list(range(len(xs)))
    psnr, ssim = M.pixel_metrics(bool(cfg.eval.get("compile")))  # as the Evaluator runs them
    parts = {
        "model: encode + decode": lambda i: run.reconstruct(xs[i]),
        "PSNR + SSIM": lambda i: (psnr(*u8[i]).sum(), ssim(*u8[i]).sum()),
        "baselines (2 predictors, PSNR + SSIM)": lambda i: [
            (psnr(u8[i][0], M.to_uint8(p)).sum(), ssim(u8[i][0], M.to_uint8(p)).sum())
            for p in (predict(n, xs[i], run.factor) for n in BASELINES)],
        "codebook usage": lambda i: run.usage.update(idx[i]),
        "EvalPass.step (all of it)": lambda i: run.step(xs[i]),
    }
    if ev._lpips is not None:
        parts["LPIPS"] = lambda i: ev._lpips(u8[i][0].float() / 127.5 - 1,
                                             u8[i][1].float() / 127.5 - 1).sum()
    if ev._inception is not None:
        parts["Inception features (real + rec)"] = lambda i: [ev._inception(t)[0].sum()
                                                             for t in u8[i]]
    rows = []
    for name, fn in parts.items():
        ms = statistics.median(time_calls(fn, pairs, device, args.warmup, args.steps))
        rows.append({"part": name, "ms_per_batch": ms, "img_s": bs * 1e3 / ms})
    return rows


def bench_loader(cfg, device, n: int) -> dict:
    from wetok.data import build_loader

    loader, _ = build_loader(cfg.data, "val", cfg.eval.batch_size, seed=0,
                             num_workers=cfg.eval.num_workers,
                             pin_memory=device.type == "cuda")
    t0, seen, first = time.perf_counter(), 0, None
    for x in loader:
        if first is None:  # workers started and the first batch made: start-up, not rate
            first, t1 = len(x), time.perf_counter()
        seen += len(x)
        if seen >= n and seen > first:
            break
    wall = time.perf_counter() - t1
    return {"part": f"data loader alone ({cfg.eval.num_workers} workers, host; start-up "
                    f"{t1 - t0:.2f} s left out)",
            "ms_per_batch": wall * 1e3 * cfg.eval.batch_size / (seen - first),
            "img_s": (seen - first) / wall}


def with_root(cfg, root: Path):
    return OmegaConf.merge(cfg, {"data": {"root": str(root)}})


def bench_whole(model, cfg, device, n: int, random_weights: bool) -> dict:
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timings = {}  # its wall_s and img_s: the whole call, the device done
    values, skipped, _ = evaluate_model(model, cfg, device, num_images=n,
                                        random_weights=random_weights, timings=timings)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    assert values["num_images"] == n, values["num_images"]
    return {"images": n, "peak_gib": peak, **timings,
            "metrics": sorted(k for k in values if k in ("psnr", "ssim") or "lpips" in k
                              or "rfid" in k), "skipped": sorted(skipped)}


def metric_weights_missing() -> bool:
    """Whether LPIPS' VGG16 or Inception's file is missing (the benchmarks then use RANDOM
    weights: the same compute)."""
    try:
        W.find_weights("vgg16", None), W.find_weights("inception", None)
        return False
    except W.MissingWeightsError:
        return True


def folder_config(overrides: list[str], root: Path, tmp: Path, device: torch.device):
    """The config with an image folder as validation data and a temporary cache."""
    return compose_config([*overrides, "data=imagenet", f"data.root={root}",
                           f"eval.cache_dir={tmp}/cache", f"train.device={device.type}",
                           "run_dir=unused"])


def random_model(cfg, device: torch.device) -> torch.nn.Module:
    """A seeded randomly initialised model in eval mode, laid out as evaluation runs it, in a
    process set up as `python -m wetok.evaluate` runs (eval.cudnn_benchmark, train.cpu_threads,
    compile cache)."""
    torch.backends.cudnn.benchmark = cfg.eval.cudnn_benchmark
    torch.set_num_threads(distributed.cpu_threads(cfg.train.cpu_threads, device))
    use_compile_cache(cfg)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quantizer).to(device).eval()
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def run(args) -> dict:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    random_weights = metric_weights_missing()
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_folders(Path(tmp), args.images)
        cfg = folder_config(args.overrides, folders[max(args.images)], Path(tmp), device)
        if max(args.images) <= cfg.eval.batch_size:  # the loader's rate needs two batches
            raise SystemExit(f"--images: expected a size above eval.batch_size="
                             f"{cfg.eval.batch_size}, got {args.images}")
        model = random_model(cfg, device)
        one_time = first_step(model, cfg, device, random_weights)
        run_ = EvalPass(model, cfg, device, random_weights=random_weights)
        parts = bench_parts(run_, cfg, device, args)
        parts.append(bench_loader(cfg, device, min(args.images)))
        whole = []
        if not args.parts_only:  # warm-up first
            bench_whole(model, cfg, device, cfg.eval.batch_size * 4, random_weights)
        for kind in () if args.parts_only else ("first", "cached"):
            for n in args.images:
                whole.append({**bench_whole(model, with_root(cfg, folders[n]), device, n,
                                            random_weights), "pass": kind})
                print(f"whole evaluation, {kind} pass: {json.dumps(whole[-1])}", flush=True)
    info = {"one_time": one_time,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "overrides": args.overrides,
            "batch_size": cfg.eval.batch_size, "image_size": cfg.data.image_size,
            "precision": cfg.train.precision, "compile": bool(cfg.eval.compile),
            "cpu_threads": torch.get_num_threads(),
            "weights": "RANDOM Inception and VGG16 (files missing)" if random_weights
            else "pretrained Inception and VGG16"}
    bs = cfg.eval.batch_size
    result = {"info": info, "parts": parts, "whole": whole,
              **{kind: steady(*(w for w in whole if w["pass"] == kind), bs) if whole else
                 {"steady_img_s": None, "why_none": "not run (--parts-only)"}
                 for kind in ("first", "cached")}}
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


MIN_BATCHES_APART = 20  # fewer: the time difference is mostly noise (see docs/evaluation_speed.md)


def steady(a: dict, b: dict, batch_size: int) -> dict:
    """The rate between two sizes (the larger one's extra time), the start-up it leaves, and
    the 50,000-image time they imply; None (with the reason) when the sizes are too close."""
    apart = (b["images"] - a["images"]) / batch_size
    dt = b["wall_s"] - a["wall_s"]
    if apart < MIN_BATCHES_APART or dt <= 0:
        return {"steady_img_s": None, "startup_s": None, "implied_50k_s": None,
                "why_none": f"the sizes {a['images']} and {b['images']} are {apart:g} batches "
                            f"apart (a rate needs {MIN_BATCHES_APART}) or took no longer"}
    rate = (b["images"] - a["images"]) / dt
    startup = max(0.0, a["wall_s"] - a["images"] / rate)
    return {"steady_img_s": rate, "startup_s": startup, "implied_50k_s": startup + 50000 / rate}


def render(r: dict) -> str:
    info, bs = r["info"], r["info"]["batch_size"]
    if r["first"]["steady_img_s"]:
        basis, per_batch_ms = "whole-evaluation time", bs * 1e3 / r["first"]["steady_img_s"]
    else:  # no steady rate: shares of the per-batch work instead
        basis = "EvalPass.step"
        per_batch_ms = next(p["ms_per_batch"] for p in r["parts"] if "EvalPass" in p["part"])
    lines = [f"device: {info['device']} (torch {info['torch']}); config: {' '.join(info['overrides'])}"
             f"; batch {bs}, {info['image_size']}^2, precision {info['precision']}"
             f", eval.compile={info['compile']}, torch CPU threads {info['cpu_threads']} "
             f"(train.cpu_threads); metric networks: {info['weights']}",
             f"once per process: metric networks built in {info['one_time']['eval_pass_s']:.1f}"
             f" s, first step (compilation with eval.compile) "
             f"{info['one_time']['first_step_s']:.1f} s; Inductor cache "
             f"{info['one_time']['compile_cache']}", "",
             f"| part | ms/batch | img/s | share of {basis} |", "|---|---|---|---|"]
    for p in r["parts"]:
        lines.append(f"| {p['part']} | {p['ms_per_batch']:.1f} | {p['img_s']:.0f} | "
                     f"{100 * p['ms_per_batch'] / per_batch_ms:.0f}% |")
    if r["whole"]:
        lines += ["", "| whole evaluation | pass | images | wall s | img/s | peak GiB | set-up s |"
                  " first batch s | first step s | batches s | of which loader wait s | GPU idle s |"
                  " result s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in r["whole"]:
        peak = "-" if w["peak_gib"] is None else f"{w['peak_gib']:.2f}"
        idle = "-" if w["gpu_idle_s"] is None else f"{w['gpu_idle_s']:.1f}"
        lines.append(f"| evaluate_model ({', '.join(w['metrics'])}) | {w['pass']} | "
                     f"{w['images']} | {w['wall_s']:.1f} | {w['img_s']:.0f} | {peak} | "
                     f"{w['setup_s']:.1f} | {w['first_batch_s']:.1f} | {w['first_step_s']:.1f} | "
                     f"{w['batches_s']:.1f} | "
                     f"{w['loader_wait_s']:.1f} | {idle} | {w['result_s']:.1f} |")
    lines.append("")
    for label, v in (("first pass over a data set", r["first"]),
                     ("later passes (baselines and references' statistics cached)", r["cached"])):
        lines.append(f"{label}: no steady rate: {v['why_none']}" if v["steady_img_s"] is None
                     else f"{label}: steady rate {v['steady_img_s']:.0f} img/s, start-up "
                          f"{v['startup_s']:.1f} s: 50,000 images in {v['implied_50k_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
