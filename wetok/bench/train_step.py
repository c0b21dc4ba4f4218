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
reported). That loss (``WeTokLoss.from_config(..., random_lpips=True)`` from the composed config)
is handed to the Trainer, ``Trainer(cfg, loss=...)``, which sets it up as its own (device,
channels_last, compile, the discriminator step's loss); nothing in the library is patched.

Evaluation img/s (``wetok.bench.evaluate.step_rows``): the EMA model on fixed device batches of
``eval.batch_size``, per batch what ``wetok.evaluate.evaluate_model`` does (``EvalPass.step``:
encode + decode, val loss, metrics, baselines, codebook usage), no data loading; metrics whose
weights are missing (lpips, rfid) are skipped by the Evaluator as in training. Also the model
alone (``EvalPass.reconstruct``: encode + decode). ``--profile N``: the tables of
``wetok.bench.profile``; printed tables and files: ``wetok.bench.step_report``.
"""
from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from wetok import distributed
from wetok.bench.common import GIB, StepTimer, compose_config, failure, free, inputs, spread, sync
from wetok.bench.evaluate import step_rows
from wetok.bench.profile import profile_table
from wetok.bench.step_report import header, markdown, mode_line, summary, write


# ---- config ----------------------------------------------------------------------------------
def base_overrides(args) -> list[str]:
    return ["model=c128_b4", "quantizer=gq", "quantizer.groups=4", "quantizer.group_dim=8",
            "quantizer.dim=null", "loss=default", "logger=none",
            f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
            "train.global_batch_size=null", "train.precision=auto", "train.channels_last=true"]


def lpips_setting(cfg, choice: str) -> tuple[bool, str]:
    """Whether the loss gets a random LPIPS trunk (``--lpips random``, or ``auto`` without the
    vgg16 file), and the header's LPIPS line."""
    from wetok import weights

    if cfg.loss.perceptual_weight <= 0:
        return False, "off (loss.perceptual_weight=0)"
    try:
        weights.resolve("vgg16", cfg.weights)
        found = True
    except weights.MissingWeightsError:
        found = False
    if choice == "random" or not found:
        why = "vgg16 weights missing" if not found else "--lpips random"
        return True, (f"RANDOM VGG16 trunk ({why}): same compute as the pretrained trunk, "
                      "LPIPS values meaningless and not reported")
    return False, "pretrained VGG16 trunk"


def build_trainer(cfg, random_lpips: bool):
    """The Trainer for cfg; with random_lpips it trains with a loss whose LPIPS has a random VGG
    trunk (see module docstring)."""
    from wetok.losses import WeTokLoss
    from wetok.train import Trainer

    loss = (WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights, random_lpips=True)
            if random_lpips else None)
    return Trainer(cfg, loss=loss)


# ---- the training step -----------------------------------------------------------------------
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


def _max_over_ranks(device: torch.device, *values: float | None) -> list[float | None]:
    """Each value's maximum over the DDP ranks (None stays None: no GPU counter)."""
    if distributed.world() == 1:
        return list(values)
    t = torch.tensor([-1.0 if v is None else v for v in values], device=device,
                     dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [None if v is None else float(x) for v, x in zip(values, t.tolist())]


def count_flops(trainer, batches) -> float:
    """FLOPs of one eager train_step (compiled wrappers are bypassed for the count)."""
    from torch.utils.flop_counter import FlopCounterMode

    g, d = trainer.g_model, trainer.d_model
    trainer.g_model = getattr(g, "_orig_mod", g)
    trainer.d_model = getattr(d, "_orig_mod", d)
    try:
        with FlopCounterMode(display=False) as counter:
            trainer.train_step(batches)
        sync(trainer.device)
        return float(counter.get_total_flops())
    finally:
        trainer.g_model, trainer.d_model = g, d


def bench_train(trainer, args, label: str, gn_silu: str) -> dict:
    """The row of one mode: Trainer.train_step timed, peak memory, FLOPs, (profile)."""
    dev = trainer.device
    cfg = trainer.cfg
    accum = trainer.accum
    channels_last = dev.type == "cuda" and cfg.train.channels_last
    bufs = inputs(max(args.buffers, accum), cfg.train.batch_size, cfg.data.image_size, dev,
                  channels_last)
    world = distributed.world()
    images = cfg.train.batch_size * accum * world  # the whole job's images per step
    k = 0

    def next_batches():
        nonlocal k
        out = [bufs[(k + j) % len(bufs)] for j in range(accum)]
        k += accum
        return out

    warm = []
    for _ in range(args.warmup):
        sync(dev)
        t0 = time.perf_counter()
        logs = trainer.train_step(next_batches())
        sync(dev)
        warm.append(time.perf_counter() - t0)
    loss0 = float(logs["loss"]) if args.warmup else None
    graphs0 = _unique_graphs()

    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    timer = StepTimer(dev)
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
    row = {"mode": label, "gpus": world, "status": "ok", "ms_median": med,
           "img_s": images * 1e3 / med,
           "peak_gib": peak,
           "compile_s": sum(max(0.0, t - med / 1e3) for t in warm) if warm else None,
           **spread(times),
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


# ---- driver ----------------------------------------------------------------------------------
def _modes(args) -> list[tuple[str, str, str]]:
    """(label, eager|compile, GroupNorm+SiLU setting) of each row."""
    modes = []
    for mode in args.modes:
        if mode == "eager":
            modes += [("eager" if len(args.gn_silu) == 1 else f"eager gn-silu={g}", "eager", g)
                      for g in args.gn_silu]
        else:
            modes.append(("compile", "compile", "plain (compiled)"))
    return modes


def describe(cfg, device: torch.device, args, modes: list, lpips_text: str) -> dict:
    """The setting of the run, for the header and the JSON file."""
    from wetok.config import accumulation_steps
    from wetok.model import resolve_channel_mult

    cuda = device.type == "cuda"
    return {
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "model": cfg.model.name, "channels": cfg.model.channels,
        "channel_mult": resolve_channel_mult(cfg.model),
        "num_res_blocks": cfg.model.num_res_blocks, "image_size": cfg.data.image_size,
        "batch_size": cfg.train.batch_size,
        "accum": accumulation_steps(cfg, distributed.world()),
        "gpus": distributed.world(), "groups": cfg.quantizer.groups,
        "group_dim": cfg.quantizer.group_dim,
        "entropy_mode": cfg.quantizer.entropy_mode, "recon": cfg.loss.recon,
        "perceptual_weight": cfg.loss.perceptual_weight, "gan_weight": cfg.loss.gan_weight,
        "lecam_weight": cfg.loss.lecam_weight,
        "precision": ("bf16 autocast" if cfg.train.precision == "bf16" or (
            cfg.train.precision == "auto" and cuda) else "fp32"),
        "channels_last": bool(cfg.train.channels_last and cuda),
        "lpips": lpips_text, "overrides": list(args.overrides or []), "warmup": args.warmup,
        "steps": args.steps, "buffers": args.buffers, "modes": [m[0] for m in modes],
        "timer": "CUDA events per step" if cuda else "perf_counter per step",
    }


def run_mode(cfg, label: str, mode: str, gn: str, random_lpips: bool, args, with_eval: bool,
             default_recompute: bool, device: torch.device) -> tuple[dict, list[dict] | None]:
    """One mode's row (its status on failure) and, with_eval, the evaluation rows."""
    import wetok.model as wmodel

    row = {"mode": label, "status": "ok", "gn_silu": gn}
    eval_rows = None
    trainer = None
    try:
        if mode == "eager":
            wmodel.set_gn_silu_recompute(gn == "recompute")
        else:
            wmodel.set_gn_silu_recompute(default_recompute)
            _dynamo_reset()
        free(device)
        t0 = time.perf_counter()
        trainer = build_trainer(cfg, random_lpips)
        build_s = time.perf_counter() - t0
        row = bench_train(trainer, args, label, gn)
        row["build_s"] = build_s
        if with_eval:
            try:
                eval_rows = step_rows(trainer.ema, trainer.loss, trainer.cfg, device,
                                      args.eval_warmup, args.eval_steps, args.buffers)
            except Exception as exc:  # keep the training numbers
                eval_rows = [{"mode": "eval", "status": failure(exc), "note": str(exc)[:300]}]
    except Exception as exc:
        row.update(status=failure(exc), note=str(exc).splitlines()[0][:300] if str(exc) else "")
    finally:
        del trainer
        free(device)
    return row, eval_rows


def run(args) -> dict:
    """Run the benchmark; returns {"info", "rows", "eval", "table", "text"} and prints."""
    import wetok.model as wmodel

    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    dist = distributed.setup("cuda" if want_cuda else "cpu")  # under torchrun: one GPU per rank
    dev = dist.device
    out = sys.stdout if not args.quiet and dist.is_main else None
    modes = _modes(args)
    tmp = tempfile.TemporaryDirectory(prefix="wetok-bench-")
    rows: list[dict] = []
    eval_rows: list[dict] = []
    default_recompute = getattr(wmodel, "_RECOMPUTE", True)
    info: dict = {}

    def config(folder: str, *extra: str):
        return compose_config(base_overrides(args) + [f"train.device={dev.type}", *extra,
                                                      f"run_dir={Path(tmp.name) / folder}"]
                              + list(args.overrides or []))

    try:
        configs = {label: config(f"mode{i}", f"train.compile={str(mode == 'compile').lower()}")
                   for i, (label, mode, _) in enumerate(modes)}
        cfg0 = config("cfg")
        random_lpips, lpips_text = lpips_setting(cfg0, args.lpips)
        info = describe(cfg0, dev, args, modes, lpips_text)
        if out:
            print(header(info), file=out, flush=True)
        for label, mode, gn in modes:
            row, evals = run_mode(configs[label], label, mode, gn, random_lpips, args,
                                  not eval_rows and args.eval_steps > 0, default_recompute, dev)
            eval_rows = evals if evals is not None else eval_rows
            rows.append(row)
            if out:
                print(mode_line(row), file=out, flush=True)
                if row.get("profile"):
                    print(f"[{label}] profile of {args.profile} steps:\n{row['profile']}",
                          file=out, flush=True)
            if dist.is_main:
                write(rows, info, eval_rows, args)  # after every mode: partial results survive
    finally:
        wmodel.set_gn_silu_recompute(default_recompute)
        tmp.cleanup()
        distributed.teardown()

    table = markdown(rows)
    text = summary(rows, eval_rows, dev.type == "cuda")
    if out:
        print(text, file=out, flush=True)
    if dist.is_main:
        write(rows, info, eval_rows, args)
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
