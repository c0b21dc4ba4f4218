"""Trivial predictors scored beside every evaluation, so a tokenizer's numbers mean something.

A reconstruction is only worth its bits if it beats what needs (almost) none:

- ``mean_colour``: each image replaced by its mean colour (3 numbers per image);
- ``avg_pool``: each image average-pooled by the model's downsampling factor f (one colour per
  token-grid cell, the token grid's own resolution) and upsampled back bilinearly.

Both are scored on the same validation images, through the same metric path (device, running
sums, all-reduced under DDP) as the model, by :class:`wetok.evaluate.EvalPass`; runs record them
as ``baselines: {"mean_colour": {"psnr", "ssim"}, "avg_pool": {"psnr", "ssim"}}`` in
summary.json, eval.json and the W&B summary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BASELINES = ("mean_colour", "avg_pool")
BASELINE_METRICS = ("psnr", "ssim")


def mean_colour(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> each image's per-channel mean, broadcast back to (B, 3, H, W)."""
    return x.mean((2, 3), keepdim=True).expand_as(x)


def colour_bits(bits: int) -> tuple[int, int, int]:
    """A budget of `bits` per token split over (R, G, B) as evenly as possible, the spare bits to
    G then R (16 -> 5, 6, 5; 8 -> 3, 3, 2), at most 8 each (the metrics score uint8 images)."""
    if bits < 3:
        raise ValueError(f"colour_bits: need at least 3 bits (one per channel), got {bits}")
    base, spare = divmod(bits, 3)
    return tuple(min(8, base + extra) for extra in (spare >= 2, spare >= 1, 0))


def avg_pool(x: torch.Tensor, factor: int, bits: int | None = None) -> torch.Tensor:
    """(B, 3, H, W) -> f x f average pooling, then bilinear upsampling back to H x W
    (half-pixel centres, ``align_corners=False``). H and W must be multiples of f.

    ``bits``: each cell's colour mean is first coded in that many bits (:func:`colour_bits`,
    uniform bins on [-1, 1], bin centres): what a token grid of plain d-bit colour codes scores,
    the bit-matched reference for a tokenizer with d = g d' bits per token."""
    if factor < 1 or x.shape[-2] % factor or x.shape[-1] % factor:
        raise ValueError(f"avg_pool: image size {tuple(x.shape[-2:])} is not a multiple of the "
                         f"downsampling factor {factor}")
    pooled = F.avg_pool2d(x, factor) if factor > 1 else x
    if bits is not None:
        levels = torch.tensor([2.0**b for b in colour_bits(bits)], dtype=x.dtype,
                              device=x.device).view(1, 3, 1, 1)
        cell = torch.minimum(((pooled + 1) / 2 * levels).floor().clamp_min(0), levels - 1)
        pooled = (cell + 0.5) / levels * 2 - 1
    if factor == 1:
        return pooled
    return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


def predict(name: str, x: torch.Tensor, factor: int) -> torch.Tensor:
    """The named baseline's prediction of the batch x (floats in [-1, 1])."""
    if name == "mean_colour":
        return mean_colour(x)
    if name == "avg_pool":
        return avg_pool(x, factor)
    raise ValueError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
