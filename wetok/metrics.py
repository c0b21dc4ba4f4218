"""Evaluation metrics on the device, accumulated as running sums: rFID, LPIPS, PSNR, SSIM.

All metrics see the same uint8 images: reconstructions and references in [-1, 1] are ROUNDED to
uint8 by :func:`to_uint8` (the official scripts truncate with ``astype(uint8)``; we round), i.e.
the numbers are those of the images one would save as PNG.

- PSNR / SSIM: per image on the device (:func:`psnr_per_image`, :func:`ssim_per_image`), the
  definitions of scikit-image's ``peak_signal_noise_ratio`` and ``structural_similarity``
  (data_range 255, 7x7 uniform window, sample covariance, mean over channels), mean over
  images (PSNR of an exact reconstruction is inf). Tests hold them to scikit-image within 1e-4.
- LPIPS: the lpips package, VGG trunk (same module as the loss), batched, mean over images.
- rFID: torch-fidelity's InceptionV3 (FID weights), 2048-d pool features; per set only the
  running sums n, sum f and sum f f^T (float64) are kept, so memory does not grow with the
  number of images; mu = sum f / n, sigma = (sum f f^T - n mu mu^T) / (n - 1) (np.cov), then
  the Frechet distance on the device (:func:`fid_from_statistics`, equal to torch-fidelity's
  ``fid_statistics_to_metric``). The references' statistics are cached as
  ``<fid_cache_dir>/<fid_ref_name>.npz`` so a later evaluation on the same images skips their
  features (the caller's name must identify the set: dataset, split, size, count).

Sharded evaluation: under torch.distributed each rank updates with its own images and
:meth:`Evaluator.compute` all-reduces the sums, so every rank gets the values of all images.

A metric whose pretrained weights are missing is skipped with the MissingWeightsError message as
reason -- never computed with random weights. ``random_weights=True`` (TESTS AND BENCHMARKS ONLY)
builds the networks randomly and names their outputs ``rfid_random_weights`` /
``lpips_random_weights``.
"""
from __future__ import annotations

import functools
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from wetok import distributed
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


def psnr_per_image(real: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """(B,) float64 PSNR in dB of uint8 (B, C, H, W) batches, data_range 255 (inf if equal):
    10 log10(255^2 / MSE), the squared errors summed exactly in int64."""
    diff = real.to(torch.int32) - rec.to(torch.int32)
    mse = (diff * diff).flatten(1).sum(1, dtype=torch.int64).double() / diff[0].numel()
    return 10.0 * torch.log10(255.0**2 / mse)


SSIM_WINDOW, SSIM_K1, SSIM_K2 = 7, 0.01, 0.03


def ssim_window_sums(real: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """(B, 5C, H-6, W-6) float32 sums Sx, Sy, Sxx, Syy, Sxy of uint8 (B, C, H, W) batches over
    every 7x7 window inside the images: integers below 2^24, exact. Two 1-D passes (7x1, then
    1x7), which torch.compile fuses with the products (:func:`pixel_metrics`); one 7x7 pass it
    leaves to an unfused kernel."""
    x, y = real.float(), rec.float()
    sums = torch.cat([x, y, x * x, y * y, x * y], 1)
    for kernel in ((SSIM_WINDOW, 1), (1, SSIM_WINDOW)):  # valid windows only
        sums = torch.nn.functional.avg_pool2d(sums, kernel, stride=1, divisor_override=1)
    return sums


def ssim_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """(B,) float64 SSIM from :func:`ssim_window_sums` (Wang et al. 2004, Eq. 13, as
    scikit-image computes it): sample (co)variances over the 7x7 uniform window, C1 = (0.01 L)^2,
    C2 = (0.03 L)^2 with L = 255; the map averaged over the pixels whose window lies inside the
    image, then over channels.

    With n = 49 and window sums Sx, Sy, Sxx, Syy, Sxy, Eq. 13 is
    (2 Sx Sy + C1 n^2)(2 (n Sxy - Sx Sy) + C2 n(n-1)) /
    ((Sx^2 + Sy^2 + C1 n^2)(n Sxx - Sx^2 + n Syy - Sy^2 + C2 n(n-1))). The bracketed integers
    are below 2^31 (exact in int32), so only the last float32 step rounds (~1e-7 per pixel):
    half the memory traffic of float64, same values to 1e-6."""
    n = SSIM_WINDOW**2
    sx, sy, sxx, syy, sxy = sums.to(torch.int32).chunk(5, 1)
    c1, c2 = (SSIM_K1 * 255) ** 2 * n * n, (SSIM_K2 * 255) ** 2 * n * (n - 1)
    num = (2 * sx * sy + c1) * (2 * (n * sxy - sx * sy) + c2)
    den = (sx * sx + sy * sy + c1) * (n * sxx - sx * sx + n * syy - sy * sy + c2)
    return (num / den).flatten(1).mean(1, dtype=torch.float64)


def ssim_per_image(real: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """(B,) float64 SSIM of uint8 (B, C, H, W) batches, as scikit-image's
    ``structural_similarity`` (7x7 uniform window, sample covariance, channel_axis,
    data_range 255): :func:`ssim_from_sums` of :func:`ssim_window_sums`."""
    return ssim_from_sums(ssim_window_sums(real, rec))


@functools.cache
def pixel_metrics(compile: bool = False):
    """(psnr_per_image, ssim_per_image), torch.compiled when asked (the same integer sums and
    float32 steps, fused), compiled once per process."""
    if not compile:
        return psnr_per_image, ssim_per_image
    return torch.compile(psnr_per_image), torch.compile(ssim_per_image)


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


def fid_from_statistics(stats_a: Mapping[str, Any], stats_b: Mapping[str, Any],
                        device: str | torch.device = "cpu") -> float:
    """Frechet distance |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) in float64 on
    ``device`` (FID, Heusel et al. 2017; mu and sigma as numpy arrays or tensors).
    tr (S_a S_b)^(1/2) is the sum of the square roots of the eigenvalues of the symmetric
    S_a^(1/2) S_b S_a^(1/2): two ``eigh`` instead of the general matrix square root of
    torch-fidelity's ``fid_statistics_to_metric`` (scipy's sqrtm, seconds on a CPU), which the
    tests hold it equal to. Eigenvalues below 0 (rounding of a rank-deficient covariance)
    count as 0."""
    mu_a, s_a, mu_b, s_b = (torch.as_tensor(x, dtype=torch.float64, device=device)
                            for x in (stats_a["mu"], stats_a["sigma"],
                                      stats_b["mu"], stats_b["sigma"]))
    w, v = torch.linalg.eigh(s_a)
    root_a = (v * w.clamp(min=0).sqrt()) @ v.T
    tr_root = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * tr_root)


class FeatureMoments:
    """Running sums n, sum f, sum f f^T (float64, on the features' device) of (N, D) features;
    :meth:`statistics` gives FID's mu and sigma (sample covariance, as np.cov / torch-fidelity's
    ``fid_features_to_statistics``) without keeping the features."""

    def __init__(self, dim: int, device: torch.device):
        self.n = torch.zeros((), dtype=torch.float64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        f = features.detach().double()
        self.n += f.shape[0]
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def tensors(self) -> list[torch.Tensor]:
        return [self.n, self.sum, self.outer]

    def device_statistics(self) -> dict[str, torch.Tensor]:
        """mu and sigma, float64 on the features' device."""
        n = float(self.n)
        mu = self.sum / n
        return {"mu": mu, "sigma": (self.outer - n * torch.outer(mu, mu)) / (n - 1)}

    def statistics(self) -> dict[str, np.ndarray]:
        """mu and sigma as numpy arrays (torch-fidelity's and the cache file's form)."""
        return {k: v.cpu().numpy() for k, v in self.device_statistics().items()}



def safe_name(name: str) -> str:
    """A cache key as a file name."""
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name)


def _weights_file(weights: Mapping[str, Any] | None, name: str, random_weights: bool):
    """The pretrained file a metric network loads (MissingWeightsError if absent); None when
    it is built with random weights."""
    return None if random_weights else str(W.find_weights(name, W.configured_path(weights, name)))


@functools.lru_cache(maxsize=None)
def metric_network(name: str, device: torch.device, path: str | None, random_weights: bool,
                   feature: str = "2048", compile: bool = False) -> torch.nn.Module:
    """LPIPS ("vgg16") or InceptionV3 ("inception") on ``device`` (channels_last on a GPU),
    torch.compiled if asked. Built once per process and setting: a run's later evaluations
    reuse the network and its compiled graphs instead of loading and tracing them again.
    Pretrained networks are built on ``device``: their random initialisation, which the loaded
    weights replace, takes seconds on one CPU thread (VGG16's unused classifier alone ~0.5 s);
    random-weight ones on the CPU, so that their seeded values do not depend on the device."""
    with torch.device(device if path is not None else "cpu"):
        if name == "vgg16":
            from wetok.losses import LPIPS

            net = LPIPS(path, random_trunk=random_weights)
        else:
            net = build_inception(path, random_weights=random_weights, feature=feature)
    net = net.to(device)
    if device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    return torch.compile(net) if compile else net


# ---- the evaluator --------------------------------------------------------------------------


class Evaluator:
    """Accumulates metrics over batches: ``update(real, rec)``; ``compute() -> (values, skipped)``.

    ``real``, ``rec``: float (B, 3, H, W) in [-1, 1], on ``device``. ``weights``: the ``weights``
    config group (``vgg16``, ``inception`` paths or None). ``fid_cache_dir`` + ``fid_ref_name``:
    cache of the references' rFID statistics (both needed; otherwise no cache).
    ``random_weights``: TESTS AND BENCHMARKS ONLY; with it, ``fid_feature`` may pick a smaller
    Inception feature ("64") so that the Frechet distance's 2048x2048 eigen-decompositions
    (seconds on 2 CPU cores) stay out of unit tests. ``compile``: torch.compile LPIPS and
    Inception (same fp32 arithmetic: on an H200 it halves their time) and PSNR / SSIM
    (:func:`pixel_metrics`). Nothing is copied to the host before :meth:`compute`.
    """

    def __init__(self, metrics: Iterable[str] = METRICS, device: str | torch.device = "cpu",
                 weights: Mapping[str, Any] | None = None,
                 fid_cache_dir: str | os.PathLike | None = None, fid_ref_name: str | None = None,
                 random_weights: bool = False, fid_feature: str = "2048", compile: bool = False):
        self.metrics = tuple(metrics)
        if fid_feature != "2048" and not random_weights:
            raise ValueError("rFID uses the 2048-d pool features; other features are a test hook")
        self.fid_feature = fid_feature
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
        self.device = torch.device(device)
        self.random_weights = random_weights
        self._psnr, self._ssim = pixel_metrics(compile)
        self.skipped: dict[str, str] = {}
        self._lpips = self._inception = None
        if "lpips" in self.metrics:
            try:
                self._lpips = metric_network("vgg16", self.device,
                                             _weights_file(weights, "vgg16", random_weights),
                                             random_weights, compile=compile)
            except W.MissingWeightsError as e:
                self._skip_init("lpips", str(e))
        if "rfid" in self.metrics:
            try:
                self._inception = metric_network(
                    "inception", self.device, _weights_file(weights, "inception", random_weights),
                    random_weights, fid_feature, compile)
            except W.MissingWeightsError as e:
                self._skip_init("rfid", str(e))
        self.cache_path: Path | None = None
        if fid_cache_dir is not None and fid_ref_name:
            suffix = (RANDOM_SUFFIX if random_weights else "") + \
                ("" if fid_feature == "2048" else f"_f{fid_feature}")
            self.cache_path = Path(fid_cache_dir) / f"{safe_name(fid_ref_name)}{suffix}.npz"
        self.reset()

    def _skip_init(self, name: str, reason: str) -> None:
        self.skipped[name] = reason
        _log_once(f"metric {name} skipped: {reason}")

    def _key(self, name: str) -> str:
        return name + RANDOM_SUFFIX if self.random_weights else name

    def reset(self) -> None:
        """Forget accumulated batches (the reference-statistics cache is re-read). Under
        torch.distributed every rank must call it: the cache is used only when every rank
        read it (one that another job wrote between two ranks' reads is ignored by all)."""
        zero = lambda: torch.zeros((), dtype=torch.float64, device=self.device)  # noqa: E731
        self._sums = {"n": zero(), "psnr": zero(), "ssim": zero(), "lpips": zero()}
        dim = int(self.fid_feature)
        self._real = FeatureMoments(dim, self.device)
        self._rec = FeatureMoments(dim, self.device)
        stats, cache = None, self.cache_path
        if self._inception is not None and cache is not None and cache.is_file():
            try:
                with np.load(cache) as f:
                    stats = {"mu": f["mu"], "sigma": f["sigma"],
                             "num_images": int(f["num_images"])}
            except (OSError, ValueError, KeyError) as exc:  # unreadable: computed again
                log.warning("reference statistics %s unreadable (%s): computed again", cache, exc)
        self._ref_stats = distributed.on_every_rank(stats, self.device) \
            if "rfid" in self.metrics else None

    @property
    def reference_cached(self) -> bool:
        """Whether the references' rFID statistics came from the cache file."""
        return self._ref_stats is not None

    @torch.no_grad()
    def update(self, real: torch.Tensor, rec: torch.Tensor, valid: int | None = None) -> None:
        """Add a batch. ``valid``: only its first rows are scored (the rest pad a short last
        batch to a fixed shape; every network still sees the whole batch)."""
        if real.shape != rec.shape or real.dim() != 4 or real.shape[1] != 3:
            raise ValueError(f"expected two (B, 3, H, W) batches, got {tuple(real.shape)} "
                             f"and {tuple(rec.shape)}")
        n = real.shape[0] if valid is None else valid
        real_u8 = to_uint8(real.to(self.device, non_blocking=True))
        rec_u8 = to_uint8(rec.to(self.device, non_blocking=True))
        s = self._sums
        s["n"] += n
        if "psnr" in self.metrics:
            s["psnr"] += self._psnr(real_u8, rec_u8)[:n].sum()
        if "ssim" in self.metrics:
            s["ssim"] += self._ssim(real_u8, rec_u8)[:n].sum()
        if self._lpips is not None:
            s["lpips"] += self._lpips(real_u8.float() / 127.5 - 1.0,
                                      rec_u8.float() / 127.5 - 1.0)[:n].double().sum()
        if self._inception is not None:
            if self._ref_stats is None:
                self._real.update(self._inception(real_u8)[0][:n])
            self._rec.update(self._inception(rec_u8)[0][:n])

    def compute(self) -> tuple[dict[str, float], dict[str, str]]:
        """(values, skipped): values keyed psnr/ssim/lpips/rfid (``*_random_weights`` in test
        mode); skipped maps a metric name to the reason it has no value. Under
        torch.distributed every rank must call it (the sums are all-reduced first)."""
        distributed.sum_over_ranks_(
            list(self._sums.values()) + self._real.tensors() + self._rec.tensors())
        sums = {k: float(v) for k, v in self._sums.items()}
        n = int(sums["n"])
        values: dict[str, float] = {}
        skipped = dict(self.skipped)
        for name in ("psnr", "ssim", "lpips"):
            if name not in self.metrics or name in skipped:
                continue
            if n:
                values[self._key(name) if name == "lpips" else name] = sums[name] / n
            else:
                skipped[name] = "no images"
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
            ref = self._real.statistics()
            if self.cache_path is not None and distributed.rank() == 0:
                self._write_cache(ref, n)
            self._ref_stats = {**ref, "num_images": n}
        return fid_from_statistics(ref, self._rec.device_statistics(), self.device), ""

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
