"""How far D's (or G's) step-1 gradient moves when its input moves by rounding (one process).

    python tools/gan_gradient_floor.py [--part d|g] --overrides model=c128_b4 quantizer=gq \
        quantizer.groups=4 quantizer.group_dim=8 quantizer.dim=null data.image_size=64 \
        train.device=cpu loss.perceptual_weight=0

The run's model, D and first training batch at initialisation (its seed, fp32). ``--part d``:
D's gradient of the hinge loss (Eq. 11) on (x, x_rec), then on (x, x_rec + N(0, s^2)) for a few
draws per scale s. ``--part g``: G's gradient of its training loss with the GAN off (Eq. 3 without
Eq. 10's term, as wetok.train's step 1 before disc_start), then with the encoder's output z (the
quantizer's input) moved by N(0, s^2), with the number of bits of sign(z) that flipped, and with
only the bit nearest 0 flipped. A relative gap that does not shrink with s is a jump (D: LeakyReLU
kinks that the fakes sit on; G: a flipped bit changes the decoder's input by 2), not a slope (G:
mostly the entropy terms' soft codes, tau 0.01): then no reordering of the sums (DDP ranks, batch
splits, kernels) can match another's gradient closer than that gap. tools/gpu_ddp.sh check
compares DDP with one process; docs/multi_gpu.md has the figures.
"""
from __future__ import annotations

import argparse

import torch

from wetok import distributed
from wetok.bench.common import compose_config
from wetok.data import build_loader
from wetok.discriminator import NLayerDiscriminator
from wetok.losses import WeTokLoss, hinge_d_loss
from wetok.model import WeTok, build_model


def d_gradient(disc: NLayerDiscriminator, x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    disc.zero_grad(set_to_none=True)
    hinge_d_loss(disc(x), disc(fake)).backward()
    return torch.cat([p.grad.flatten().double() for p in disc.parameters()])


def g_gradient(model: WeTok, loss: WeTokLoss, x: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """G's gradient of its loss with the GAN off, the encoder's output moved by dz."""
    hook = model.encoder.register_forward_hook(lambda module, inputs, z: z + dz)
    model.zero_grad(set_to_none=True)
    try:
        loss.generator(x, *model(x), gan_active=False)[0].backward()
    finally:
        hook.remove()
    return torch.cat([p.grad.flatten().double() for p in model.parameters()])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["d", "g"], default="d")
    p.add_argument("--overrides", nargs="*", default=["model=tiny", "data.image_size=32",
                                                      "train.device=cpu",
                                                      "loss.perceptual_weight=0"])
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
        z = model.encoder(x) if args.part == "g" else None
    if args.part == "d":
        base, name, gradient = x_rec, "x_rec", lambda noise: d_gradient(disc, x, x_rec + noise)
        about = f"x_rec std {float(x_rec.std()):.3f}"
        flipped = lambda noise: ""  # noqa: E731
    else:
        loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights).to(device)
        base, name, gradient = z, "z", lambda noise: g_gradient(model, loss, x, noise)
        about = (f"{z.numel()} bits of sign(z), {int((z.abs() < 1e-6).sum())} within 1e-6 of 0, "
                 f"{int((z.abs() < 1e-5).sum())} within 1e-5")
        flipped = lambda noise: f" ({int(((z + noise > 0) != (z > 0)).sum())} flipped)"  # noqa: E731
    ref = gradient(torch.zeros_like(base))
    print(f"{' '.join(args.overrides)}; batch {len(x)}; {about}")
    print(f"| noise s on {name} | relative gap of {args.part.upper()}'s gradient, per draw |\n"
          "|---|---|")
    gen = torch.Generator(device).manual_seed(1)
    for s in args.scales:
        gaps = []
        for _ in range(args.draws):
            noise = s * torch.randn(base.shape, generator=gen, device=device)
            gaps.append(f"{float((gradient(noise) - ref).norm() / ref.norm()):.1e}"
                        + flipped(noise))
        print(f"| {s:g} | {', '.join(gaps)} |")
    if args.part == "g":  # the bit nearest 0 alone, pushed to the other side
        i = int(z.abs().argmin())
        noise = torch.zeros_like(z)
        noise.view(-1)[i] = -2 * z.view(-1)[i]
        gap, size = float((gradient(noise) - ref).norm() / ref.norm()), float(z.view(-1)[i].abs())
        print(f"| its bit nearest 0 flipped (abs(z) {size:.1e}) | {gap:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
