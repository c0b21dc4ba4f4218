"""Entropy-gradient to L1-gradient ratio on the latents at the start of training (issue 13).

    python -m wetok.bench.entropy_gradients                 # d = 16, g = 1, 2, 4, 16 (CPU)
    python -m wetok.bench.entropy_gradients --groups 1 2 4 8 16 --overrides model=tiny

Setting: ``experiment=table06_gfq scale=quick`` (small model C=64, B=2, 16x; loss weights of
the official recipe: L1 x1, entropy_weight 0.1, zeta 1) at ``--image-size`` 128, one batch of
``--batch-size`` bundled training crops (seed 0), a freshly initialised model (seed 0).  d is
fixed, so the encoder (and its latents u, (B, d, h, w)) is the same for every g; only the
grouping of the quantiser changes.  Gradients w.r.t. u:

* L1: d(recon_weight * |x - D(q(u))|_1) / du, through the straight-through estimator (Eq. 2);
* entropy: d(entropy_weight * (H_token - zeta * H_codebook)) / du (Eq. 5), for the codebook
  entropy modes ``--modes`` and both reductions over groups (``mean``: official code; ``sum``:
  Eq. 7/9); also the two terms alone.
The table gives the l2 norms and ratio = |grad entropy| / |grad L1|.  A last line shows the
token entropy of g=4, d'=8 latents (d = 32, another encoder) under both reductions.
"""
from __future__ import annotations

import argparse
import sys

import torch

from wetok.bench.common import compose_config
from wetok.data import build_loader
from wetok.losses import WeTokLoss
from wetok.model import build_model
from wetok.quantize import REDUCTIONS, entropy_terms


def _latents(cfg, x):
    """Fresh model (seed 0) -> u (leaf), and the L1 gradient w.r.t. u."""
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.quantizer)
    loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, perceptual=False)
    u = model.encoder(x).detach().requires_grad_(True)
    x_rec = model.decode(model.quantizer(u, entropy=False).z_q)
    (grad_l1,) = torch.autograd.grad(loss.recon_weight * loss.recon_loss(x, x_rec), u)
    return u, grad_l1, loss


def _grad_norm(value, u) -> float:
    (grad,) = torch.autograd.grad(value, u, retain_graph=True)
    return float(grad.norm())


def measure(args) -> tuple[list[dict], dict]:
    base = ["experiment=table06_gfq", "scale=quick", f"data.image_size={args.image_size}",
            "train.device=cpu", *args.overrides]
    cfg = compose_config(base + ["quantizer.groups=1", f"quantizer.group_dim={args.d}"])
    loader, _ = build_loader(cfg.data, "train", args.batch_size, seed=0)
    x = next(iter(loader))
    u, grad_l1, loss = _latents(cfg, x)
    z = u.permute(0, 2, 3, 1).reshape(-1, args.d)  # tokens (N, d), as GroupQuantizer
    l1 = float(grad_l1.norm())
    rows = []
    for g in args.groups:
        for mode in args.modes:
            for reduction in REDUCTIONS:
                tok, cb = entropy_terms(z, args.d // g, cfg.quantizer.tau, mode,
                                        reduction=reduction)
                aux = loss.entropy_weight * (tok - loss.zeta * cb)
                rows.append({"g": g, "d_prime": args.d // g, "mode": mode, "reduction": reduction,
                             "H_token": float(tok.detach()), "H_codebook": float(cb.detach()),
                             "grad_token": loss.entropy_weight * _grad_norm(tok, u),
                             "grad_codebook": loss.entropy_weight * loss.zeta * _grad_norm(cb, u),
                             "grad_entropy": _grad_norm(aux, u), "grad_l1": l1,
                             "tokens": z.shape[0]})
                rows[-1]["ratio"] = rows[-1]["grad_entropy"] / l1
    cfg4 = compose_config(base + ["quantizer.groups=4", "quantizer.group_dim=8"])
    u4, _, _ = _latents(cfg4, x)
    z4 = u4.detach().permute(0, 2, 3, 1).reshape(-1, 32)
    factor = {r: float(entropy_terms(z4, 8, cfg.quantizer.tau, "grouped", reduction=r)[0])
              for r in REDUCTIONS}
    return rows, factor


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=16, help="d = g * d', fixed")
    p.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4, 16])
    p.add_argument("--modes", nargs="+", default=["grouped", "pooled"])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (win)")
    args = p.parse_args(argv)
    if any(args.d % g for g in args.groups):
        p.error(f"every g must divide d={args.d}")
    torch.set_grad_enabled(True)
    rows, factor = measure(args)
    print(f"d={args.d}, {args.image_size}^2, batch {args.batch_size} ({rows[0]['tokens']} tokens), "
          f"fresh model (seed 0); |grad L1| = {rows[0]['grad_l1']:.3e}")
    print("| g | d' | codebook | reduction | H_token | H_codebook | |grad token| "
          "| |grad codebook| | |grad entropy| | ratio entropy/L1 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['g']} | {r['d_prime']} | {r['mode']} | {r['reduction']} | {r['H_token']:.4f} "
              f"| {r['H_codebook']:.4f} | {r['grad_token']:.3e} | {r['grad_codebook']:.3e} "
              f"| {r['grad_entropy']:.3e} | {r['ratio']:.2f} |")
    print(f"token entropy, g=4 d'=8 (d=32) latents of the same batch: sum {factor['sum']:.4f}, "
          f"mean {factor['mean']:.4f}, factor {factor['sum'] / factor['mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
