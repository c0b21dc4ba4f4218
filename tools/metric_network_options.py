"""Speed and value drift of the evaluation's metric networks (LPIPS, InceptionV3) per option.

    python tools/metric_network_options.py --batch 64        # on the GPU; markdown table

For each network: eager fp32 (cuDNN TF32 convolutions, torch's default), channels_last,
channels_last + torch.compile, the same two under bf16 autocast, and strict fp32 (TF32 off),
timed with wetok.bench.common.time_calls (median of --steps after --warmup; CUDA events on
a GPU) on one batch of smooth random 256^2 images and a noisy copy. "max rel. diff" is the largest difference from strict fp32
over the batch, relative to its largest value: LPIPS distances; Inception's 2048-d features
of the copies. The networks have seeded RANDOM weights (no pretrained files here): the speed
is the real networks'; the drift only indicates the precision's effect on real values.

Then PSNR + SSIM (``wetok.metrics``) per implementation of SSIM's 7x7 window sums: the
package's (7x1 then 1x7 ``avg_pool2d``) and the one it replaced (one 7x7 pass: the same integer
sums, exact in float32), each eager and compiled (``wetok.metrics.pixel_metrics``); "max abs.
diff" from the package's eager values.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys

import torch
import torch.nn.functional as F

from wetok import metrics as M
from wetok.bench.common import time_calls
from wetok.losses import LPIPS

VARIANTS = ("fp32 (TF32 convs)", "channels_last", "channels_last + compile",
            "channels_last + bf16", "channels_last + bf16 + compile", "strict fp32")


@contextlib.contextmanager
def precision(variant: str, device: torch.device):
    """TF32 off for "strict fp32", bf16 autocast for the bf16 variants, else torch's default."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    strict = variant == "strict fp32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not strict
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in variant):
            yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@torch.no_grad()
def measure(name: str, net: torch.nn.Module, call, device: torch.device, args) -> list[dict]:
    rows, outputs = [], {}
    for variant in VARIANTS:
        layout = torch.channels_last if "channels_last" in variant else torch.contiguous_format
        module = net.to(memory_format=layout)
        module = torch.compile(module) if "compile" in variant else module

        def timed(_, module=module, variant=variant):
            with precision(variant, device):
                call(module)
        ms = statistics.median(time_calls(timed, [None], device, args.warmup, args.steps))
        with precision(variant, device):
            outputs[variant] = call(module).double()
        rows.append({"network": name, "variant": variant, "ms": ms,
                     "img_s": args.batch * 1e3 / ms})
    ref = outputs["strict fp32"]
    for row in rows:
        row["max_rel_diff"] = float((outputs[row["variant"]] - ref).abs().max() / ref.abs().max())
    return rows


def ssim_7x7(real: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """wetok.metrics.ssim_per_image with its window sums in one 7x7 pass (the earlier form)."""
    x, y = real.float(), rec.float()
    sums = F.avg_pool2d(torch.cat([x, y, x * x, y * y, x * y], 1), M.SSIM_WINDOW, stride=1,
                        divisor_override=1)
    return M.ssim_from_sums(sums)


@torch.no_grad()
def measure_pixel(real_u8, rec_u8, device, args) -> list[dict]:
    """PSNR + SSIM sums per SSIM implementation, eager and compiled."""
    rows, ref = [], None
    for name, ssim in (("7x1 then 1x7 (package)", M.ssim_per_image),
                       ("one 7x7 pass (before)", ssim_7x7)):
        for compiled in (False, True):
            def both(_=None, ssim=torch.compile(ssim) if compiled else ssim,
                     psnr=torch.compile(M.psnr_per_image) if compiled else M.psnr_per_image):
                return torch.stack([psnr(real_u8, rec_u8), ssim(real_u8, rec_u8)])
            ms = statistics.median(time_calls(both, [None], device, args.warmup, args.steps))
            out = both()
            ref = out if ref is None else ref
            rows.append({"network": "PSNR + SSIM", "variant": name + (" + compile" if compiled
                                                                      else ""),
                         "ms": ms, "img_s": args.batch * 1e3 / ms,
                         "max_abs_diff": float((out - ref).abs().max())})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--size", type=int, default=256, help="image side")
    args = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    g = torch.Generator().manual_seed(0)
    real = F.interpolate(torch.rand(args.batch, 3, 16, 16, generator=g), size=args.size,
                         mode="bicubic").clamp(0, 1) * 2 - 1
    rec = (real + 0.1 * torch.randn(real.shape, generator=g)).clamp(-1, 1)
    real_u8, rec_u8 = M.to_uint8(real.to(dev)), M.to_uint8(rec.to(dev))
    real_f, rec_f = real_u8.float() / 127.5 - 1, rec_u8.float() / 127.5 - 1
    lpips_net = LPIPS(random_trunk=True).to(dev)
    inception = M.build_inception(random_weights=True).to(dev)
    rows = measure("LPIPS (real + rec)", lpips_net, lambda m: m(real_f, rec_f), dev, args)
    rows += measure("Inception (rec)", inception, lambda m: m(rec_u8)[0], dev, args)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}, torch {torch.__version__}, batch {args.batch}, {args.size}^2, "
          f"RANDOM weights\n")
    print("| network | variant | ms/batch | img/s | max rel. diff from strict fp32 |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['network']} | {r['variant']} | {r['ms']:.1f} | {r['img_s']:.0f} | "
              f"{r['max_rel_diff']:.1e} |")
    print("\n| metrics | SSIM window sums | ms/batch | img/s | max abs. diff from the package's |")
    print("|---|---|---|---|---|")
    for r in measure_pixel(real_u8, rec_u8, dev, args):
        print(f"| {r['network']} | {r['variant']} | {r['ms']:.2f} | {r['img_s']:.0f} | "
              f"{r['max_abs_diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
