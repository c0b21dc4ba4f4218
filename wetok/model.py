"""Open-MAGVIT2 CNN encoder / decoder as used by WeTok, and the generative decoder (paper Sec 3.3).

No attention anywhere. Architecture (reference code facts, see docs/DESIGN.md):

* ResBlock: GN(32) -> SiLU -> conv3x3 (no bias) -> GN(32) -> SiLU -> conv3x3 (no bias), plus a
  1x1 (no bias) shortcut when the channel count changes. GroupNorm eps is 1e-6.
* Encoder: conv_in 3x3 (no bias) -> per level ``B`` ResBlocks (the first one of a level changes
  the channels to ``C * channel_mult[level]``) then a stride-2 3x3 conv (with bias) except after
  the last level -> ``B`` mid ResBlocks -> GN -> SiLU -> 1x1 conv (with bias) to ``d``.
* Decoder: conv_in 3x3 (with bias) from ``d`` (``2d`` when generative) -> ``B`` mid ResBlocks ->
  per level, deepest first: adaptive GroupNorm conditioned on z_q, ``B`` ResBlocks (the first one
  changes the channels), upsample (3x3 conv to 4x channels, with bias, then depth-to-space) except
  at level 0 -> GN -> SiLU -> conv_out 3x3 (with bias).
* Adaptive GroupNorm: GN without affine, then ``gamma(std_hw(z_q)) * x + beta(mean_hw(z_q))`` with
  two Linear(d, channels) layers and ``std = sqrt(var + 1e-6)`` (unbiased variance over h*w, as in
  the reference code).

With ``B`` mid blocks (not 2) this reproduces the paper's Sec 4.2 sizes: C=256, B=4, 16x, d=32
gives a 198.8M-parameter encoder and a 260.7M-parameter decoder (paper: 198M / 261M).

Depth-to-space uses the reference code's DCR order: input channel (i*2 + j)*C + c becomes pixel
(2h + i, 2w + j) of output channel c (``F.pixel_shuffle`` would use c*4 + i*2 + j).

``python -m wetok.model`` prints the parameter table for the C x B x downsampling grid.

About 500 lines, one architecture: the GroupNorm + SiLU forms (eager recompute, compiled
per-channel statistics) are its hot path and stay beside the blocks that use them.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from wetok.quantize import GroupQuantizer, QuantizerOutput, at_least_fp32

CHANNEL_MULT = {8: [1, 2, 2, 4], 16: [1, 1, 2, 2, 4], 32: [1, 1, 2, 2, 4, 8]}
NUM_GROUPS = 32
GN_EPS = 1e-6
ADAGN_EPS = 1e-6

# ----------------------------------------------------------------------------------------------
# GroupNorm + SiLU (hot path)
# ----------------------------------------------------------------------------------------------
def group_norm(x, num_groups, weight=None, bias=None, eps=GN_EPS):
    """GroupNorm. Eager: in the activation's own dtype (the kernel accumulates statistics in
    fp32); autocast would run it in fp32, with two full-size dtype copies around every norm,
    which were the largest item of an eager bf16 training step on the GPU. Under torch.compile:
    :func:`_group_norm_by_channel`, in fp32 (the casts fuse into its kernels)."""
    if torch.compiler.is_compiling():
        return _group_norm_by_channel(x, num_groups, weight, bias, eps)
    with torch.autocast(x.device.type, enabled=False):
        weight = None if weight is None else weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
        return F.group_norm(x, num_groups, weight, bias, eps)


def _group_norm_by_channel(x, num_groups, weight, bias, eps):
    """GroupNorm from per-channel statistics, in fp32 as autocast runs it; for torch.compile.

    Group mean and (population) variance combine the per-channel ones over the C/g channels of
    a group (law of total variance: var_g = mean(var_c) + var(mean_c)); then y = x * a + b with
    per-(sample, channel) a, b. Every reduction runs over H*W with the channels contiguous in a
    channels_last tensor, in the forward and in the backward. F.group_norm's decomposition works
    on an NCHW (N, g, C/g, H*W) view: inductor moved every normalised activation and its
    gradient between layouts around the convs (33 ms of a 175 ms step on an H100), and a direct
    reduction over the (H*W, C/g) NHWC view reads 4-channel strips (slower still)."""
    n, c = x.shape[:2]
    x = at_least_fp32(x)
    var_c, mean_c = torch.var_mean(x, dim=(2, 3), correction=0)
    var_c, mean_c = var_c.view(n, num_groups, -1), mean_c.view(n, num_groups, -1)
    mean = mean_c.mean(-1, keepdim=True)
    var = var_c.mean(-1, keepdim=True) + (mean_c - mean).pow(2).mean(-1, keepdim=True)
    scale = torch.rsqrt(var + eps).expand_as(mean_c).reshape(n, c)
    shift = -mean.expand_as(mean_c).reshape(n, c) * scale
    if weight is not None:
        scale, shift = scale * weight.to(x.dtype), shift * weight.to(x.dtype)
    if bias is not None:
        shift = shift + bias.to(x.dtype)
    return x * scale[:, :, None, None] + shift[:, :, None, None]


def _gn_silu_plain(x, num_groups, weight, bias, eps):
    return F.silu(group_norm(x, num_groups, weight, bias, eps))


class _GNSiLURecompute(torch.autograd.Function):
    """GN + SiLU that saves only its input and recomputes GN + SiLU in backward.

    Eager autograd otherwise keeps three full-size tensors per GN -> SiLU -> conv (GN input,
    GN output (fp32 under autocast), SiLU output); this keeps two.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        dev = x.device.type
        ctx.autocast = (torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)) \
            if dev in ("cuda", "cpu", "xpu") else (False, None)
        ctx.num_groups, ctx.eps = num_groups, eps
        ctx.save_for_backward(x, weight, bias)
        return _gn_silu_plain(x, num_groups, weight, bias, eps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weight, bias = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        need = ctx.needs_input_grad[:3]
        leaves = [None if t is None else t.detach().requires_grad_(n)
                  for t, n in zip((x, weight, bias), need)]
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=dtype, enabled=enabled):
            y = _gn_silu_plain(leaves[0], ctx.num_groups, leaves[1], leaves[2], ctx.eps)
        wrt = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(y, wrt, grad_out) if wrt else ())
        out = [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return out[0], out[1], out[2], None, None


_RECOMPUTE = True


def set_gn_silu_recompute(enabled: bool) -> None:
    """Eager mode only: recompute GN+SiLU in backward (default; measured on an H100, C=256 B=4
    16x, batch 8 at 256^2, bf16: peak 23.1 GiB vs 38.3 GiB, 413 vs 339 ms/step) or keep the
    plain autograd graph (faster, more memory). torch.compile always uses the plain form."""
    global _RECOMPUTE
    _RECOMPUTE = bool(enabled)


def gn_silu(x: torch.Tensor, norm: nn.GroupNorm) -> torch.Tensor:
    """SiLU(GroupNorm(x)). Under torch.compile the plain form is used (inductor fuses it into one
    kernel and its partitioner recomputes it in backward: 19.2 GiB, 209 ms/step in the setting
    above); in eager training the recompute Function keeps activation memory down."""
    if (not _RECOMPUTE or torch.compiler.is_compiling() or not torch.is_grad_enabled()
            or not (x.requires_grad or norm.weight is not None and norm.weight.requires_grad)):
        return _gn_silu_plain(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return _GNSiLURecompute.apply(x, norm.weight, norm.bias, norm.num_groups, norm.eps)


class GroupNormSiLU(nn.GroupNorm):
    """GroupNorm (affine) followed by SiLU; parameters named like nn.GroupNorm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gn_silu(x, self)


def _gn(channels: int) -> GroupNormSiLU:
    return GroupNormSiLU(NUM_GROUPS, channels, eps=GN_EPS)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class ResBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _gn(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _gn(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=False)
                         if in_channels != out_channels else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        h = self.conv2(self.norm2(h))
        return h + (x if self.shortcut is None else self.shortcut(x))


class AdaptiveGroupNorm(nn.Module):
    """GN without affine; scale/bias are Linear maps of per-channel spatial std/mean of z_q."""

    def __init__(self, z_channels: int, channels: int):
        super().__init__()
        self.channels = channels
        self.gamma = nn.Linear(z_channels, channels)
        self.beta = nn.Linear(z_channels, channels)

    def forward(self, x: torch.Tensor, z_std: torch.Tensor, z_mean: torch.Tensor) -> torch.Tensor:
        scale = self.gamma(z_std)[:, :, None, None]
        bias = self.beta(z_mean)[:, :, None, None]
        return torch.addcmul(bias, group_norm(x, NUM_GROUPS), scale)


def z_statistics(z_q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel spatial (std, mean) of z_q, (B, d) each, computed in fp32 (fp64 kept).

    Unbiased variance as in the reference code; with a single latent position (h*w == 1), where
    that is undefined, the population variance (0) is used instead."""
    z = at_least_fp32(z_q).flatten(2)
    correction = 1 if z.shape[-1] > 1 else 0
    var, mean = torch.var_mean(z, dim=-1, correction=correction)
    return torch.sqrt(var + ADAGN_EPS), mean


def depth_to_space(x: torch.Tensor, r: int = 2) -> torch.Tensor:
    """DCR depth-to-space: (N, r*r*C, H, W) -> (N, C, r*H, r*W), channel (i*r + j)*C + c going to
    pixel (r*h + i, r*w + j) of channel c. The output keeps the input's memory format; on a
    channels_last tensor every output pixel copies C contiguous channels (pixel_shuffle's order
    gathers every r*r-th channel, which cost the compiled step on the GPU)."""
    n, k, h, w = x.shape
    c = k // (r * r)
    if x.is_contiguous(memory_format=torch.channels_last):
        y = x.permute(0, 2, 3, 1).reshape(n, h, w, r, r, c).permute(0, 1, 3, 2, 4, 5)
        return y.reshape(n, h * r, w * r, c).permute(0, 3, 1, 2)
    return x.reshape(n, r, r, c, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, c, h * r, w * r)


class Upsample(nn.Module):
    """3x3 conv to 4x channels, then depth-to-space by 2 (DCR order, as the reference code)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4 * channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depth_to_space(self.conv(x))


def check_channels(channels: int) -> None:
    """C (and so every C * channel_mult[level]) must split into the GroupNorm groups; the one
    check of it (the encoder, the decoder and the config validator call it)."""
    if channels % NUM_GROUPS:
        raise ValueError(f"channels: expected a value divisible by the {NUM_GROUPS} GroupNorm "
                         f"groups, got {channels!r}")


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    def __init__(self, channels: int, channel_mult, num_res_blocks: int, z_channels: int,
                 in_channels: int = 3):
        super().__init__()
        channel_mult = list(channel_mult)
        check_channels(channels)
        self.conv_in = nn.Conv2d(in_channels, channels, 3, padding=1, bias=False)
        self.levels = nn.ModuleList()
        c_in = channels
        for i, m in enumerate(channel_mult):
            c_out = channels * m
            level = nn.Module()
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c_in, c_out))
                c_in = c_out
            level.blocks = nn.Sequential(*blocks)
            level.down = (nn.Conv2d(c_out, c_out, 3, stride=2, padding=1)
                          if i < len(channel_mult) - 1 else nn.Identity())
            self.levels.append(level)
        self.mid = nn.Sequential(*[ResBlock(c_in, c_in) for _ in range(num_res_blocks)])
        self.norm_out = _gn(c_in)
        self.conv_out = nn.Conv2d(c_in, z_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.levels:
            h = level.down(level.blocks(h))
        h = self.mid(h)
        return self.conv_out(self.norm_out(h))


class Decoder(nn.Module):
    def __init__(self, channels: int, channel_mult, num_res_blocks: int, z_channels: int,
                 out_channels: int = 3, generative: bool = False):
        super().__init__()
        channel_mult = list(channel_mult)
        check_channels(channels)
        self.z_channels = z_channels
        self.generative = generative
        c_in = channels * channel_mult[-1]
        self.conv_in = nn.Conv2d(z_channels * (2 if generative else 1), c_in, 3, padding=1)
        self.mid = nn.Sequential(*[ResBlock(c_in, c_in) for _ in range(num_res_blocks)])
        levels: list[nn.Module] = [None] * len(channel_mult)  # type: ignore[list-item]
        for i in reversed(range(len(channel_mult))):
            c_out = channels * channel_mult[i]
            level = nn.Module()
            level.norm = AdaptiveGroupNorm(z_channels, c_in)
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c_in, c_out))
                c_in = c_out
            level.blocks = nn.Sequential(*blocks)
            level.up = Upsample(c_out) if i > 0 else nn.Identity()
            levels[i] = level
        self.levels = nn.ModuleList(levels)  # levels[i] matches channel_mult[i]
        self.norm_out = _gn(c_in)
        self.conv_out = nn.Conv2d(c_in, out_channels, 3, padding=1)

    def draw_noise(self, z_q: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if generator is None:
            return torch.randn_like(z_q)
        noise = torch.randn(z_q.shape, generator=generator, device=generator.device,
                            dtype=z_q.dtype)
        return noise.to(z_q.device)

    def forward(self, z_q: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """z_q (B, d, h, w) -> image (B, out, h*f, w*f). Non-generative decoders ignore
        ``noise``/``generator``; generative ones draw noise from ``generator`` when given (else
        torch.randn) unless ``noise`` is passed."""
        z_std, z_mean = z_statistics(z_q)
        if self.generative:
            if noise is None:
                noise = self.draw_noise(z_q, generator)
            elif noise.shape != z_q.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != z_q shape {tuple(z_q.shape)}")
            h = self.conv_in(torch.cat([z_q, noise.to(z_q.dtype)], dim=1))
        else:
            h = self.conv_in(z_q)
        h = self.mid(h)
        for i in reversed(range(len(self.levels))):
            level = self.levels[i]
            h = level.up(level.blocks(level.norm(h, z_std.to(h.dtype), z_mean.to(h.dtype))))
        return self.conv_out(self.norm_out(h))


# ----------------------------------------------------------------------------------------------
# Full tokenizer
# ----------------------------------------------------------------------------------------------
class WeTok(nn.Module):
    def __init__(self, encoder: Encoder, quantizer: GroupQuantizer, decoder: Decoder,
                 config: Mapping | None = None):
        super().__init__()
        self.encoder = encoder
        self.quantizer = quantizer
        self.decoder = decoder
        # {"model": model_cfg, "quantizer": quantizer_cfg, "generative": bool} when built by
        # build_model; used by wetok.api to save a self-describing model directory.
        self.config = dict(config) if config is not None else None

    @property
    def generative(self) -> bool:
        return self.decoder.generative

    def _encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters()) or \
            any(p.requires_grad for p in self.quantizer.parameters())

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        # Frozen encoder/quantizer (stage 2): no graph is kept for them.
        with torch.set_grad_enabled(torch.is_grad_enabled() and self._encoder_trainable()):
            return self.quantizer(self.encoder(x))

    def decode(self, z_q: torch.Tensor, noise: torch.Tensor | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decoder(z_q, noise=noise, generator=generator)

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None):
        q = self.encode(x)
        return self.decode(q.z_q, noise=noise, generator=generator), q


def resolve_channel_mult(model_cfg: Mapping) -> list[int]:
    """``channel_mult``, or when null the paper's row for ``downsample`` (CHANNEL_MULT); the one
    check that the two agree (ValueError "key: expected ..., got ...")."""
    ds, mult = model_cfg["downsample"], model_cfg["channel_mult"]
    if mult is None:
        if ds not in CHANNEL_MULT:
            raise ValueError(f"downsample: expected one of {'|'.join(map(str, CHANNEL_MULT))} "
                             f"when channel_mult is null, got {ds!r}")
        return list(CHANNEL_MULT[ds])
    mult = [int(m) for m in mult]
    implied = 2 ** (len(mult) - 1)
    if ds is not None and int(ds) != implied:
        raise ValueError(f"downsample: expected {implied} (what channel_mult {mult} "
                         f"downsamples), got {ds!r}")
    return mult


def downsample_factor(model_cfg: Mapping) -> int:
    """f: pixels per token along each side, 2^(number of levels - 1) of the channel multipliers."""
    return 2 ** (len(resolve_channel_mult(model_cfg)) - 1)


def _plain(obj: Any) -> Any:
    """Mappings/sequences (incl. OmegaConf containers) -> JSON-friendly dict/list."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) or (hasattr(obj, "__iter__") and hasattr(obj, "__len__")
                                          and not isinstance(obj, (str, bytes, torch.Tensor))):
        return [_plain(v) for v in obj]
    return obj


def build_model(model_cfg: Mapping, quantizer_cfg: Mapping, generative: bool = False) -> WeTok:
    """Build a WeTok from the Hydra ``model`` and ``quantizer`` dicts: every key their conf/
    groups define is required (extra keys ignored); a config saved by an older version goes
    through :func:`wetok.config.upgrade_saved` first (checkpoint.load and Tokenizer.load do)."""
    mult = resolve_channel_mult(model_cfg)
    channels = int(model_cfg["channels"])
    blocks = int(model_cfg["num_res_blocks"])
    q = quantizer_cfg
    groups, group_dim = int(q["groups"]), int(q["group_dim"])
    d = groups * group_dim
    quantizer = GroupQuantizer(
        groups, group_dim, tau=float(q["tau"]), entropy_mode=q["entropy_mode"],
        l2_norm=bool(q["l2_norm"]), sync_entropy=bool(q["sync_entropy"]),
        entropy_reduction=q["entropy_reduction"], entropy_eps=float(q["entropy_eps"]),
    )
    config = {"model": _plain(model_cfg), "quantizer": _plain(quantizer_cfg),
              "generative": bool(generative)}
    return WeTok(Encoder(channels, mult, blocks, d),
                 quantizer,
                 Decoder(channels, mult, blocks, d, generative=generative),
                 config=config)


# ----------------------------------------------------------------------------------------------
# Stage 2 helpers
# ----------------------------------------------------------------------------------------------
CONV_IN_KEY = "decoder.conv_in.weight"


def to_generative_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stage-1 -> stage-2 weights: append zero input weights for the noise channels to every
    ``...decoder.conv_in.weight`` (prefixes such as ``module.``/``_orig_mod.`` allowed), so the
    stage-2 decoder reproduces the stage-1 output for any noise. Apply to raw AND EMA weights.

    Returns a new dict (the input is not modified). A key whose conv_in already takes 2d
    channels (d read from the matching ``decoder.levels.0.norm.gamma.weight``) is left as is."""
    out = dict(state_dict)
    keys = [k for k in out if k == CONV_IN_KEY or k.endswith("." + CONV_IN_KEY)]
    if not keys:
        raise KeyError(f"state dict has no '{CONV_IN_KEY}' key (not a WeTok state dict?)")
    for k in keys:
        w = out[k]
        prefix = k[: -len(CONV_IN_KEY)]
        gamma = out.get(prefix + "decoder.levels.0.norm.gamma.weight")
        d = gamma.shape[1] if gamma is not None else w.shape[1]
        if w.shape[1] == 2 * d:
            continue
        if w.shape[1] != d:
            raise ValueError(f"{k} has {w.shape[1]} input channels, expected d={d}")
        out[k] = torch.cat([w, torch.zeros_like(w)], dim=1)
    return out


def freeze_for_stage2(model: WeTok) -> WeTok:
    """Stage 2 trains the decoder only: encoder and quantizer get requires_grad=False."""
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    for p in model.quantizer.parameters():
        p.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------
# Parameter table
# ----------------------------------------------------------------------------------------------
def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_table(channels=(128, 192, 256), blocks=(2, 4, 8), downsamples=(8, 16, 32),
                groups: int = 4, group_dim: int = 8) -> list[dict[str, Any]]:
    """Encoder / decoder / discriminator parameter counts (millions) over a grid (the quantizer
    has no parameters); built on the meta device (no memory, fast)."""
    from wetok.discriminator import NLayerDiscriminator

    d = groups * group_dim
    with torch.device("meta"):
        disc_m = count_params(NLayerDiscriminator()) / 1e6
    rows = []
    for ds in downsamples:
        for c in channels:
            for b in blocks:
                with torch.device("meta"):
                    encoder = Encoder(c, CHANNEL_MULT[ds], b, d)
                    decoder = Decoder(c, CHANNEL_MULT[ds], b, d)
                rows.append({"downsample": ds, "channels": c, "num_res_blocks": b, "d": d,
                             "encoder_M": count_params(encoder) / 1e6,
                             "decoder_M": count_params(decoder) / 1e6,
                             "discriminator_M": disc_m})
    return rows


def format_param_table(rows) -> str:
    lines = [f"{'down':>4} {'C':>4} {'B':>2} {'d':>3} {'encoder M':>10} {'decoder M':>10} "
             f"{'disc M':>7}"]
    for r in rows:
        lines.append(f"{r['downsample']:>4} {r['channels']:>4} {r['num_res_blocks']:>2} "
                     f"{r['d']:>3} {r['encoder_M']:>10.1f} {r['decoder_M']:>10.1f} "
                     f"{r['discriminator_M']:>7.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_param_table(param_table()))
