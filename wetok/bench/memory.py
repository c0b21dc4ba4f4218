"""Paper Table 1: peak GPU memory of one generator training step for LFQ / BSQ / GQ at each d.
Run as ``python -m wetok.memory [overrides]`` (wetok/memory.py: the Hydra app on
conf/memory.yaml, which calls ``report(cfg)`` here).

One step = forward (encoder -> quantizer with its entropy loss -> decoder) + L1 + LPIPS + GAN
generator loss + backward, under bf16 autocast, for the ablation model (C=128, [1,1,2,2,4], B=4,
256^2, batch 16). Out-of-memory is caught, reported as OOM, and the table goes on. LPIPS uses a
random VGG trunk here: memory does not depend on weight values, and no LPIPS number is reported.
Writes memory.md and memory.csv (method, d, g, d_prime, peak_gib, status, device) in the run folder.

On a CPU there is no peak-memory counter: the script says so and reports instead the
quantizer's own tensor memory (tensors saved for backward plus outputs) at a smaller batch.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from wetok.bench.common import GIB, free, is_oom, sync
from wetok.discriminator import NLayerDiscriminator
from wetok.losses import WeTokLoss
from wetok.model import build_model
from wetok.quantize import GroupQuantizer


def quantizer_settings(method: str, d: int, group_dim: int) -> dict | None:
    """(g, d', entropy mode, l2 norm) of each Table 1 row at codebook size 2^d; None if d does
    not split into groups of d'."""
    if method in ("lfq_naive", "lfq_exact"):
        return dict(groups=1, group_dim=d, entropy_mode=method.split("_")[1], l2_norm=False)
    if method == "bsq":
        return dict(groups=d, group_dim=1, entropy_mode="grouped", l2_norm=True)
    if method == "gq":
        if d % group_dim:
            return None
        return dict(groups=d // group_dim, group_dim=group_dim, entropy_mode="grouped",
                    l2_norm=False)
    raise ValueError(f"methods: expected lfq_naive|lfq_exact|bsq|gq, got {method!r}")


def gpu_step_peak(cfg: DictConfig, q: dict, device: torch.device) -> float:
    """Peak allocated GiB of one generator step (fwd + bwd) from a clean allocator state."""
    model = build_model(cfg.model, {**cfg.quantizer, **q}).to(device).to(memory_format=torch.channels_last)
    disc = NLayerDiscriminator().to(device).requires_grad_(False)
    loss = WeTokLoss.from_config(cfg.loss, None, None, random_lpips=True).to(device)
    x = torch.rand(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device) * 2 - 1
    x = x.contiguous(memory_format=torch.channels_last)
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            x_rec, qout = model(x)
            total, _ = loss.generator(x, x_rec, qout, disc(x_rec), step=0)
        total.backward()
        sync(device)
        return torch.cuda.max_memory_allocated(device) / GIB
    finally:
        del model, disc, loss, x
        free(device)


def cpu_quantizer_bytes(cfg: DictConfig, q: dict) -> float:
    """GiB held by the quantizer on a CPU: tensors it saves for backward plus its outputs."""
    h = cfg.cpu_image_size // cfg.model.downsample
    d = q["groups"] * q["group_dim"]
    quantizer = GroupQuantizer(q["groups"], q["group_dim"], entropy_mode=q["entropy_mode"],
                               l2_norm=q["l2_norm"]).train()
    u = torch.randn(cfg.cpu_batch_size, d, h, h, requires_grad=True)
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = quantizer(u)
    for t in (out.z_q, out.indices):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()) / GIB


def measure(cfg: DictConfig) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    if device.type == "cpu":
        print(f"peak GPU memory needs a CUDA GPU; on the CPU this reports the quantizer's own "
              f"tensor memory at batch {cfg.cpu_batch_size}, {cfg.cpu_image_size}^2 instead",
              file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for method in cfg.methods:
        for d in cfg.dims:
            q = quantizer_settings(method, d, cfg.group_dim)
            row = {"method": method, "d": d, "g": q and q["groups"], "d_prime": q and q["group_dim"],
                   "peak_gib": None, "status": "n/a", "device": name}
            if method == "lfq_exact" and d > cfg.max_exact_dim:
                row["status"] = "too slow"  # 2^(d/2) x 2^(d/2) blocks: minutes per step at d=40
            elif q is not None:
                try:
                    row["peak_gib"] = (gpu_step_peak(cfg, q, device) if device.type == "cuda"
                                       else cpu_quantizer_bytes(cfg, q))
                    row["status"] = "ok"
                except Exception as exc:
                    if not is_oom(exc):
                        raise
                    row["status"] = "OOM"
                free(device)
            rows.append(row)
            peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.3f} GiB"
            print(f"{method:>10s} d={d:<3d} {row['status']:>4s} {peak}", file=sys.stderr)
    return rows


def markdown(rows: list[dict], dims) -> str:
    """Method x d table as in paper Table 1 (OOM where out of memory)."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["d"]): (f"{r['peak_gib']:.3g} GiB" if r["status"] == "ok"
                                    else r["status"]) for r in rows}
    lines = ["| method | " + " | ".join(f"d = {d}" for d in dims) + " |",
             "|---|" + "---|" * len(dims)]
    lines += [f"| {m} | " + " | ".join(cell[(m, d)] for d in dims) + " |" for m in methods]
    return "\n".join(lines) + "\n"


def report(cfg: DictConfig) -> None:
    """Measure every row of conf/memory.yaml, write memory.csv and memory.md in cfg.run_dir, print
    the table (and log it to W&B when the logger is on)."""
    rows = measure(cfg)
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memory.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = markdown(rows, list(cfg.dims))
    (out / "memory.md").write_text(table)
    print(table)
    print(f"wrote {out / 'memory.csv'} and {out / 'memory.md'}")
    if cfg.logger.wandb:
        from wetok.record_writer import log_table

        log_table(cfg, "memory", rows)
