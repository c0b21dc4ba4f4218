"""Write the reference-parity golden files (tests/fixtures/parity/) from the official code.

    python tools/parity_fixtures.py /work/ref/WeTok /work/ref/SEED-Voken [--out DIR]

WETOK is a checkout of github.com/zhuangshaobin/WeTok, MAGVIT2 one of
github.com/TencentARC/SEED-Voken (Open-MAGVIT2). Their modules are imported and run as they are
(nothing of them is copied here); the imports the fixtures do not use are stubbed in
``sys.modules``: ``lightning`` (LightningModule -> nn.Module, the training step is called
directly), ``main.instantiate_from_config`` and the LPIPS download (the LPIPS network gets the
project's seeded random trunk and the lpips wheel's linear layers, on both sides).

Every parameter (GroupNorm and BatchNorm affines and the adaptive GroupNorm's linears included)
is moved away from its initial value with seeded noise, rounded to fp16-representable values
(stored as fp16, exact in fp32). Files (safetensors, fp32 on the CPU):

* ``model.safetensors``: the reference state_dict in its own key names (C=32, ch_mult
  [1,1,1,1,2], B=1, d=16, PatchGAN ndf=8), ``gan.decoder.conv_in.*`` of the GANDecoder;
* ``outputs.safetensors``: input images, encoder latents, z_q, indices, decoder output
  (eval mode), GANDecoder output for a stored noise tensor, for WeTok's GFQ (g=2, d'=8) and
  Open-MAGVIT2's LFQ (g=1, d'=16); token / codebook entropy, aux and commitment losses and
  the aux loss' gradient (training mode, quantizer run in fp64); discriminator logits, LPIPS, the hinge+LeCam and generator losses;
* ``train.safetensors``: a smaller model (C=64: two channels per GroupNorm group, so that no
  bias has an identically zero gradient, whose float noise Adam would blow up to lr-sized
  steps; ch_mult [1,1], B=1, GFQ g=2 d'=8), three 32^2 batches whose latents stay at least
  MARGIN from 0 (a sign flip from rounding would change a code), and every generator /
  discriminator / EMA tensor after three reference training steps
  (lfqgan.VQModel.training_step + on_train_batch_end) run in fp64 (get_input's cast to fp32
  replaced), stored as fp16 differences from the initial weights (rounding <= 5e-4 of a
  difference of ~3 lr).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSS = {"disc_start": 0, "disc_ndf": 8, "gen_loss_weight": 0.1, "lecam_loss_weight": 0.05,
        "codebook_weight": 0.1, "commit_weight": 0.25, "codebook_enlarge_ratio": 0,
        "perceptual_weight": 1.0}
MAIN = {"ch": 32, "ch_mult": [1, 1, 1, 1, 2], "num_res_blocks": 1, "z_channels": 16}
TRAIN = {"ch": 64, "ch_mult": [1, 1], "num_res_blocks": 1, "z_channels": 16}
IMAGE, TRAIN_IMAGE = 64, 32
EMA_SCALE = 1000.0  # EMA changes (~1e-3 x the weights') are stored x 1000: fp16-normal range
MARGIN = 1e-8  # smallest |latent| allowed in the training run (no code flips from fp64 rounding)


def stub_imports(wetok_root: Path) -> None:
    """Stubs for what the fixtures never use: lightning, main.py's CLI, LPIPS downloads."""
    lightning = types.ModuleType("lightning")
    lightning.LightningModule = nn.Module
    sys.modules["lightning"] = lightning
    main = types.ModuleType("main")

    def instantiate_from_config(config):
        module, name = config["target"].rsplit(".", 1)
        return getattr(importlib.import_module(module), name)(**config.get("params", {}))

    main.instantiate_from_config = instantiate_from_config
    sys.modules["main"] = main
    sys.path.insert(0, str(wetok_root))
    lp = importlib.import_module("src.WeTok.modules.losses.lpips")
    import torchvision

    lp.models = types.SimpleNamespace(vgg16=lambda pretrained=False: torchvision.models.vgg16())
    lp.LPIPS.load_from_pretrained = lambda self, name=None: None


def load_file_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def perturb(module: nn.Module, gen: torch.Generator, scale: float = 0.3) -> None:
    """p += scale * mean|p| * N(0, 1) (0.1 * N(0, 1) for all-zero tensors), fp16-representable."""
    for p in module.parameters():
        size = p.abs().mean().item() or 0.3
        p.add_(torch.randn(p.shape, generator=gen) * scale * size)
        p.copy_(p.half().float())


def lpips_into(ref_lpips: nn.Module) -> None:
    """The project's seeded random-trunk LPIPS weights (lpips wheel's linear layers) -> reference."""
    from wetok.losses import LPIPS

    state = LPIPS(random_trunk=True).net.state_dict()
    missing, unexpected = ref_lpips.load_state_dict(state, strict=False)
    assert not [k for k in missing if not k.endswith("num_batches_tracked")], missing


def build_vqmodel(dd: dict, gfq: bool, gan: bool = False):
    lfqgan = importlib.import_module("src.WeTok.models.lfqgan")
    g = 2 if gfq else 1
    dd = {**dd, "double_z": False, "resolution": IMAGE, "in_channels": 3, "out_ch": 3}
    loss = {"target": "src.WeTok.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
            "params": {k: v for k, v in LOSS.items()}}
    model = lfqgan.VQModel(ddconfig=dd, lossconfig=loss, n_embed=2 ** (dd["z_channels"] // g),
                           embed_dim=dd["z_channels"], num_codebooks=g,
                           sample_minimization_weight=1.0, batch_maximization_weight=1.0,
                           learning_rate=1e-4, use_ema=True, use_GFQ=gfq, gan_decoder=gan,
                           scheduler_type="None")
    lpips_into(model.loss.perceptual_loss)
    return model


def state_of(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.startswith("loss.perceptual_loss.") and not k.startswith("model_ema.")}


def main_fixtures(magvit_root: Path, gen: torch.Generator) -> tuple[dict, dict]:
    lfq_mod = load_file_module(magvit_root / "src/Open_MAGVIT2/modules/vqvae/lookup_free_quantize.py",
                               "open_magvit2_lfq")
    vq = build_vqmodel(MAIN, gfq=True)
    perturb(vq.encoder, gen), perturb(vq.decoder, gen), perturb(vq.loss.discriminator, gen)
    gan = build_vqmodel(MAIN, gfq=True, gan=True).decoder
    gan.load_state_dict({k: v for k, v in vq.decoder.state_dict().items()
                         if not k.startswith("conv_in.")}, strict=False)
    perturb(gan.conv_in, gen)
    weights = state_of(vq)
    weights.update({f"gan.decoder.conv_in.{k}": v.detach().clone()
                    for k, v in gan.conv_in.state_dict().items()})
    x = torch.rand(2, 3, IMAGE, IMAGE, generator=gen) * 2 - 1
    out = {"x": x}
    lfq = lfq_mod.LFQ(dim=16, codebook_size=2 ** 16, num_codebooks=1)
    for name, quantizer in (("gfq", vq.quantize), ("lfq", lfq)):
        vq.eval()
        with torch.no_grad():
            h = vq.encoder(x)
            (zq, _, idx), _ = quantizer.eval()(h, return_loss_breakdown=True)
            rec = vq.decoder(zq)
        # entropies in fp64: the reference's fp32 dense 2^16-way sum for LFQ is itself 1.2e-5
        # (relative) away from its fp64 value (the project's is 5e-8 away)
        quantizer.double().train()
        hh = h.double().requires_grad_(True)
        (_, aux, _), br = quantizer(hh, return_loss_breakdown=True)
        quantizer.float()
        out.update({f"{name}.latent": h, f"{name}.z_q": zq, f"{name}.indices": idx,
                    f"{name}.rec": rec, f"{name}.token_entropy": br.per_sample_entropy.detach(),
                    f"{name}.codebook_entropy": br.codebook_entropy.detach(),
                    f"{name}.aux_loss": (LOSS["codebook_weight"] * aux).detach(),
                    f"{name}.commit_loss": br.commitment.detach(),
                    f"{name}.aux_grad": torch.autograd.grad(aux, hh)[0]})
    # GANDecoder: its noise is the first random draw of its forward
    gan.eval()
    zq = out["gfq.z_q"]
    torch.manual_seed(1234)
    noise = torch.randn_like(zq)
    torch.manual_seed(1234)
    with torch.no_grad():
        out["gan.noise"], out["gan.rec"] = noise, gan(zq)
    # losses: discriminator (train mode, as in training), LPIPS (eval), generator / D objectives
    loss = vq.loss.train()
    loss.perceptual_loss.eval()
    rec = out["gfq.rec"]
    (_, _, _), br = vq.quantize.train()(out["gfq.latent"], return_loss_breakdown=True)
    aux = out["gfq.aux_loss"] / LOSS["codebook_weight"]
    disc_state = {k: v.clone() for k, v in loss.discriminator.state_dict().items()}
    g_total, g_log = loss(aux, br, x, rec, 0, 0, last_layer=None, split="train")
    loss.discriminator.load_state_dict(disc_state)  # BatchNorm running stats as before
    d_total, d_log = loss(aux, br, x, rec, 1, 0, last_layer=None, split="train")
    loss.discriminator.load_state_dict(disc_state)
    with torch.no_grad():
        logits_real, logits_fake = loss.discriminator(x), loss.discriminator(rec)
    out.update({"loss.g_total": g_total.detach(), "loss.nll": g_log["train/nll_loss"],
                "loss.lpips": g_log["train/perceptual_loss"], "loss.g_gan": g_log["train/g_loss"],
                "loss.d_total": d_total.detach(), "loss.lecam": d_log["train/lecam_loss"],
                "loss.d_hinge": d_log["train/non_saturated_d_loss"],
                "disc.logits_real": logits_real, "disc.logits_fake": logits_fake})
    return ({k: v.half() if v.is_floating_point() else v for k, v in weights.items()},
            {k: v.detach().float().contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in out.items()})


def train_fixtures(gen: torch.Generator, steps: int = 3) -> dict:
    for _ in range(100):  # draw until no latent of the run is within MARGIN of 0
        out = _train_run(gen, steps)
        if out is not None:
            return out
    raise RuntimeError("no training run without near-zero latents in 100 draws")


def _train_run(gen: torch.Generator, steps: int) -> dict | None:
    from src.WeTok.modules.ema import LitEma

    vq = build_vqmodel(TRAIN, gfq=True)
    perturb(vq.encoder, gen), perturb(vq.decoder, gen), perturb(vq.loss.discriminator, gen)
    init = state_of(vq)
    vq.double()  # fp64: docs/parity.md (Adam's first steps are +-lr whatever |gradient| is)
    vq.get_input = lambda batch, key: batch[key].permute(0, 3, 1, 2)  # theirs casts to fp32
    vq.model_ema = LitEma(vq)  # of the perturbed weights (made at construction otherwise)
    batches = torch.rand(steps, 2, 3, TRAIN_IMAGE, TRAIN_IMAGE, generator=gen) * 2 - 1
    smallest = []
    vq.encoder.register_forward_hook(lambda m, i, o: smallest.append(o.detach().abs().min().item()))
    params = lambda mods: [p for m in mods for p in m.parameters()]  # noqa: E731
    opt_g = torch.optim.Adam(params([vq.encoder, vq.decoder, vq.quantize]), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(vq.loss.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    vq.optimizers = lambda: (opt_g, opt_d)
    vq.manual_backward = lambda loss: loss.backward()
    vq.log_dict = lambda *a, **k: None
    profiler = types.SimpleNamespace(start=lambda *a: None, stop=lambda *a: None)
    vq.trainer = types.SimpleNamespace(profiler=profiler)
    vq.train()
    vq.loss.perceptual_loss.eval()  # Lightning would leave LPIPS' dropout on: docs/parity.md
    for step in range(steps):
        vq.global_step = step
        vq.training_step({"image": batches[step].double().permute(0, 2, 3, 1)}, step)
        vq.on_train_batch_end()
    print(f"training run: smallest |latent| {min(smallest):.2e}")
    if min(smallest) < MARGIN:
        return None
    out = {f"init.{k}": v.half() for k, v in init.items() if v.is_floating_point()}
    out.update({f"init.{k}": v for k, v in init.items() if not v.is_floating_point()})
    out["batches"] = batches
    flat = {k.replace(".", ""): v for k, v in init.items()}
    for k, v in state_of(vq).items():
        delta = (v - init[k].double()).float() if v.is_floating_point() else v
        out[f"final.{k}"] = delta.half() if "running_" not in k else delta  # BN stats: fp32
    out.update({f"ema.{k}": ((v - flat[k].double()) * EMA_SCALE).half() for k, v in vq.model_ema.state_dict().items()
                if k not in ("decay", "num_updates")})
    out["lecam"] = torch.tensor([vq.loss.lecam_ema.logits_real_ema, vq.loss.lecam_ema.logits_fake_ema],
                                dtype=torch.float64)
    return {k: v.contiguous() for k, v in out.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wetok", type=Path, help="checkout of zhuangshaobin/WeTok")
    parser.add_argument("magvit2", type=Path, help="checkout of TencentARC/SEED-Voken")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "parity")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)  # the reference modules' own initialisation (then perturbed)
    stub_imports(args.wetok)
    gen = torch.Generator().manual_seed(0)
    weights, outputs = main_fixtures(args.magvit2, gen)
    train = train_fixtures(gen)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"source": "tools/parity_fixtures.py", "torch": torch.__version__}
    save_file(weights, str(args.out / "model.safetensors"), metadata=meta)
    save_file(outputs, str(args.out / "outputs.safetensors"), metadata=meta)
    save_file(train, str(args.out / "train.safetensors"), metadata=meta)
    for name in ("model", "outputs", "train"):
        print(f"{args.out / name}.safetensors  {(args.out / f'{name}.safetensors').stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
