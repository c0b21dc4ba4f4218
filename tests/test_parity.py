"""Numerical parity with the official WeTok / Open-MAGVIT2 code, from committed golden files.

tests/fixtures/parity/ is written by ``python tools/parity_fixtures.py WETOK MAGVIT2`` (the
reference code run on seeded, perturbed weights); these tests need only those files. Weights are
read through ``wetok.convert`` (the reference key names), so the conversion is tested too. The
project runs at the reference's settings: ``quantizer.entropy_mode=pooled``,
``quantizer.entropy_reduction=mean``, ``quantizer.entropy_eps=1e-5``,
``loss.gen_loss=non_saturating_per_image``, ``train.ema_warmup=false`` (docs/parity.md).
LPIPS: one seeded random trunk (NOT pretrained LPIPS) on both sides.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

import wetok.config  # noqa: F401  (run_id resolver)
from wetok import convert
from wetok.discriminator import NLayerDiscriminator
from wetok.losses import WeTokLoss
from wetok.model import build_model
from wetok.quantize import GroupQuantizer

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures" / "parity"
GROUPS = {"gfq": 2, "lfq": 1}
LOSS = {"gen_loss": "non_saturating_per_image", "gan_weight": 0.1, "lecam_weight": 0.05,
        "commit_weight": 0.25, "entropy_weight": 0.1, "zeta": 1.0, "adaptive_gan_weight": False}
MEAN_REDUCTION = "entropy_reduction" in GroupQuantizer.__init__.__code__.co_varnames


def needs_mean_reduction(groups: int):
    if groups > 1 and not MEAN_REDUCTION:
        pytest.skip("g > 1 needs quantizer.entropy_reduction=mean (the official averaging over "
                    "groups), not in this checkout")


@pytest.fixture(scope="module")
def weights():
    return {k: v.float() if v.is_floating_point() else v
            for k, v in load_file(str(FIX / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def golden():
    return load_file(str(FIX / "outputs.safetensors"))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def project_model(weights, groups: int, generative: bool = False):
    ref = {k: v for k, v in weights.items() if not k.startswith("gan.")}
    if generative:
        ref.update({k[len("gan."):]: v for k, v in weights.items() if k.startswith("gan.")})
    cfg = convert.resolve_config(ref, {}, None, groups)
    raw, ema, disc, unknown = convert.split_state(ref)
    assert not unknown and ema is None
    model = build_model({"channels": cfg["channels"], "channel_mult": cfg["channel_mult"],
                         "downsample": cfg["downsample"], "num_res_blocks": cfg["num_res_blocks"]},
                        {"groups": groups, "group_dim": cfg["d"] // groups,
                         **convert.REFERENCE_QUANTIZER}, generative=cfg["generative"])
    model.load_state_dict(raw)
    d = NLayerDiscriminator(ndf=disc["main.0.weight"].shape[0])
    d.load_state_dict(disc)
    return model, d


def test_config_from_shapes(weights):
    cfg = convert.shape_config(weights)
    assert cfg == {"channels": 32, "channel_mult": [1, 1, 1, 1, 2], "num_res_blocks": 1, "d": 16,
                   "downsample": 16, "generative": False, "disc_ndf": 8, "disc_layers": 3}


@pytest.mark.parametrize("name", ["gfq", "lfq"])
def test_encoder_quantizer_decoder(weights, golden, name):
    model, _ = project_model(weights, GROUPS[name])
    model.eval()
    with torch.no_grad():
        latent = model.encoder(golden["x"])
        q = model.quantizer(latent)
        rec = model.decoder(q.z_q)
    assert (latent - golden[f"{name}.latent"]).abs().max() <= 1e-5
    assert (q.z_q - golden[f"{name}.z_q"]).abs().max() <= 1e-5
    # reference indices: (b, h*w, g) flattened
    assert torch.equal(q.indices.permute(0, 2, 3, 1).flatten(), golden[f"{name}.indices"].long())
    assert (rec - golden[f"{name}.rec"]).abs().max() <= 1e-5


def test_generative_decoder(weights, golden):
    model, _ = project_model(weights, 2, generative=True)
    with torch.no_grad():
        rec = model.eval().decoder(golden["gfq.z_q"], noise=golden["gan.noise"])
    assert (rec - golden["gan.rec"]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["gfq", "lfq"])
def test_entropy_commitment_aux(weights, golden, name):
    needs_mean_reduction(GROUPS[name])
    model, _ = project_model(weights, GROUPS[name])
    latent = golden[f"{name}.latent"].clone().requires_grad_(True)
    q = model.quantizer.train()(latent)
    aux = q.token_entropy - LOSS["zeta"] * q.codebook_entropy
    assert rel(q.token_entropy, golden[f"{name}.token_entropy"]) <= 1e-5
    assert rel(q.codebook_entropy, golden[f"{name}.codebook_entropy"]) <= 1e-5
    assert rel(LOSS["entropy_weight"] * aux, golden[f"{name}.aux_loss"]) <= 1e-5
    assert rel(q.commit_loss, golden[f"{name}.commit_loss"]) <= 1e-5
    # the gradient: saturated sigmoids (logits 400 u) leave fp32 rounding of ~7e-4 of its
    # largest entry in both codes (each against fp64); in fp64 the two agree to 1e-11
    grad, = torch.autograd.grad(aux, latent)
    assert rel(grad, golden[f"{name}.aux_grad"]) <= 3e-3


def test_discriminator_and_losses(weights, golden):
    needs_mean_reduction(2)
    model, disc = project_model(weights, 2)
    x, rec = golden["x"], golden["gfq.rec"]
    disc.train()
    with torch.no_grad():
        real, fake = disc(x), disc(rec)
    assert (real - golden["disc.logits_real"]).abs().max() <= 1e-5
    assert (fake - golden["disc.logits_fake"]).abs().max() <= 1e-5
    loss = WeTokLoss(perceptual_weight=1.0, random_lpips=True, **LOSS).train()
    d_total, d_logs = loss.discriminator(real, fake)
    assert rel(d_logs["loss_disc_hinge"], golden["loss.d_hinge"]) <= 1e-5
    assert rel(d_logs["loss_lecam"], golden["loss.lecam"]) <= 1e-5
    assert rel(d_total, golden["loss.d_total"]) <= 1e-5
    q = model.quantizer.train()(golden["gfq.latent"])
    g_total, g_logs = loss.generator(x, rec, q, fake)
    nll = g_logs["loss_rec"] + g_logs["loss_lpips"]
    assert rel(g_logs["loss_lpips"], golden["loss.lpips"]) <= 1e-5
    assert rel(nll, golden["loss.nll"]) <= 1e-5
    assert rel(g_logs["gan_weight"] * g_logs["loss_gan"], golden["loss.g_gan"]) <= 1e-5
    assert rel(g_total, golden["loss.g_total"]) <= 1e-5


def _official_ckpt(train: dict, path: Path) -> None:
    """The fixture's initial weights as an official Lightning .ckpt (with LitEma's names)."""
    sd = {k[len("init."):]: v.float() if v.is_floating_point() else v
          for k, v in train.items() if k.startswith("init.")}
    ema = {"model_ema." + k.replace(".", ""): v for k, v in sd.items()
           if v.is_floating_point() and "running_" not in k}
    torch.save({"state_dict": {**sd, **ema, "model_ema.decay": torch.tensor(0.999),
                               "model_ema.num_updates": torch.tensor(-1)}}, path)


def test_three_training_steps(tmp_path):
    needs_mean_reduction(2)
    train = load_file(str(FIX / "train.safetensors"))
    src = tmp_path / "official.ckpt"
    _official_ckpt(train, src)
    out = tmp_path / "converted"
    cfg = convert.convert(src, out, groups=2)
    overrides = [f"run_dir={tmp_path / 'run'}", f"init_from={out / convert.CHECKPOINT_NAME}",
                 f"model.channels={cfg['channels']}", f"model.channel_mult={cfg['channel_mult']}",
                 f"model.downsample={cfg['downsample']}", f"model.num_res_blocks={cfg['num_res_blocks']}",
                 "quantizer.groups=2", "quantizer.group_dim=8", "quantizer.entropy_mode=pooled",
                 "quantizer.entropy_eps=1e-5", "+quantizer.entropy_reduction=mean"
                 if "entropy_reduction" not in (ROOT / "conf/quantizer/gq.yaml").read_text()
                 else "quantizer.entropy_reduction=mean",
                 "loss=default", "loss.perceptual_weight=0", "loss.gen_loss=non_saturating_per_image",
                 "loss.disc_ndf=8", "train.ema_warmup=false", "train.batch_size=2",
                 "train.precision=fp32", "train.device=cpu", "data.image_size=32"]
    from wetok.losses import LPIPS
    from wetok.train import Trainer

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        trainer = Trainer(compose("config", overrides=overrides))
    trainer.loss.perceptual, trainer.loss.perceptual_weight = LPIPS(random_trunk=True), 1.0
    for module in (trainer.model, trainer.ema, trainer.disc, trainer.loss):
        module.double()  # in place: the optimizers keep their parameters
    for x in train["batches"]:
        trainer.train_step([x.double()])
    init = {k[len("init."):]: v.float() if v.is_floating_point() else v
            for k, v in train.items() if k.startswith("init.")}
    flat = {k.replace(".", ""): v for k, v in init.items()}
    final = {}  # stored as fp16 differences from the initial weights
    for k, v in train.items():
        if k.startswith("final."):
            k = k[len("final."):]
            final[k] = init[k].double() + v.double() if v.is_floating_point() else v
        elif k.startswith("ema."):
            final["model_ema." + k[4:]] = flat[k[4:]] + v.double() / 1000  # stored x 1000
    raw, ema, disc, _ = convert.split_state(final)
    start, _, start_disc, _ = convert.split_state(init)
    worst, moved = {}, {}
    for name, mine, ref, first in (("model", trainer.model.state_dict(), raw, start),
                                   ("ema", trainer.ema.state_dict(), ema, start),
                                   ("disc", trainer.disc.state_dict(), disc, start_disc)):
        for k, v in ref.items():
            if not v.is_floating_point():
                assert torch.equal(mine[k], v), k
                continue
            worst[f"{name}.{k}"] = rel(mine[k], v)
            if (v - first[k]).abs().max() > 0:  # the three steps' change itself (fp16-stored)
                moved[f"{name}.{k}"] = rel(mine[k] - first[k], v - first[k])
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
    assert max(moved.values()) <= 2e-3, sorted(moved.items(), key=lambda kv: -kv[1])[:3]
    lecam = torch.stack([trainer.loss.lecam.ema_real, trainer.loss.lecam.ema_fake])
    assert rel(lecam, train["lecam"]) <= 1e-5


def _write_official(weights, path: Path, **extra) -> None:
    sd = {k: v for k, v in weights.items() if not k.startswith("gan.")}
    torch.save({"state_dict": {**sd, **extra}}, path)


def test_convert_cli_errors_are_one_line_and_write_nothing(weights, tmp_path, capsys):
    src = tmp_path / "bad.ckpt"
    bad = {"encoder.conv_in.weight": torch.zeros(32, 3, 5, 5)}
    _write_official({**weights, **bad}, src, **{"encoder.extra.weight": torch.zeros(1)})
    assert convert.main([str(src), str(tmp_path / "out"), "--groups", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown: encoder.extra.weight" in err and "mis-shaped: encoder.conv_in.weight" in err
    assert not (tmp_path / "out").exists()
    assert convert.main([str(src), str(tmp_path / "out")]) == 2  # no g anywhere
    assert "--groups" in capsys.readouterr().err


def test_convert_yaml_agreement_fallback_warning_and_tokenizer(weights, golden, tmp_path):
    from wetok.api import Tokenizer

    yaml = tmp_path / "official.yaml"
    yaml.write_text("model:\n  init_args:\n    ddconfig: {ch: 32, ch_mult: [1,1,1,1,2], "
                    "num_res_blocks: 1, z_channels: 16}\n    n_embed: 256\n    num_codebooks: 2\n")
    src = tmp_path / "official.ckpt"
    _write_official(weights, src)
    torch.save({"state_dict": torch.load(src)["state_dict"], "extra": Path("x")}, src)
    with pytest.warns(UserWarning, match=str(src.name)):  # a Path object needs full unpickling
        convert.convert(src, tmp_path / "out", yaml_path=yaml)
    with pytest.raises(convert.ConvertError, match="groups"):
        convert.convert(src, tmp_path / "out2", yaml_path=yaml, groups=4)
    assert not (tmp_path / "out2").exists()
    tok = Tokenizer.load(tmp_path / "out")
    idx = tok.encode(golden["x"])
    assert torch.equal(idx.permute(0, 2, 3, 1).flatten(), golden["gfq.indices"].long())
