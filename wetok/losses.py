"""Tokenizer losses: reconstruction + LPIPS + GAN (generator side) and hinge + LeCam (D side).

Generator objective (paper Eq. 3; official weights as defaults):

    L_G = recon_weight * |x - x_rec|  (l1 or l2)
        + perceptual_weight * LPIPS_vgg(x, x_rec)
        + w_gan * L_gan(D(x_rec))                 # non-saturating softplus(-D); Eq. 10
        + commit_weight * ||u - sg(q)||^2
        + entropy_weight * (H_token - zeta * H_codebook)

with w_gan = gan_weight (fixed, official) or gan_weight * ||dL_rec/dW|| / (||dL_gan/dW|| + 1e-4)
(adaptive, VQGAN; W = the decoder's last layer), and w_gan = 0 before ``disc_start``.
Discriminator objective (Eq. 11): hinge + lecam_weight * LeCam, also 0 before ``disc_start``.

LPIPS runs only in :meth:`WeTokLoss.generator`: the discriminator side takes logits only, so
the perceptual network runs once per training step (the reference code runs it in both passes).
Log dicts hold detached 0-dim tensors (no host sync per step; call ``float()`` when logging).
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F

from wetok import weights as W
from wetok.distributed import mean_over_ranks
from wetok.quantize import at_least_fp32 as _f32

# ---- perceptual loss ------------------------------------------------------------------------


class LPIPS(nn.Module):
    """LPIPS (lpips package, VGG16 trunk, version 0.1), frozen and always in eval mode.

    forward(x, y) -> (B,) distances; inputs in [-1, 1], (B, 3, H, W). The trunk is built with
    ``pnet_rand=True`` (nothing is downloaded) and then loaded from ``vgg16-397923af.pth`` found
    by :mod:`wetok.weights` (``vgg16_path`` or ``$TORCH_HOME/hub/checkpoints``); the linear
    layers ship in the lpips wheel. ``random_trunk=True`` keeps a seeded random trunk: FOR TESTS
    ONLY -- its values are not LPIPS.
    """

    def __init__(self, vgg16_path: str | os.PathLike | None = None, random_trunk: bool = False,
                 seed: int = 0):
        super().__init__()
        path = None if random_trunk else W.find_weights("vgg16", vgg16_path)  # fail before building
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")  # torchvision's `pretrained=` deprecation notices
            torch.manual_seed(seed)
            net = lpips.LPIPS(pretrained=True, net="vgg", version="0.1", pnet_rand=True,
                              verbose=False)
        if path is not None:
            _load_vgg_trunk(net.net, path)
        self.net = net.requires_grad_(False).eval()
        self.random_trunk = random_trunk

    def train(self, mode: bool = True):  # frozen: dropout of the linear layers stays off
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """lpips.LPIPS.forward (version 0.1, spatial average) with its 1x1 'lin' convs applied
        as the weighted channel sums they are, so that torch.compile fuses the head instead of
        writing out every squared feature difference (tested equal to the package's forward)."""
        net = self.net
        fx, fy = net.net(net.scaling_layer(x)), net.net(net.scaling_layer(y))
        total = 0
        for k in range(net.L):
            diff = (lpips.normalize_tensor(fx[k]) - lpips.normalize_tensor(fy[k])) ** 2
            weight = net.lins[k].model[-1].weight.view(1, -1, 1, 1)  # (1, C, 1, 1) conv, no bias
            total = total + (diff * weight).sum(1).mean((1, 2))
        return total


def _load_vgg_trunk(trunk: nn.Module, path) -> None:
    """Copy torchvision's ``features.<i>.*`` tensors into lpips' ``slice<k>.<i>.*`` layers
    (memory-mapped: the 528 MB file's classifier, 89% of it, is never read)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    mapped, missing = {}, []
    for key in trunk.state_dict():
        _, idx, leaf = key.split(".")          # slice<k>.<i>.weight: i is torchvision's index
        src = f"features.{idx}.{leaf}"
        if src in state:
            mapped[key] = state[src]
        else:
            missing.append(src)
    if missing:
        raise ValueError(f"{path} is not a torchvision VGG16 state dict (missing {missing[:3]}...)")
    trunk.load_state_dict(mapped, strict=True)


# ---- GAN terms ------------------------------------------------------------------------------


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss (Eq. 11): 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_rec)))."""
    return 0.5 * (F.relu(1.0 - _f32(logits_real)).mean()
                  + F.relu(1.0 + _f32(logits_fake)).mean())


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator non-saturating loss (Eq. 10): mean softplus(-D(x_rec)) = -mean log sigmoid(D)."""
    return F.softplus(-_f32(logits_fake)).mean()


def non_saturating_per_image_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The official code's form of Eq. 10: softplus(-mean of each image's patch logits), averaged
    over the images (the mean over patches comes before the nonlinearity)."""
    return F.softplus(-_f32(logits_fake).flatten(1).mean(1)).mean()


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator hinge loss (VQGAN's variant): -mean D(x_rec)."""
    return -_f32(logits_fake).mean()


GEN_LOSSES = {"non_saturating": non_saturating_g_loss,
              "non_saturating_per_image": non_saturating_per_image_g_loss, "hinge": hinge_g_loss}
RECON_LOSSES = ("l1", "l2")
LOSS_KEYS = ("recon", "recon_weight", "perceptual_weight", "gan_weight", "adaptive_gan_weight",
             "gen_loss", "disc_start", "lecam_weight", "lecam_decay", "lecam_sync")
QUANTIZER_KEYS = ("commit_weight", "entropy_weight", "zeta")  # the quantizer terms' weights


def loss_arguments(loss_cfg: Mapping[str, Any],
                   quantizer_cfg: Mapping[str, Any] | None = None) -> dict:
    """WeTokLoss arguments from the ``loss`` / ``quantizer`` config groups (dicts or
    DictConfigs; the config validator calls this too, before anything is built).

    Discriminator-architecture keys (``disc_*`` other than ``disc_start``) and quantizer keys
    other than QUANTIZER_KEYS are ignored; any other ``loss`` key is an error (ValueError).
    """
    kwargs = {}
    for key in loss_cfg.keys():
        if key in LOSS_KEYS:
            kwargs[key] = loss_cfg[key]
        elif not (str(key).startswith("disc_") or key in ("name", "_target_")):
            raise ValueError(f"{key}: expected a loss option ({', '.join(LOSS_KEYS)}), "
                             f"got an unknown key")
    if quantizer_cfg is not None:
        kwargs.update({key: quantizer_cfg[key] for key in QUANTIZER_KEYS})
    return kwargs


def check_loss(recon: str, gen_loss: str) -> None:
    """The one check of WeTokLoss's loss choices (ValueError "key: expected ..., got ...")."""
    for key, value, allowed in (("recon", recon, RECON_LOSSES), ("gen_loss", gen_loss, GEN_LOSSES)):
        if value not in allowed:
            raise ValueError(f"{key}: expected one of {'|'.join(allowed)}, got {value!r}")


def adaptive_gan_weight(rec_loss: torch.Tensor, gan_loss: torch.Tensor, last_layer: torch.Tensor,
                        eps: float = 1e-4, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN adaptive weight ||d rec/dW|| / (||d gan/dW|| + eps), clamped to [0, 1e4], detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_gan.norm() + eps)
    return w.clamp(0.0, max_weight).detach()


class LeCamEMA(nn.Module):
    """EMA of the mean real / fake discriminator logits (buffers, so it is checkpointed).

    LeCam regulariser (Eq. 11): mean(relu(D(x) - ema_fake)^2) + mean(relu(ema_real - D(x_rec))^2).
    Buffers start at 0 and are updated (before the regulariser is evaluated) with decay 0.999.
    ``sync`` (config ``loss.lecam_sync``): under DDP the EMA follows the mean logits of the
    global batch, the same on every rank (so a resume, which gives every rank rank 0's state,
    continues exactly); off, each rank keeps its own EMA, as the reference code does.
    """

    def __init__(self, decay: float = 0.999, sync: bool = False):
        super().__init__()
        self.decay, self.sync = decay, sync
        self.register_buffer("ema_real", torch.zeros((), dtype=torch.float32))
        self.register_buffer("ema_fake", torch.zeros((), dtype=torch.float32))

    @torch.no_grad()
    def update(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> None:
        d = self.decay
        means = torch.stack([_f32(logits_real.detach()).mean(),
                             _f32(logits_fake.detach()).mean()])
        if self.sync:
            means = mean_over_ranks(means)
        self.ema_real.mul_(d).add_(means[0], alpha=1.0 - d)
        self.ema_fake.mul_(d).add_(means[1], alpha=1.0 - d)

    def forward(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        return (F.relu(_f32(logits_real) - self.ema_fake).pow(2).mean()
                + F.relu(self.ema_real - _f32(logits_fake)).pow(2).mean())


# ---- the full loss --------------------------------------------------------------------------


class WeTokLoss(nn.Module):
    """Generator and discriminator objectives (Eq. 3, 10, 11); official defaults.

    ``generator(x, x_rec, qout, logits_fake, step, last_layer=None) -> (total, logs)``
    ``discriminator(logits_real, logits_fake, step) -> (total, logs)``
    ``reconstruction(x, x_rec)`` -> recon_weight * recon + perceptual_weight * LPIPS (val loss).

    ``qout``: the quantizer output (``commit_loss``, ``token_entropy``, ``codebook_entropy``;
    entropies None at eval) or None (no quantizer terms). ``perceptual_weight=0`` (or
    ``perceptual=False``) does not build LPIPS at all. Its state_dict holds the LeCam EMA only
    (LPIPS is frozen, reloaded from the pretrained file).
    """

    def __init__(self, recon: str = "l1", recon_weight: float = 1.0,
                 perceptual_weight: float = 1.0, gan_weight: float = 0.1,
                 adaptive_gan_weight: bool = False, gen_loss: str = "non_saturating",
                 disc_start: int = 0, lecam_weight: float = 0.05, lecam_decay: float = 0.999,
                 lecam_sync: bool = False,
                 commit_weight: float = 0.25, entropy_weight: float = 0.1, zeta: float = 1.0,
                 vgg16_path: str | os.PathLike | None = None, random_lpips: bool = False):
        super().__init__()
        check_loss(recon, gen_loss)
        self.recon = recon
        self.recon_weight = recon_weight
        self.perceptual_weight = perceptual_weight
        self.gan_weight = gan_weight
        self.adaptive_gan_weight = adaptive_gan_weight
        self.gen_loss = gen_loss
        self.disc_start = disc_start
        self.lecam_weight = lecam_weight
        self.commit_weight = commit_weight
        self.entropy_weight = entropy_weight
        self.zeta = zeta
        self.perceptual = (LPIPS(vgg16_path, random_trunk=random_lpips)
                           if perceptual_weight > 0 else None)
        self.lecam = LeCamEMA(lecam_decay, lecam_sync)
        # LPIPS is frozen pretrained: keep it out of checkpoints (and tolerate its absence on load)
        self.register_state_dict_post_hook(_drop_perceptual_keys)
        self.register_load_state_dict_post_hook(_ignore_missing_perceptual)

    @classmethod
    def from_config(cls, loss_cfg: Mapping[str, Any],
                    quantizer_cfg: Mapping[str, Any] | None = None,
                    weights_cfg: Mapping[str, Any] | None = None, *, perceptual: bool = True,
                    random_lpips: bool = False) -> "WeTokLoss":
        """From the ``loss`` / ``quantizer`` / ``weights`` config groups (:func:`loss_arguments`;
        no quantizer group: the constructor's quantizer weights). ``perceptual=False`` drops
        LPIPS whatever its weight.
        """
        kwargs = loss_arguments(loss_cfg, quantizer_cfg)
        if not perceptual:
            kwargs["perceptual_weight"] = 0.0
        return cls(**kwargs, vgg16_path=W.configured_path(weights_cfg, "vgg16"),
                   random_lpips=random_lpips)

    # -- pieces --
    def gan_active(self, step: int) -> bool:
        """Whether GAN terms count at this step (step >= disc_start)."""
        return step >= self.disc_start

    def _gate(self, step: int | None, gan_active: bool | None = None) -> float:
        if gan_active is not None:  # decided by the caller (a compiled graph must not see step)
            return 1.0 if gan_active else 0.0
        if step is None:
            if self.disc_start > 0:
                raise ValueError("step is required when disc_start > 0")
            return 1.0
        return 1.0 if self.gan_active(step) else 0.0

    def recon_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        diff = _f32(x_rec) - _f32(x)
        return diff.abs().mean() if self.recon == "l1" else diff.pow(2).mean()

    def perceptual_loss(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        return _f32(self.perceptual(x, x_rec)).mean()

    def reconstruction(self, x: torch.Tensor, x_rec: torch.Tensor) -> torch.Tensor:
        """recon_weight * recon + perceptual_weight * LPIPS (when built): the validation loss."""
        total = self.recon_weight * self.recon_loss(x, x_rec)
        if self.perceptual is not None:
            total = total + self.perceptual_weight * self.perceptual_loss(x, x_rec)
        return total

    # -- generator side (Eq. 3 + Eq. 10) --
    def generator(self, x: torch.Tensor, x_rec: torch.Tensor, qout=None,
                  logits_fake: torch.Tensor | None = None, step: int | None = None,
                  last_layer: torch.Tensor | None = None, gan_active: bool | None = None):
        """``gan_active`` (when given) replaces the ``step >= disc_start`` test."""
        logs: dict[str, torch.Tensor] = {}
        rec = self.recon_loss(x, x_rec)
        nll = self.recon_weight * rec
        logs["loss_rec"] = rec.detach()
        if self.perceptual is not None:
            p = self.perceptual_loss(x, x_rec)
            nll = nll + self.perceptual_weight * p
            logs["loss_lpips"] = p.detach()
        total = nll

        gate = self._gate(step, gan_active)
        if logits_fake is not None and self.gan_weight > 0:
            g = GEN_LOSSES[self.gen_loss](logits_fake)
            if gate == 0.0:
                w = torch.zeros((), device=g.device)
            elif self.adaptive_gan_weight:
                if torch.is_grad_enabled():
                    if last_layer is None:
                        raise ValueError("adaptive_gan_weight needs last_layer "
                                         "(the decoder's last weight)")
                    w = adaptive_gan_weight(nll, g, last_layer) * self.gan_weight
                else:  # no graph (evaluation): the weight cannot be measured; VQGAN uses 0
                    w = torch.zeros((), device=g.device)
            else:
                w = torch.full((), float(self.gan_weight), device=g.device)
            total = total + w * g
            logs["loss_gan"] = g.detach()
            logs["gan_weight"] = w.detach()

        if qout is not None:
            commit = getattr(qout, "commit_loss", None)
            if commit is not None and self.commit_weight > 0:
                total = total + self.commit_weight * commit
                logs["loss_commit"] = commit.detach()
            h_tok = getattr(qout, "token_entropy", None)
            h_cb = getattr(qout, "codebook_entropy", None)
            if h_tok is not None and h_cb is not None:
                # Eq. 5: minimise the token entropy, maximise the codebook entropy
                aux = h_tok - self.zeta * h_cb
                if self.entropy_weight > 0:
                    total = total + self.entropy_weight * aux
                logs["loss_entropy"] = aux.detach()
                logs["token_entropy"] = h_tok.detach()
                logs["codebook_entropy"] = h_cb.detach()
        logs["loss"] = total.detach()
        return total, logs

    # -- discriminator side (Eq. 11) --
    def discriminator(self, logits_real: torch.Tensor, logits_fake: torch.Tensor,
                      step: int | None = None, gan_active: bool | None = None):
        """gate * (hinge + lecam_weight * LeCam); the LeCam EMA is updated first, only while
        training with gradients and past disc_start (as in the reference code). ``gan_active``
        (when given) replaces the ``step >= disc_start`` test."""
        gate = self._gate(step, gan_active)
        d = hinge_d_loss(logits_real, logits_fake)
        logs = {"loss_disc_hinge": d.detach(),
                "logits_real": logits_real.detach().float().mean(),
                "logits_fake": logits_fake.detach().float().mean()}
        total = d
        if self.lecam_weight > 0:
            if gate > 0 and self.training and torch.is_grad_enabled():
                self.lecam.update(logits_real, logits_fake)
            reg = self.lecam(logits_real, logits_fake)
            total = total + self.lecam_weight * reg
            logs["loss_lecam"] = reg.detach()
        total = gate * total
        logs["loss_disc"] = total.detach()
        return total, logs


def _drop_perceptual_keys(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "perceptual.")]:
        del state_dict[key]


def _ignore_missing_perceptual(module, incompatible_keys):
    missing = incompatible_keys.missing_keys
    missing[:] = [k for k in missing if not (k.startswith("perceptual.") or ".perceptual." in k)]
