"""Throughput, peak memory and FLOPs of one full training step, plus evaluation throughput.

    python -m wetok.bench.train_step                                  # paper ablation config
    python -m wetok.bench.train_step --modes eager compile --gn-silu recompute plain \\
        --csv bench.csv --json bench.json
    python -m wetok.bench.train_step --device cpu --image-size 32 --batch-size 2 \\
        --warmup 1 --steps 2 --overrides model=tiny                  # CPU smoke run
    torchrun --nproc_per_node=2 -m wetok.bench.train_step --eval-steps 0   # DDP, 2 GPUs

Under torchrun (DDP, one process per GPU, `--batch-size` per GPU) the row holds the whole job:
img/s = ranks x images per rank per step / the slowest rank's median step, peak GiB = the
largest per-GPU peak, ``gpus`` = the world size; rank 0 prints and writes the files.

Setting (the paper's ablation): C=128, channel_mult [1,1,2,2,4], B=4 (``model=c128_b4``),
256^2, batch 16, GQ g=4 d'=8 (``quantizer=gq``), L1 + LPIPS + 0.1 GAN + LeCam (``loss=default``).
Extra Hydra overrides (``--overrides key=value ...``) come last and win.

One step = ``Trainer.train_step`` exactly as training runs it: generator forward + backward +
Adam, discriminator (hinge + LeCam, real and reconstructions in one forward) + Adam, EMA, under
bf16 autocast and channels_last on CUDA; ``compile`` builds the Trainer with
``train.compile=true``. Inputs: a few fixed random batches already on the device, rotated.
Time: median over ``--steps`` timed steps after ``--warmup`` steps (CUDA events around each
step on the GPU, perf_counter on the CPU); img/s = images per step / median step time. compile s
= the warm-up steps' excess wall time over the median step (compilation, autotuning).
Peak memory: ``reset_peak_memory_stats`` after the warm-up, ``max_memory_allocated`` after the
timed steps (``max_memory_reserved`` with CUDA graphs, whose pools are not "allocated").
TFLOP/step: ``torch.utils.flop_counter.FlopCounterMode`` over one eager step (matmul/conv ops
only, forward + backward), counted after the timing.

LPIPS: when ``vgg16-397923af.pth`` is missing (``--lpips auto``) or with ``--lpips random``, the
loss's LPIPS gets a seeded RANDOM VGG trunk: the same compute, values meaningless (none is
reported). The Trainer is then built with ``loss.perceptual_weight=0`` (so it does not ask for the
weights file) and its loss is replaced by ``WeTokLoss.from_config(..., random_lpips=True)`` built
from the real loss config; nothing in the library is patched.

Evaluation img/s: the EMA model on fixed device batches of ``eval.batch_size``, per batch what
``wetok.evaluate.evaluate_model`` does (``EvalPass.step``: encode + decode, val loss, metrics,
baselines, codebook usage), no data loading; metrics whose weights are missing (lpips, rfid) are skipped by
the Evaluator as in training. Also the model alone (encode + decode).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
REFERENCE = {"name": "Open-MAGVIT2 reference code (H100)", "ms_per_step": 318.0, "img_s": 50.0,
             "peak_gib": 50.7}
TARGET = {"img_s": 150.0, "peak_gib": 25.0}
FIELDS = ("mode", "gpus", "status", "ms_median", "img_s", "peak_gib", "compile_s", "tflop_step",
          "tflop_s", "ms_p10", "ms_p90", "ms_min", "ms_max", "wall_img_s", "images_per_step",
          "gn_silu", "note")

log = logging.getLogger("wetok.bench.train_step")


# ---- config ----------------------------------------------------------------------------------
def base_overrides(args) -> list[str]:
    return ["model=c128_b4", "quantizer=gq", "quantizer.groups=4", "quantizer.group_dim=8",
            "quantizer.dim=null", "loss=default", "logger=none",
            f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
            "train.global_batch_size=null", "train.precision=auto", "train.channels_last=true"]


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import wetok.config  # noqa: F401  (registers the run_id resolver)

    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def _lpips_weights_found(cfg) -> bool:
    from wetok import weights

    try:
        weights.resolve("vgg16", cfg.weights)
        return True
    except weights.MissingWeightsError:
        return False


def build_trainer(cfg, random_lpips: bool):
    """A Trainer for cfg; with random_lpips its loss's LPIPS has a random VGG trunk (see module
    docstring), built without changing the library."""
    from omegaconf import OmegaConf

    from wetok.losses import WeTokLoss
    from wetok.train import Trainer

    if not random_lpips or cfg.loss.perceptual_weight <= 0:
        return Trainer(cfg)
    no_lpips = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    no_lpips.loss.perceptual_weight = 0.0
    trainer = Trainer(no_lpips)
    trainer.loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights,
                                         random_lpips=True).to(trainer.device)
    trainer.cfg = cfg  # the config the step runs (perceptual_weight as composed)
    return trainer


# ---- helpers ---------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower())


def _inputs(n: int, batch: int, size: int, device: torch.device, channels_last: bool,
            seed: int = 1234) -> list[torch.Tensor]:
    """n fixed random image batches in [-1, 1] on the device (never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return out


def _unique_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # private API: only used for a warning
        return None


def _dynamo_reset() -> None:
    """Fresh torch.compile state, so that compile time is measured from scratch."""
    import torch._dynamo as dynamo

    dynamo.reset()


class _StepTimer:
    """Per-step times in ms: CUDA events on the GPU (read after one final synchronize),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.pairs: list = []

    @contextlib.contextmanager
    def step(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.pairs.append((t0, time.perf_counter()))

    def times_ms(self) -> list[float]:
        _sync(self.device)
        if self.cuda:
            return [s.elapsed_time(e) for s, e in self.pairs]
        return [(e - s) * 1e3 for s, e in self.pairs]


def _world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _max_over_ranks(device: torch.device, *values: float | None) -> list[float | None]:
    """Each value's maximum over the DDP ranks (None stays None: no GPU counter)."""
    if _world() == 1:
        return list(values)
    t = torch.tensor([-1.0 if v is None else v for v in values], device=device,
                     dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [None if v is None else float(x) for v, x in zip(values, t.tolist())]


def _quantile(values: list[float], q: float) -> float:
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def count_flops(trainer, batches) -> float:
    """FLOPs of one eager train_step (compiled wrappers are bypassed for the count)."""
    from torch.utils.flop_counter import FlopCounterMode

    g, d = trainer.g_model, trainer.d_model
    trainer.g_model = getattr(g, "_orig_mod", g)
    trainer.d_model = getattr(d, "_orig_mod", d)
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batches)
        _sync(trainer.device)
        return float(counter.get_total_flops())
    finally:
        trainer.g_model, trainer.d_model = g, d


# ---- the training step -----------------------------------------------------------------------
def bench_train(trainer, args, label: str, gn_silu: str) -> dict:
    dev = trainer.device
    cfg = trainer.cfg
    accum = trainer.accum
    channels_last = dev.type == "cuda" and cfg.train.channels_last
    bufs = _inputs(max(args.buffers, accum), cfg.train.batch_size, cfg.data.image_size, dev,
                   channels_last)
    images = cfg.train.batch_size * accum * _world()  # the whole job's images per step
    k = 0

    def next_batches():
        nonlocal k
        out = [bufs[(k + j) % len(bufs)] for j in range(accum)]
        k += accum
        return out

    warm = []
    for _ in range(args.warmup):
        _sync(dev)
        t0 = time.perf_counter()
        logs = trainer.train_step(next_batches())
        _sync(dev)
        warm.append(time.perf_counter() - t0)
    loss0 = float(logs["loss"]) if args.warmup else None
    graphs0 = _unique_graphs()

    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timer = _StepTimer(dev)
    t_wall = time.perf_counter()
    for _ in range(args.steps):
        with timer.step():
            logs = trainer.train_step(next_batches())
    times = timer.times_ms()  # synchronizes
    wall = time.perf_counter() - t_wall
    peak = None
    if dev.type == "cuda":  # CUDA graph pools hold their tensors outside "allocated"
        peak = (torch.cuda.max_memory_reserved(dev) if trainer.cudagraphs
                else torch.cuda.max_memory_allocated(dev)) / GIB
    loss = float(logs["loss"])

    notes = []
    finite = math.isfinite(loss) and (loss0 is None or math.isfinite(loss0))
    if not finite:
        notes.append(f"non-finite loss {loss}")
    if trainer.cudagraphs:
        notes.append("peak = reserved memory (CUDA graph pools)")
    graphs1 = _unique_graphs()
    if label == "compile" and graphs0 is not None and graphs1 is not None and graphs1 > graphs0:
        notes.append(f"recompiled during timed steps ({graphs1 - graphs0} graphs): "
                     "raise --warmup")

    med, peak, wall = _max_over_ranks(dev, statistics.median(times), peak, wall)
    row = {"mode": label, "gpus": _world(), "status": "ok", "ms_median": med,
           "img_s": images * 1e3 / med,
           "peak_gib": peak,
           "compile_s": sum(max(0.0, t - med / 1e3) for t in warm) if warm else None,
           "ms_p10": _quantile(times, 0.1), "ms_p90": _quantile(times, 0.9),
           "ms_min": min(times), "ms_max": max(times),
           "wall_img_s": images * args.steps / wall, "images_per_step": images,
           "gn_silu": gn_silu, "tflop_step": None, "tflop_s": None,
           "warmup_s": warm, "times_ms": times, "loss_finite": finite}
    if args.flops:
        try:
            flops = count_flops(trainer, next_batches())
            row["tflop_step"] = flops / 1e12
            row["tflop_s"] = row["tflop_step"] / (med / 1e3)
        except Exception as exc:  # the count is a bonus: never lose the timing for it
            notes.append(f"FLOP count failed: {type(exc).__name__}: {exc}")
    if args.profile:
        row["profile"] = profile_table(trainer, next_batches, args.profile)
    row["note"] = "; ".join(notes)
    return row


def profile_table(trainer, next_batches, steps: int, rows: int = 50) -> str:
    """torch.profiler over a few steps: the kernels that take the device's time, heaviest first;
    on a GPU their time per kernel family; then the dtype/layout copies (``aten::copy_``) by
    input shape and by call site, which say where such copies come from."""
    from torch.profiler import ProfilerActivity, profile

    dev = trainer.device
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        for _ in range(steps):
            trainer.train_step(next_batches())
        _sync(dev)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = "device_time_total" if cuda else "cpu_time_total"
    averages = prof.key_averages()
    parts = [averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)]
    if cuda:
        parts.append(_kernel_families(averages, steps))
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                       if e.key == "aten::copy_"), key=lambda e: getattr(e, total), reverse=True)
    parts.append("\n".join(["aten::copy_ by input shape:"] + [
        f"  {getattr(e, total) / 1e3:9.2f} ms  x{e.count:<5d} {e.input_shapes}"
        for e in by_shape[:12]]))
    parts.append(_copy_sites(prof.events(), total))
    return "\n\n".join(parts)


def _kernel_family(name: str) -> str:
    name = name.lower()
    if any(k in name for k in ("xmma", "cudnn", "gemm", "conv", "cutlass", "sm90", "sm80")):
        return "conv/gemm (cuDNN, cuBLAS)"
    if name.startswith("triton"):
        return "triton (inductor)"
    if "elementwise" in name or "copy" in name:
        return "aten elementwise/copy"
    if any(k in name for k in ("reduce", "norm", "moments", "gradients")):
        return "aten reductions/norms"
    return "other"


def _kernel_families(averages, steps: int) -> str:
    """Device time per step by kernel family (GPU kernels only, not the '##' annotations)."""
    kinds: dict[str, float] = {}
    for e in averages:
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("##"):
            kind = _kernel_family(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
    step_total = sum(kinds.values())
    return "\n".join(["device time per step by kernel family:"] + [
        f"  {t / 1e3 / steps:8.2f} ms  {100 * t / step_total:5.1f}%  {kind}"
        for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1])])


def _copy_sites(events, total: str, rows: int = 15) -> str:
    """aten::copy_ grouped by call site: the ops around it and the nearest non-torch frame."""
    sites: dict[str, list] = {}
    for e in events:
        if e.name != "aten::copy_":
            continue
        ops, frame, outer = [], "(no Python frame)", e.cpu_parent
        while outer is not None:
            if ".py(" in outer.name:
                if "torch/" not in outer.name:
                    frame = outer.name
                    break
            elif len(ops) < 3:
                ops.append(outer.name)
            outer = outer.cpu_parent
        acc = sites.setdefault(f"{' <- '.join(ops) or '-'} @ {frame}", [0.0, 0])
        acc[0] += getattr(e, total)
        acc[1] += 1
    return "\n".join(["aten::copy_ by call site:"] + [
        f"  {t / 1e3:9.2f} ms  x{n:<5d} {site}"
        for site, (t, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]])


# ---- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def bench_eval(trainer, args) -> list[dict]:
    """Evaluation throughput of the EMA model: per batch what evaluate_model does (EvalPass.step,
    no loader)."""
    from wetok.evaluate import EvalPass, autocast

    cfg, dev = trainer.cfg, trainer.device
    model = trainer.ema
    bs = cfg.eval.batch_size
    bufs = _inputs(args.buffers, bs, cfg.data.image_size, dev, channels_last=False, seed=4321)
    run = EvalPass(model, cfg, dev, trainer.loss)
    evaluator, full = run.evaluator, run.step
    was_training = model.training
    model.eval()

    def model_only(x):  # as EvalPass.step: the run's precision
        with autocast(cfg, dev):
            run.reconstruct(model, x, run.noise)

    used = [m for m in cfg.eval.metrics if m not in evaluator.skipped]
    rows = []
    try:
        for label, fn in ((f"eval: EMA encode+decode+metrics ({','.join(used) or 'none'})"
                           f" + val loss", full),
                          ("eval: EMA encode+decode only", model_only)):
            for i in range(args.eval_warmup):
                fn(bufs[i % len(bufs)])
            _sync(dev)
            timer = _StepTimer(dev)
            for i in range(args.eval_steps):
                with timer.step():
                    fn(bufs[i % len(bufs)])
            times = timer.times_ms()
            med = statistics.median(times)
            rows.append({"mode": label, "status": "ok", "ms_median": med, "img_s": bs * 1e3 / med,
                         "ms_p10": _quantile(times, 0.1), "ms_p90": _quantile(times, 0.9),
                         "ms_min": min(times), "ms_max": max(times), "images_per_step": bs,
                         "note": "skipped: " + ", ".join(sorted(evaluator.skipped))
                         if evaluator.skipped else ""})
    finally:
        model.train(was_training)
    return rows


# ---- output ----------------------------------------------------------------------------------
def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | ms/step (median) | img/s | peak GiB | compile s | TFLOP/step | TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['status']} | - | - | - | - | - |")
            continue
        compile_s = _fmt(r.get("compile_s")) if r["mode"] == "compile" else "-"
        lines.append(f"| {r['mode']} | {_fmt(r['ms_median'])} | {_fmt(r['img_s'])} | "
                     f"{_fmt(r.get('peak_gib'), 2)} | {compile_s} | "
                     f"{_fmt(r.get('tflop_step'), 3)} | {_fmt(r.get('tflop_s'), 2)} |")
    return "\n".join(lines)


def header(info: dict) -> str:
    return "\n".join([
        "# WeTok training-step benchmark",
        f"device: {info['device_name']} | torch {info['torch']} | cuda {info['cuda']}",
        f"config: model={info['model']} (C={info['channels']}, ch_mult={info['channel_mult']}, "
        f"B={info['num_res_blocks']}), {info['image_size']}^2, batch {info['batch_size']} "
        f"x accum {info['accum']} x {info['gpus']} rank(s), GQ g={info['groups']} d'={info['group_dim']} "
        f"({info['codebook_entropy']}), loss: recon {info['recon']} + LPIPS x"
        f"{info['perceptual_weight']} + GAN x{info['gan_weight']} + LeCam x{info['lecam_weight']}",
        f"precision: {info['precision']}, channels_last={info['channels_last']}",
        f"LPIPS: {info['lpips']}",
        f"overrides: {' '.join(info['overrides'])}",
        f"measured: full Trainer.train_step (G fwd+bwd+Adam, D fwd+bwd+Adam, EMA); "
        f"{info['warmup']} warm-up steps, median of {info['steps']} timed steps "
        f"({info['timer']}); {info['buffers']} rotating random input batches on the device; "
        f"peak = max_memory_allocated over the timed steps; compile s = warm-up excess over "
        f"the median; FLOPs = FlopCounterMode over one eager step (conv/matmul only)",
    ])


def anchor_lines(rows: list[dict], cuda: bool) -> list[str]:
    ref = REFERENCE
    lines = [f"anchor: {ref['name']}: {ref['ms_per_step']:.0f} ms/step = {ref['img_s']:.0f} "
             f"img/s, peak {ref['peak_gib']} GiB; target >= {TARGET['img_s']:.0f} img/s at "
             f"<= {TARGET['peak_gib']:.0f} GiB"]
    if cuda:
        for r in rows:
            if r["status"] == "ok" and r.get("peak_gib") is not None:
                ok = r["img_s"] >= TARGET["img_s"] and r["peak_gib"] <= TARGET["peak_gib"]
                lines.append(f"  {r['mode']}: {r['img_s'] / ref['img_s']:.2f}x reference img/s, "
                             f"{r['peak_gib'] / ref['peak_gib']:.2f}x reference memory -> "
                             f"target {'met' if ok else 'not met'}")
    return lines


def _write(rows: list[dict], info: dict, eval_rows: list[dict], args) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in rows + eval_rows:
                writer.writerow({k: r.get(k) for k in FIELDS})
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": info, "train": rows, "eval": eval_rows,
                                    "reference": REFERENCE, "target": TARGET}, indent=2))


# ---- driver ----------------------------------------------------------------------------------
def run(args) -> dict:
    """Run the benchmark; returns {"info", "rows", "eval", "table", "text"} and prints."""
    import wetok.model as wmodel

    out = sys.stdout if not args.quiet and int(os.environ.get("RANK", "0")) == 0 else None
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda:  # torchrun: one GPU per rank (the Trainer sets the same)
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device_opt = "cuda" if want_cuda else "cpu"
    user = list(args.overrides or [])
    modes = []
    for mode in args.modes:
        if mode == "eager":
            modes += [("eager" if len(args.gn_silu) == 1 else f"eager gn-silu={g}", "eager", g)
                      for g in args.gn_silu]
        else:
            modes.append(("compile", "compile", "plain (compiled)"))

    tmp = tempfile.TemporaryDirectory(prefix="wetok-bench-")
    rows: list[dict] = []
    eval_rows: list[dict] = []
    old_recompute = getattr(wmodel, "_RECOMPUTE", True)
    info: dict = {}
    try:
        configs = {}
        for i, (label, mode, _) in enumerate(modes):
            configs[label] = compose_config(
                base_overrides(args) + [f"train.device={device_opt}",
                                        f"train.compile={'true' if mode == 'compile' else 'false'}",
                                        f"run_dir={Path(tmp.name) / f'mode{i}'}"] + user)
        cfg0 = compose_config(base_overrides(args) + [f"train.device={device_opt}",
                                                      f"run_dir={Path(tmp.name) / 'cfg'}"] + user)
        found = _lpips_weights_found(cfg0)
        random_lpips = cfg0.loss.perceptual_weight > 0 and (args.lpips == "random" or not found)
        if cfg0.loss.perceptual_weight <= 0:
            lpips_text = "off (loss.perceptual_weight=0)"
        elif random_lpips:
            why = "vgg16 weights missing" if not found else "--lpips random"
            lpips_text = (f"RANDOM VGG16 trunk ({why}): same compute as the pretrained trunk, "
                          "LPIPS values meaningless and not reported")
        else:
            lpips_text = "pretrained VGG16 trunk"
        dev = torch.device("cuda", torch.cuda.current_device()) if want_cuda \
            else torch.device("cpu")
        from wetok.config import accumulation_steps
        from wetok.model import resolve_channel_mult

        info = {
            "device_name": torch.cuda.get_device_name(dev) if want_cuda else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "model": cfg0.model.name, "channels": cfg0.model.channels,
            "channel_mult": resolve_channel_mult(cfg0.model),
            "num_res_blocks": cfg0.model.num_res_blocks, "image_size": cfg0.data.image_size,
            "batch_size": cfg0.train.batch_size, "accum": accumulation_steps(cfg0, _world()),
            "gpus": _world(), "groups": cfg0.quantizer.groups,
            "group_dim": cfg0.quantizer.group_dim,
            "codebook_entropy": cfg0.quantizer.entropy_mode, "recon": cfg0.loss.recon,
            "perceptual_weight": cfg0.loss.perceptual_weight, "gan_weight": cfg0.loss.gan_weight,
            "lecam_weight": cfg0.loss.lecam_weight,
            "precision": ("bf16 autocast" if cfg0.train.precision == "bf16" or (
                cfg0.train.precision == "auto" and want_cuda) else "fp32"),
            "channels_last": bool(cfg0.train.channels_last and want_cuda),
            "lpips": lpips_text, "overrides": user, "warmup": args.warmup, "steps": args.steps,
            "buffers": args.buffers, "modes": [m[0] for m in modes],
            "timer": "CUDA events per step" if want_cuda else "perf_counter per step",
        }
        if out:
            print(header(info), file=out, flush=True)

        for label, mode, gn in modes:
            row = {"mode": label, "status": "ok", "gn_silu": gn}
            trainer = None
            try:
                if mode == "eager":
                    wmodel.set_gn_silu_recompute(gn == "recompute")
                else:
                    wmodel.set_gn_silu_recompute(old_recompute)
                    _dynamo_reset()
                _free(dev)
                t0 = time.perf_counter()
                trainer = build_trainer(configs[label], random_lpips)
                info["accum"] = trainer.accum
                build_s = time.perf_counter() - t0
                row = bench_train(trainer, args, label, gn)
                row["build_s"] = build_s
                if not eval_rows and args.eval_steps > 0:
                    try:
                        eval_rows = bench_eval(trainer, args)
                    except Exception as exc:  # keep the training numbers
                        if _is_oom(exc):
                            status = "OOM"
                        else:
                            status = f"error: {type(exc).__name__}"
                            traceback.print_exc()
                        eval_rows = [{"mode": "eval", "status": status, "note": str(exc)[:300]}]
            except Exception as exc:
                if _is_oom(exc):
                    row.update(status="OOM", note=str(exc).splitlines()[0][:300])
                else:
                    traceback.print_exc()
                    row.update(status=f"error: {type(exc).__name__}",
                               note=str(exc).splitlines()[0][:300] if str(exc) else "")
            finally:
                del trainer
                _free(dev)
            rows.append(row)
            if out:
                extra = ""
                if row["status"] == "ok":
                    extra = (f"{row['ms_median']:.1f} ms/step (p10 {row['ms_p10']:.1f}, p90 "
                             f"{row['ms_p90']:.1f}), {row['img_s']:.1f} img/s, wall mean "
                             f"{row['wall_img_s']:.1f} img/s")
                print(f"[{label}] {row['status']} {extra} {row.get('note') or ''}".rstrip(),
                      file=out, flush=True)
                if row.get("profile"):
                    print(f"[{label}] profile of {args.profile} steps:\n{row['profile']}",
                          file=out, flush=True)
            _write(rows, info, eval_rows, args)  # after every mode: partial results survive
    finally:
        wmodel.set_gn_silu_recompute(old_recompute)
        tmp.cleanup()
        from wetok.distributed import teardown

        teardown()

    table = markdown(rows)
    lines = ["", table, ""] + anchor_lines(rows, want_cuda)
    for r in eval_rows:
        if r["status"] == "ok":
            lines.append(f"{r['mode']}: {r['img_s']:.1f} img/s ({r['ms_median']:.1f} ms per "
                         f"batch of {r['images_per_step']})" + (f"; {r['note']}" if r.get("note")
                                                                else ""))
        else:
            lines.append(f"{r['mode']}: {r['status']} {r.get('note', '')}")
    for r in rows:
        if r.get("note"):
            lines.append(f"note [{r['mode']}]: {r['note']}")
    text = "\n".join(lines)
    if out:
        print(text, file=out, flush=True)
    _write(rows, info, eval_rows, args)
    return {"info": info, "rows": rows, "eval": eval_rows, "table": table, "text": text}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m wetok.bench.train_step",
                                description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps (cover compilation)")
    p.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    p.add_argument("--modes", nargs="+", choices=("eager", "compile"),
                   default=["eager", "compile"])
    p.add_argument("--gn-silu", nargs="+", choices=("recompute", "plain"), default=["recompute"],
                   help="eager GroupNorm+SiLU: recompute in backward (library default) and/or "
                        "plain autograd; one eager row each")
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (win)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--lpips", choices=("auto", "random"), default="auto",
                   help="auto: pretrained trunk when vgg16 weights exist, else random")
    p.add_argument("--buffers", type=int, default=3, help="rotating input batches")
    p.add_argument("--eval-warmup", type=int, default=2)
    p.add_argument("--eval-steps", type=int, default=10, help="0: no evaluation timing")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also profile N steps per mode and print the heaviest kernels")
    p.add_argument("--csv", default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.warmup < 0 or args.steps < 1 or args.buffers < 1 or args.eval_steps < 0:
        p.error("need --warmup >= 0, --steps >= 1, --buffers >= 1, --eval-steps >= 0")
    return args


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    result = run(parse_args(argv))
    bad = [r for r in result["rows"] + result["eval"] if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
