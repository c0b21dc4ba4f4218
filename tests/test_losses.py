"""Weights lookup and training losses (CPU, fast)."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from wetok import losses as L
from wetok import weights as W
from wetok.losses import (LPIPS, LeCamEMA, WeTokLoss, adaptive_gan_weight, hinge_d_loss,
                          hinge_g_loss, non_saturating_g_loss)


@pytest.fixture(scope="module")
def rand_lpips():
    return LPIPS(random_trunk=True)


@pytest.fixture
def shared_lpips(rand_lpips, monkeypatch):
    """WeTokLoss(perceptual_weight > 0) reuses the module's random LPIPS (builds take ~2 s)."""
    monkeypatch.setattr(L, "LPIPS", lambda *a, **k: rand_lpips)
    return rand_lpips


# ---- weights ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,file", [("vgg16", W.VGG16_FILE), ("inception", W.INCEPTION_FILE)])
def test_missing_weights_message(torch_home, name, file):
    folder = torch_home / "hub" / "checkpoints"
    with pytest.raises(W.MissingWeightsError) as exc:
        W.find_weights(name)
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    assert file in msg and str(folder) in msg and f"weights.{name}" in msg
    assert "\n" not in msg
    # an explicit missing path names it too
    with pytest.raises(W.MissingWeightsError) as exc:
        W.resolve(name, {name: str(torch_home / "nowhere.pth")})
    assert "nowhere.pth" in str(exc.value) and file in str(exc.value)


def test_weights_found(torch_home, tmp_path):
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / W.VGG16_FILE).write_bytes(b"x")
    assert W.find_weights("vgg16") == folder / W.VGG16_FILE
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / W.INCEPTION_FILE).write_bytes(b"x")
    assert W.resolve("inception", {"inception": str(other)}) == other / W.INCEPTION_FILE
    assert W.resolve("inception", {"inception": str(other / W.INCEPTION_FILE)}) == \
        other / W.INCEPTION_FILE


def test_lpips_missing_raises_without_download(torch_home):
    with pytest.raises(W.MissingWeightsError):
        LPIPS()
    with pytest.raises(W.MissingWeightsError):
        WeTokLoss(perceptual_weight=1.0)
    loss = WeTokLoss(perceptual_weight=0.0)  # LPIPS never built: fine offline
    assert loss.perceptual is None


def test_lpips_loads_trunk_from_file(torch_home, rand_lpips):
    """A torchvision-style features.* state dict ends up in the lpips trunk."""
    fake = {}
    for key, v in rand_lpips.net.net.state_dict().items():
        _, idx, leaf = key.split(".")
        fake[f"features.{idx}.{leaf}"] = torch.full_like(v, 0.01 * int(idx))
    folder = torch_home / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(fake, folder / W.VGG16_FILE)
    m = LPIPS()
    assert not torch.equal(getattr(m.net.net.slice3, "10").weight,
                           getattr(rand_lpips.net.net.slice3, "10").weight)
    w10 = getattr(m.net.net.slice3, "10").weight
    assert torch.equal(w10, torch.full_like(w10, 0.1))
    assert all(not p.requires_grad for p in m.parameters())


def test_lpips_random_trunk(rand_lpips):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = (x + 0.3 * torch.randn_like(x)).clamp(-1, 1)
    d1 = rand_lpips(x, y)
    d2 = LPIPS(random_trunk=True)(x, y)             # same seed -> same network
    assert d1.shape == (2,)
    assert torch.allclose(d1, d2)
    assert torch.all(d1 > 0)
    assert torch.allclose(rand_lpips(x, x), torch.zeros(2), atol=1e-7)
    rand_lpips.train()
    assert not rand_lpips.training and not rand_lpips.net.training


def test_lpips_head_equals_package_forward():
    """The fused head (weighted channel sums) gives lpips.LPIPS.forward's values and gradients."""
    m = LPIPS(random_trunk=True)
    torch.manual_seed(1)
    with torch.no_grad():  # non-uniform lin weights, so that a wrong channel weighting shows
        for lin in m.net.lins:
            lin.model[-1].weight.uniform_(0.0, 2.0)
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    y = ((x + 0.3 * torch.randn_like(x)).clamp(-1, 1)).requires_grad_()
    ours = m(x, y)
    ref = m.net(x, y).flatten()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    g1, = torch.autograd.grad(ours.sum(), y)
    g2, = torch.autograd.grad(ref.sum(), y)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-8)


def test_loss_state_dict_excludes_lpips(shared_lpips):
    loss = WeTokLoss(perceptual_weight=1.0, random_lpips=True)
    sd = loss.state_dict()
    assert set(sd) == {"lecam.ema_real", "lecam.ema_fake"}
    loss.load_state_dict(sd)  # strict load works without the LPIPS keys
    parent = nn.Module()
    parent.loss = loss
    parent.load_state_dict(parent.state_dict())


# ---- GAN terms ----------------------------------------------------------------------------

def test_hinge_and_ns_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, .5, 2] -> mean 5/6 ; relu(1 + fake) = [0, 1, 2] -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    expected = sum(math.log1p(math.exp(-v)) for v in fake.tolist()) / 3
    assert non_saturating_g_loss(fake).item() == pytest.approx(expected)
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)


def test_lecam_value_and_ema():
    ema = LeCamEMA(decay=0.9)
    ema.ema_real.fill_(1.0)
    ema.ema_fake.fill_(-1.0)
    real = torch.tensor([0.0, 2.0])   # relu(real - (-1)) = [1, 3] -> mean of squares 5
    fake = torch.tensor([0.5, 3.0])   # relu(1 - fake) = [.5, 0] -> mean of squares .125
    assert ema(real, fake).item() == pytest.approx(5.125)
    ema.update(real, fake)
    assert ema.ema_real.item() == pytest.approx(0.9 * 1.0 + 0.1 * 1.0)
    assert ema.ema_fake.item() == pytest.approx(0.9 * -1.0 + 0.1 * 1.75)


def test_discriminator_loss_lecam_and_gating():
    loss = WeTokLoss(perceptual_weight=0, lecam_weight=0.05, lecam_decay=0.999, disc_start=5)
    real = torch.tensor([0.5, 1.5], requires_grad=True)
    fake = torch.tensor([-0.5, 0.2], requires_grad=True)
    total, logs = loss.discriminator(real, fake, 3)      # before disc_start: 0, EMA untouched
    assert total.item() == 0.0 and loss.lecam.ema_real.item() == 0.0
    total.backward()                                     # still differentiable
    total, logs = loss.discriminator(real, fake, 5)
    ema_r, ema_f = 0.001 * 1.0, 0.001 * -0.15            # updated before the regulariser
    assert loss.lecam.ema_real.item() == pytest.approx(ema_r)
    assert loss.lecam.ema_fake.item() == pytest.approx(ema_f)
    reg = (F.relu(real - ema_f).pow(2).mean() + F.relu(ema_r - fake).pow(2).mean()).item()
    expected = hinge_d_loss(real, fake).item() + 0.05 * reg
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert logs["loss_disc"].item() == pytest.approx(expected, rel=1e-5)
    with torch.no_grad():                                # evaluation: EMA not updated
        loss.discriminator(real, fake, 6)
    assert loss.lecam.ema_real.item() == pytest.approx(ema_r)


def _qout(commit=0.2, tok=1.5, cb=4.0):
    t = lambda v: torch.tensor(v, requires_grad=True)  # noqa: E731
    return SimpleNamespace(commit_loss=t(commit), token_entropy=t(tok), codebook_entropy=t(cb))


def test_generator_total_and_disc_start_gating():
    loss = WeTokLoss(perceptual_weight=0, gan_weight=0.1, disc_start=10, commit_weight=0.25,
                     entropy_weight=0.1, zeta=1.0)
    x = torch.zeros(1, 3, 4, 4)
    x_rec = torch.full((1, 3, 4, 4), 0.5)
    logits = torch.tensor([[-1.0, 2.0]])
    g = non_saturating_g_loss(logits).item()
    base = 0.5 + 0.25 * 0.2 + 0.1 * (1.5 - 4.0)
    before, logs0 = loss.generator(x, x_rec, _qout(), logits, 9)
    after, logs1 = loss.generator(x, x_rec, _qout(), logits, 10)
    assert before.item() == pytest.approx(base)
    assert after.item() == pytest.approx(base + 0.1 * g)
    assert logs0["gan_weight"].item() == 0.0 and logs1["gan_weight"].item() == pytest.approx(0.1)
    assert logs1["loss_rec"].item() == pytest.approx(0.5)
    assert not loss.gan_active(9) and loss.gan_active(10)
    with pytest.raises(ValueError):
        loss.generator(x, x_rec, _qout(), logits)         # step needed when disc_start > 0
    for active, total in ((False, before), (True, after)):  # the compiled trainer passes a bool
        same, _ = loss.generator(x, x_rec, _qout(), logits, gan_active=active)
        assert same.item() == pytest.approx(total.item())
    l2 = WeTokLoss(recon="l2", perceptual_weight=0, gan_weight=0.0)
    total, _ = l2.generator(x, x_rec, None, None)
    assert total.item() == pytest.approx(0.25)


def test_entropy_aux_sign():
    loss = WeTokLoss(perceptual_weight=0, gan_weight=0, commit_weight=0, entropy_weight=1.0,
                     zeta=2.0)
    q = _qout(tok=1.0, cb=3.0)
    x = torch.zeros(1, 3, 2, 2)
    total, logs = loss.generator(x, x, q, None, 0)
    assert total.item() == pytest.approx(1.0 - 2.0 * 3.0)
    total.backward()
    assert q.token_entropy.grad.item() == pytest.approx(1.0)      # token entropy minimised
    assert q.codebook_entropy.grad.item() == pytest.approx(-2.0)  # codebook entropy maximised
    assert logs["loss_entropy"].item() == pytest.approx(-5.0)


def test_adaptive_weight_matches_manual_autograd():
    torch.manual_seed(0)
    dec = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 3, 3, padding=1))
    disc = nn.Conv2d(3, 1, 3)
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    last = dec[2].weight
    loss = WeTokLoss(perceptual_weight=0, gan_weight=0.1, adaptive_gan_weight=True,
                     commit_weight=0, entropy_weight=0)

    x_rec = dec(x)
    total, logs = loss.generator(x, x_rec, None, disc(x_rec), 0, last_layer=last)

    x_rec2 = dec(x)  # manual, on a fresh graph
    rec = (x_rec2 - x).abs().mean()
    g = F.softplus(-disc(x_rec2)).mean()
    gr = torch.autograd.grad(rec, last, retain_graph=True)[0]
    gg = torch.autograd.grad(g, last, retain_graph=True)[0]
    w = (gr.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4) * 0.1
    assert logs["gan_weight"].item() == pytest.approx(w.item(), rel=1e-5)
    assert total.item() == pytest.approx((rec + w * g).item(), rel=1e-5)
    assert adaptive_gan_weight(rec, g, last).item() == pytest.approx(w.item() / 0.1, rel=1e-5)
    with pytest.raises(ValueError):
        loss.generator(x, dec(x), None, disc(x_rec), 0)   # adaptive needs last_layer


def test_lpips_in_generator_once(shared_lpips, monkeypatch):
    """LPIPS runs in the generator pass only, never in the discriminator pass."""
    loss = WeTokLoss(perceptual_weight=1.0, random_lpips=True)
    calls = []
    orig = loss.perceptual.forward
    monkeypatch.setattr(loss.perceptual, "forward", lambda a, b: calls.append(1) or orig(a, b))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    x_rec = (x + 0.1).clamp(-1, 1)
    total, logs = loss.generator(x, x_rec, _qout(), torch.zeros(1, 1, 2, 2), 0)
    assert logs["loss_lpips"].item() > 0
    loss.discriminator(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), 0)
    assert len(calls) == 1
    rec = loss.reconstruction(x, x_rec)
    expected = logs["loss_rec"].item() + logs["loss_lpips"].item()
    assert rec.item() == pytest.approx(expected, rel=1e-5)


def test_from_config():
    loss_cfg = {"recon": "l2", "recon_weight": 2.0, "perceptual_weight": 0.0, "gan_weight": 0.2,
                "adaptive_gan_weight": False, "disc_start": 7, "lecam_weight": 0.01,
                "lecam_decay": 0.99, "disc_ndf": 64, "disc_layers": 3}
    q_cfg = {"name": "gq", "groups": 4, "group_dim": 8, "commit_weight": 0.5,
             "entropy_weight": 0.2, "zeta": 0.5}
    loss = WeTokLoss.from_config(loss_cfg, q_cfg, {"vgg16": None, "inception": None})
    assert (loss.recon, loss.recon_weight, loss.gan_weight, loss.disc_start) == ("l2", 2.0, 0.2, 7)
    assert (loss.lecam_weight, loss.lecam.decay) == (0.01, 0.99)
    assert (loss.commit_weight, loss.entropy_weight, loss.zeta) == (0.5, 0.2, 0.5)
    assert loss.perceptual is None
    no_lpips = WeTokLoss.from_config({"perceptual_weight": 1.0}, None, perceptual=False)
    assert no_lpips.perceptual is None
    with pytest.raises(ValueError):
        WeTokLoss.from_config({"recon_wieght": 1.0}, None)


def test_defaults_are_official():
    sig = WeTokLoss.__init__.__defaults__
    d = dict(zip(WeTokLoss.__init__.__code__.co_varnames[1:1 + len(sig)], sig))
    assert d == {"recon": "l1", "recon_weight": 1.0, "perceptual_weight": 1.0, "gan_weight": 0.1,
                 "adaptive_gan_weight": False, "gen_loss": "non_saturating", "disc_start": 0,
                 "lecam_weight": 0.05, "lecam_decay": 0.999, "lecam_sync": False,
                 "commit_weight": 0.25,
                 "entropy_weight": 0.1, "zeta": 1.0, "vgg16_path": None, "random_lpips": False}
