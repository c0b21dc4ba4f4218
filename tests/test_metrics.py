"""Evaluation metrics (CPU, fast: few 32x32 images)."""
import logging
import math

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from wetok import metrics as M
from wetok import weights as W


def _images(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_to_uint8_rounds():
    x = torch.tensor([-1.0, 1.0, 0.0, -0.999, 2.0, -3.0])
    # (x + 1) * 127.5 = [0, 255, 127.5, 0.1275, clamp 255, clamp 0]; 127.5 rounds half to even
    assert M.to_uint8(x).tolist() == [0, 255, 128, 0, 255, 0]
    v = torch.tensor([(2.6 / 127.5) - 1.0])          # 2.6 -> 3 (truncation would give 2)
    assert M.to_uint8(v).item() == 3
    assert M.to_uint8(x).dtype == torch.uint8


def test_psnr_known_noise_and_ssim_identity():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.integers(20, 236, size=(2, 3, 32, 32), dtype=np.uint8))
    signs = torch.from_numpy(rng.choice([-10, 10], size=real.shape)).to(torch.int16)
    rec = (real.to(torch.int16) + signs).to(torch.uint8)  # |error| = 10 everywhere: MSE = 100
    expected = 10 * math.log10(255 ** 2 / 100)
    assert M.psnr_batch(real, rec) == pytest.approx([expected, expected])
    assert M.ssim_batch(real, real) == pytest.approx([1.0, 1.0])
    assert all(s < 1 for s in M.ssim_batch(real, rec))


def test_evaluator_missing_weights_skips(torch_home, caplog):
    real, rec = _images(3, 0), _images(3, 1)
    with caplog.at_level(logging.WARNING):
        ev = M.Evaluator(device="cpu", weights={"vgg16": None, "inception": None})
    ev.update(real, rec)
    values, skipped = ev.compute()
    assert set(skipped) == {"rfid", "lpips"}
    assert W.INCEPTION_FILE in skipped["rfid"] and W.VGG16_FILE in skipped["lpips"]
    assert str(torch_home / "hub" / "checkpoints") in skipped["rfid"]
    assert set(values) == {"psnr", "ssim"}
    assert values["psnr"] > 0 and -1 <= values["ssim"] <= 1
    assert any("metric rfid skipped" in r.getMessage() for r in caplog.records)


def test_fid_few_images_skipped():
    ev = M.Evaluator(metrics=("rfid",), random_weights=True, fid_feature="64")
    ev.update(_images(1, 0), _images(1, 0))
    values, skipped = ev.compute()
    assert values == {} and "at least 2" in skipped["rfid"]


def test_random_weights_lpips_is_labelled():
    real = _images(2, 0)
    rec = (real + 0.2 * _images(2, 1)).clamp(-1, 1)
    ev = M.Evaluator(metrics=("lpips", "psnr"), random_weights=True)
    ev.update(real, real)
    values, skipped = ev.compute()
    assert skipped == {} and set(values) == {"lpips_random_weights", "psnr"}  # never "lpips"
    assert values["lpips_random_weights"] == pytest.approx(0.0, abs=1e-7)
    assert values["psnr"] == math.inf
    ev.reset()
    ev.update(real, rec)
    assert ev.compute()[0]["lpips_random_weights"] > 0


def test_random_weights_fid_and_cache(tmp_path, monkeypatch):
    calls = []
    orig = FeatureExtractorInceptionV3.forward

    def counting(self, x):
        calls.append(x.shape[0])
        return orig(self, x)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "forward", counting)

    real = _images(4, 0)
    rec = (real + 0.3 * _images(4, 1)).clamp(-1, 1)
    kw = dict(metrics=("rfid",), random_weights=True, fid_cache_dir=tmp_path,
              fid_ref_name="toy/val 32px 4", fid_feature="64")

    ev = M.Evaluator(**kw)
    assert not ev.reference_cached
    ev.update(real[:2], real[:2])
    ev.update(real[2:], real[2:])
    values, skipped = ev.compute()
    assert skipped == {} and set(values) == {"rfid_random_weights"}  # never "rfid"
    assert abs(values["rfid_random_weights"]) < 1e-3
    assert calls == [2, 2, 2, 2]
    cache = tmp_path / "toy_val_32px_4_random_weights_f64.npz"
    assert cache.is_file()

    calls.clear()
    ev2 = M.Evaluator(**kw)
    assert ev2.reference_cached
    ev2.update(real, rec)
    values2, _ = ev2.compute()
    assert calls == [4]                      # the reconstructions only: references from cache
    assert values2["rfid_random_weights"] > 100 * max(abs(values["rfid_random_weights"]), 1e-6)

    ev3 = M.Evaluator(**{**kw, "fid_cache_dir": None})  # no cache: same value, recomputed
    ev3.update(real, rec)
    assert ev3.compute()[0]["rfid_random_weights"] == pytest.approx(values2["rfid_random_weights"],
                                                                     rel=1e-5)
    ev4 = M.Evaluator(**kw)                  # cached count differs from this evaluation's
    ev4.update(real[:3], rec[:3])
    values4, skipped4 = ev4.compute()
    assert values4 == {} and "4 images" in skipped4["rfid"]
    with pytest.raises(ValueError):
        M.Evaluator(metrics=("rfid",), fid_feature="64")   # only with random weights


def test_evaluator_rejects_unknown_metric():
    with pytest.raises(ValueError):
        M.Evaluator(metrics=("fid",))
