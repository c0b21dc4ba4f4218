"""Evaluation metrics, accumulated batch by batch: rFID, LPIPS, PSNR, SSIM.

All metrics see the same uint8 images: reconstructions and references in [-1, 1] are ROUNDED to
uint8 by :func:`to_uint8` (the official scripts truncate with ``astype(uint8)``; we round), i.e.
the numbers are those of the images one would save as PNG.

- rFID: torch-fidelity's InceptionV3 (FID weights), 2048-d pool features of uint8 batches held
  in memory, reconstructions vs their own references, Frechet distance from torch-fidelity's
  ``fid_features_to_statistics`` / ``fid_statistics_to_metric``. The references' statistics are
  cached as ``<fid_cache_dir>/<fid_ref_name>.npz`` so a later evaluation on the same images skips
  their features (the caller's name must identify the set: dataset, split, size, count).
- LPIPS: the lpips package, VGG trunk (same loader as the loss), mean over images.
- PSNR / SSIM: scikit-image on uint8 HWC images, data_range 255, mean over images (PSNR of an
  exact reconstruction is inf).

A metric whose pretrained weights are missing is skipped with the MissingWeightsError message as
reason -- never computed with random weights. ``random_weights=True`` (TESTS ONLY) builds the
networks randomly and names their outputs ``rfid_random_weights`` / ``lpips_random_weights``.
The Evaluator is per process (no cross-rank gathering).
"""
from __future__ import annotations

import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from wetok import weights as W

log = logging.getLogger(__name__)

METRICS = ("rfid", "lpips", "psnr", "ssim")
RANDOM_SUFFIX = "_random_weights"
_LOGGED: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _LOGGED:
        _LOGGED.add(msg)
        log.warning(msg)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 in [0, 255], ROUNDED (official code truncates); shape kept."""
    return ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)


def _hwc(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) uint8 tensor -> (B, H, W, C) numpy."""
    return x.permute(0, 2, 3, 1).cpu().numpy()


def psnr_batch(real: torch.Tensor, rec: torch.Tensor) -> list[float]:
    """Per-image PSNR (dB) of uint8 (B, 3, H, W) batches, skimage, data_range 255."""
    from skimage.metrics import peak_signal_noise_ratio

    out = []
    with np.errstate(divide="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exact images: inf, with a divide-by-zero warning
        for a, b in zip(_hwc(real), _hwc(rec)):
            out.append(float(peak_signal_noise_ratio(a, b, data_range=255)))
    return out


def ssim_batch(real: torch.Tensor, rec: torch.Tensor) -> list[float]:
    """Per-image SSIM of uint8 (B, 3, H, W) batches, skimage (7x7 window), data_range 255."""
    from skimage.metrics import structural_similarity

    return [float(structural_similarity(a, b, channel_axis=-1, data_range=255))
            for a, b in zip(_hwc(real), _hwc(rec))]


# ---- InceptionV3 (torch-fidelity) -------------------------------------------------------------


def build_inception(weights_path: str | os.PathLike | None = None, random_weights: bool = False,
                    seed: int = 0, feature: str = "2048") -> torch.nn.Module:
    """torch-fidelity's FeatureExtractorInceptionV3 returning the 2048-d pool features.

    Weights from :func:`wetok.weights.find_weights` ("inception"); MissingWeightsError when
    absent (nothing is downloaded). ``random_weights=True``: seeded He-initialised random
    network, FOR TESTS ONLY.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    if not random_weights:
        path = W.find_weights("inception", weights_path)
        return FeatureExtractorInceptionV3("inception-v3-compat", [feature],
                                           feature_extractor_weights_path=str(path))

    class _RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None  # keep the random initialisation

    with tempfile.TemporaryDirectory() as tmp, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        empty = Path(tmp) / "empty.pth"
        torch.save({}, empty)
        net = _RandomInception("inception-v3-compat", [feature],
                               feature_extractor_weights_path=str(empty))
        for m in net.modules():  # variance-preserving init, so random features are not ~0
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net


def fid_from_statistics(stats_a: Mapping[str, np.ndarray],
                        stats_b: Mapping[str, np.ndarray]) -> float:
    """Frechet distance (torch-fidelity's fid_statistics_to_metric, float64 statistics)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    a = {k: np.asarray(stats_a[k], dtype=np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(stats_b[k], dtype=np.float64) for k in ("mu", "sigma")}
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    """mu, sigma of (N, 2048) features (torch-fidelity's helper, in float64)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.detach().cpu().double())


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


# ---- the evaluator --------------------------------------------------------------------------


class Evaluator:
    """Accumulates metrics over batches: ``update(real, rec)``; ``compute() -> (values, skipped)``.

    ``real``, ``rec``: float (B, 3, H, W) in [-1, 1]. ``weights``: the ``weights`` config group
    (``vgg16``, ``inception`` paths or None). ``fid_cache_dir`` + ``fid_ref_name``: cache of the
    references' rFID statistics (both needed; otherwise no cache). ``random_weights``: TESTS ONLY;
    with it, ``fid_feature`` may pick a smaller Inception feature ("64") so that the Frechet
    distance's 2048x2048 eigen-decomposition (~20 s on 2 CPU cores) stays out of unit tests.
    """

    def __init__(self, metrics: Iterable[str] = METRICS, device: str | torch.device = "cpu",
                 weights: Mapping[str, Any] | None = None,
                 fid_cache_dir: str | os.PathLike | None = None, fid_ref_name: str | None = None,
                 random_weights: bool = False, fid_feature: str = "2048"):
        self.metrics = tuple(metrics)
        if fid_feature != "2048" and not random_weights:
            raise ValueError("rFID uses the 2048-d pool features; other features are a test hook")
        self.fid_feature = fid_feature
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        self.device = torch.device(device)
        self.random_weights = random_weights
        self.skipped: dict[str, str] = {}
        self._lpips = self._inception = None
        if "lpips" in self.metrics:
            from wetok.losses import LPIPS

            try:
                self._lpips = LPIPS(W.configured_path(weights, "vgg16"),
                                    random_trunk=random_weights).to(self.device)
            except W.MissingWeightsError as e:
                self._skip_init("lpips", str(e))
        if "rfid" in self.metrics:
            try:
                self._inception = build_inception(W.configured_path(weights, "inception"),
                                                  random_weights=random_weights,
                                                  feature=fid_feature).to(self.device)
            except W.MissingWeightsError as e:
                self._skip_init("rfid", str(e))
        self.cache_path: Path | None = None
        if fid_cache_dir is not None and fid_ref_name:
            suffix = (RANDOM_SUFFIX if random_weights else "") + \
                ("" if fid_feature == "2048" else f"_f{fid_feature}")
            self.cache_path = Path(fid_cache_dir) / f"{_safe_name(fid_ref_name)}{suffix}.npz"
        self.reset()

    def _skip_init(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        _log_once(f"metric {name} skipped: {reason}")

    def _key(self, name: str) -> str:
        return name + RANDOM_SUFFIX if self.random_weights else name

    def reset(self) -> None:
        """Forget accumulated batches (the reference-statistics cache is re-read)."""
        self._n = 0
        self._psnr: list[float] = []
        self._ssim: list[float] = []
        self._lpips_sum = 0.0
        self._real_feats: list[torch.Tensor] = []
        self._rec_feats: list[torch.Tensor] = []
        self._ref_stats = None
        cache = self.cache_path
        if self._inception is not None and cache is not None and cache.is_file():
            with np.load(cache) as f:
                self._ref_stats = {"mu": f["mu"], "sigma": f["sigma"],
                                   "num_images": int(f["num_images"])}

    @property
    def reference_cached(self) -> bool:
        """Whether the references' rFID statistics came from the cache file."""
        return self._ref_stats is not None

    @torch.no_grad()
    def update(self, real: torch.Tensor, rec: torch.Tensor) -> None:
        if real.shape != rec.shape or real.dim() != 4 or real.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) batches, got {tuple(real.shape)} "
                             f"and {tuple(rec.shape)}")
        real_u8, rec_u8 = to_uint8(real), to_uint8(rec)
        self._n += real.shape[0]
        if "psnr" in self.metrics:
            self._psnr += psnr_batch(real_u8, rec_u8)
        if "ssim" in self.metrics:
            self._ssim += ssim_batch(real_u8, rec_u8)
        if self._lpips is not None:
            a = real_u8.to(self.device).float() / 127.5 - 1.0
            b = rec_u8.to(self.device).float() / 127.5 - 1.0
            self._lpips_sum += float(self._lpips(a, b).double().sum())
        if self._inception is not None:
            if self._ref_stats is None:
                self._real_feats.append(self._features(real_u8))
            self._rec_feats.append(self._features(rec_u8))

    def _features(self, images_u8: torch.Tensor) -> torch.Tensor:
        (feats,) = self._inception(images_u8.to(self.device))
        return feats.float().cpu()

    def compute(self) -> tuple[dict[str, float], dict[str, str]]:
        """(values, skipped): values keyed psnr/ssim/lpips/rfid (``*_random_weights`` in test
        mode); skipped maps a metric name to the reason it has no value."""
        values: dict[str, float] = {}
        skipped = dict(self.skipped)
        n = self._n
        for name, vals in (("psnr", self._psnr), ("ssim", self._ssim)):
            if name in self.metrics:
                if vals:
                    values[name] = float(np.mean(vals))
                else:
                    skipped[name] = "no images"
        if self._lpips is not None:
            if n:
                values[self._key("lpips")] = self._lpips_sum / n
            else:
                skipped["lpips"] = "no images"
        if self._inception is not None:
            fid, reason = self._rfid(n)
            if fid is None:
                skipped["rfid"] = reason
            else:
                values[self._key("rfid")] = fid
        return values, skipped

    def _rfid(self, n: int) -> tuple[float | None, str]:
        if n < 2:
            return None, f"rFID needs at least 2 images, got {n}"
        if self._ref_stats is not None:
            ref = self._ref_stats
            if ref["num_images"] != n:
                return None, (f"reference statistics {self.cache_path} were computed from "
                              f"{ref['num_images']} images, this evaluation has {n}: delete the "
                              f"file or use another reference name")
        else:
            ref = fid_statistics(torch.cat(self._real_feats))
            if self.cache_path is not None:
                self._write_cache(ref, n)
                self._ref_stats = {**ref, "num_images": n}
        rec = fid_statistics(torch.cat(self._rec_feats))
        return fid_from_statistics(ref, rec), ""

    def _write_cache(self, stats: Mapping[str, np.ndarray], n: int) -> None:
        path = self.cache_path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, mu=stats["mu"], sigma=stats["sigma"], num_images=np.int64(n),
                         feature=f"inception-v3-compat/{self.fid_feature}",
                         weights="random" if self.random_weights else W.INCEPTION_FILE)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
