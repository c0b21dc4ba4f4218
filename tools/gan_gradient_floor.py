"""How far D's step-1 gradient moves when its fake images move by rounding (one process).

    python tools/gan_gradient_floor.py --overrides model=c128_b4 quantizer=gq quantizer.groups=4 \
        quantizer.group_dim=8 quantizer.dim=null data.image_size=64 train.device=cpu

The run's model, D and first training batch at initialisation (its seed, fp32): D's gradient of
the hinge loss (Eq. 11) on (x, x_rec), then on (x, x_rec + N(0, s^2)) for a few draws per scale
s. A relative gap that does not shrink with s is a jump (LeakyReLU kinks that the fakes sit on),
not a slope: then no reordering of D's sums (DDP ranks, batch splits, kernels) can match
another's gradient closer than that gap. tools/gpu_ddp.sh check compares DDP with one process;
docs/multi_gpu.md has the figures.
"""
from __future__ import annotations

import argparse

import torch

from wetok import distributed
from wetok.bench.common import compose_config
from wetok.data import build_loader
from wetok.discriminator import NLayerDiscriminator
from wetok.losses import hinge_d_loss
from wetok.model import build_model


def d_gradient(disc: NLayerDiscriminator, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    disc.zero_grad(set_to_none=True)
    hinge_d_loss(disc(x), disc(fake)).backward()
    return torch.cat([p.grad.flatten().double() for p in disc.parameters()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--overrides", nargs="*", default=["model=tiny", "data.image_size=32",
                                                      "train.device=cpu"])
    p.add_argument("--scales", type=float, nargs="+", default=[4e-6, 4e-7, 4e-8])
    p.add_argument("--draws", type=int, default=3)
    args = p.parse_args(argv)
    cfg = compose_config([*args.overrides, "run_dir=unused"])
    device = distributed.setup(cfg.train.device, deterministic=cfg.train.deterministic).device
    torch.manual_seed(cfg.seed)  # as wetok.train initialises both networks
    model = build_model(cfg.model, cfg.quantizer).to(device)
    disc = NLayerDiscriminator(ndf=cfg.loss.disc_ndf, n_layers=cfg.loss.disc_layers).to(device)
    loader, _ = build_loader(cfg.data, "train", cfg.train.batch_size, seed=cfg.seed)
    x = next(iter(loader)).to(device)
    with torch.no_grad():
        x_rec = model(x)[0]
    ref = d_gradient(disc, x, x_rec)
    print(f"{' '.join(args.overrides)}; batch {len(x)}; x_rec std {float(x_rec.std()):.3f}")
    print("| noise s on x_rec | relative gap of D's gradient, per draw |\n|---|---|")
    gen = torch.Generator(device).manual_seed(1)
    for s in args.scales:
        gaps = [float((d_gradient(disc, x, x_rec + s * torch.randn(
            x_rec.shape, generator=gen, device=device)) - ref).norm() / ref.norm())
            for _ in range(args.draws)]
        print(f"| {s:g} | {', '.join(f'{g:.1e}' for g in gaps)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
