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


def _photo_pairs():
    """Real photos (scikit-image's samples), 48x64 crops, against a noisy, a blurred, a flat
    and an identical reconstruction, plus a flat reference: uint8 (B, 3, H, W) batches."""
    from skimage import data

    photos = [data.astronaut()[100:148, 150:214], data.coffee()[200:248, 300:364],
              data.chelsea()[50:98, 100:164]]
    real = torch.from_numpy(np.stack(photos)).permute(0, 3, 1, 2).contiguous()
    g = torch.Generator().manual_seed(0)
    noisy = (real.float() + 12 * torch.randn(real.shape, generator=g)).round().clamp(0, 255)
    blurred = torch.nn.functional.avg_pool2d(real.float(), 3, 1, 1).round()
    flat = real.float().mean((2, 3), keepdim=True).round().expand_as(real)
    flat_ref = torch.full_like(real[:1], 77)
    refs = torch.cat([real, real, real, real, flat_ref, flat_ref])
    recs = torch.cat([noisy, blurred, flat, real.float(), flat_ref.float(),
                      noisy[:1]]).to(torch.uint8)
    return refs, recs


def test_psnr_ssim_equal_scikit_image_per_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    real, rec = _photo_pairs()
    psnr, ssim = M.psnr_per_image(real, rec), M.ssim_per_image(real, rec)
    assert psnr.dtype == ssim.dtype == torch.float64 and psnr.shape == (len(real),)
    for i, (a, b) in enumerate(zip(real.permute(0, 2, 3, 1).numpy(),
                                   rec.permute(0, 2, 3, 1).numpy())):
        ref_ssim = structural_similarity(a, b, channel_axis=-1, data_range=255)
        assert float(ssim[i]) == pytest.approx(ref_ssim, abs=1e-4), i
        if np.array_equal(a, b):  # identical: inf dB, SSIM exactly 1 (flat ones included)
            assert math.isinf(float(psnr[i])) and float(ssim[i]) == pytest.approx(1.0, abs=1e-12)
        else:
            with np.errstate(divide="ignore"):
                assert float(psnr[i]) == pytest.approx(
                    peak_signal_noise_ratio(a, b, data_range=255), abs=1e-4), i
    assert len(set(np.round(ssim.numpy(), 3))) >= 5  # the cases differ: not a constant
    known = torch.full((1, 3, 8, 8), 100, dtype=torch.uint8)  # |error| 10 everywhere: MSE 100
    assert float(M.psnr_per_image(known, known + 10)) == pytest.approx(10 * math.log10(650.25))


def test_feature_moments_equal_numpy_covariance():
    f = torch.randn(37, 16, dtype=torch.float64) * 3 + 1
    moments = M.FeatureMoments(16, torch.device("cpu"))
    for chunk in f.split(10):
        moments.update(chunk.float())
    stats = moments.statistics()
    f32 = f.float().double().numpy()
    np.testing.assert_allclose(stats["mu"], f32.mean(0), atol=1e-10)
    np.testing.assert_allclose(stats["sigma"], np.cov(f32, rowvar=False), atol=1e-9)


def test_evaluator_equals_the_old_cpu_path():
    """The device path's values equal those of the earlier per-image scikit-image path and of
    torch-fidelity's statistics of the stored features, on the same images."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity
    from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_features_to_statistics,
                                           fid_statistics_to_metric)

    real_u8, rec_u8 = _photo_pairs()
    keep = [0, 1, 2, 3, 5]  # finite PSNR everywhere, so the mean is a number
    real, rec = real_u8[keep].float() / 127.5 - 1, rec_u8[keep].float() / 127.5 - 1
    ev = M.Evaluator(metrics=("psnr", "ssim", "rfid"), random_weights=True, fid_feature="64")
    ev.update(real[:2], rec[:2])
    ev.update(real[2:], rec[2:])
    values, skipped = ev.compute()
    a, b = (M.to_uint8(t).permute(0, 2, 3, 1).numpy() for t in (real, rec))
    old_psnr = np.mean([peak_signal_noise_ratio(x, y, data_range=255) for x, y in zip(a, b)])
    old_ssim = np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255)
                        for x, y in zip(a, b)])
    assert math.isfinite(old_psnr) and values["psnr"] == pytest.approx(old_psnr, abs=1e-6)
    assert values["ssim"] == pytest.approx(old_ssim, abs=1e-6)
    net = M.build_inception(random_weights=True, feature="64")
    old = [fid_features_to_statistics(net(M.to_uint8(t))[0].double()) for t in (real, rec)]
    old_fid = fid_statistics_to_metric(*old, verbose=False)[KEY_METRIC_FID]
    assert values["rfid_random_weights"] == pytest.approx(old_fid, rel=1e-4)


@pytest.mark.parametrize("n", [300, 20])  # full rank; rank 19 < 64 (fewer images than features)
def test_frechet_distance_equals_torch_fidelity(n):
    """The eigh-based distance equals torch-fidelity's sqrtm-based one (float64)."""
    from torch_fidelity.metric_fid import (KEY_METRIC_FID, fid_features_to_statistics,
                                           fid_statistics_to_metric)

    gen = torch.Generator().manual_seed(n)
    mix = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    a = torch.randn(n, 64, generator=gen, dtype=torch.float64) @ mix
    b = torch.randn(n, 64, generator=gen, dtype=torch.float64) @ mix * 1.3 + 0.2
    sa, sb = fid_features_to_statistics(a), fid_features_to_statistics(b)
    want = fid_statistics_to_metric(sa, sb, verbose=False)[KEY_METRIC_FID]
    assert want > 1  # the two sets differ: not a trivial zero
    assert M.fid_from_statistics(sa, sb) == pytest.approx(want, rel=1e-6 if n > 64 else 1e-4)
    assert M.fid_from_statistics(sa, sa) == pytest.approx(0, abs=1e-6 * want)


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


def test_padding_rows_are_not_scored():
    """update(..., valid=n) scores the first n rows only: the same values as the n rows alone
    (a short last batch padded to a fixed shape on a GPU); every metric, LPIPS and rFID
    statistics included (random weights; CPU convolutions may differ 1e-6 between batch sizes)."""
    real = _images(5, 0)
    rec = (real + 0.3 * _images(5, 1)).clamp(-1, 1)
    pad = lambda t: torch.cat([t, t[-1:].expand(3, *t.shape[1:])])  # noqa: E731
    kw = dict(metrics=("psnr", "ssim", "lpips", "rfid"), random_weights=True, fid_feature="64")
    alone, padded = M.Evaluator(**kw), M.Evaluator(**kw)
    alone.update(real, rec)
    padded.update(pad(real), pad(rec), valid=5)
    want, got = alone.compute()[0], padded.compute()[0]
    assert set(got) == set(want) == {"psnr", "ssim", "lpips_random_weights", "rfid_random_weights"}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k


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


def test_compiled_metric_networks_equal_eager():
    """Evaluator(compile=True) (torch.compile of LPIPS, Inception, PSNR and SSIM; inductor on
    this CPU) gives the eager values: same arithmetic, fused."""
    real = _images(3, 0)
    rec = (real + 0.3 * _images(3, 1)).clamp(-1, 1)
    rec[1] = real[1]  # identical: PSNR inf in both
    kw = dict(metrics=("lpips", "rfid", "psnr", "ssim"), random_weights=True, fid_feature="64")
    eager, compiled = M.Evaluator(**kw), M.Evaluator(**kw, compile=True)
    assert isinstance(compiled._lpips, torch._dynamo.eval_frame.OptimizedModule)
    for ev in (eager, compiled):
        ev.update(real, rec)
    want, got = eager.compute()[0], compiled.compute()[0]
    assert set(got) == set(want) == {"lpips_random_weights", "rfid_random_weights", "psnr",
                                     "ssim"}
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-5), k
    a, b = M.to_uint8(real), M.to_uint8(rec)
    psnr, ssim = M.pixel_metrics(compile=True)
    assert torch.equal(psnr(a, b), M.psnr_per_image(a, b))  # inf where identical, too
    assert torch.allclose(ssim(a, b), M.ssim_per_image(a, b), rtol=0, atol=1e-6)


def test_metric_networks_are_built_once_per_setting():
    """A run's later evaluations reuse LPIPS and Inception (and their compiled graphs)."""
    kw = dict(metrics=("lpips", "rfid"), random_weights=True, fid_feature="64")
    a, b = M.Evaluator(**kw), M.Evaluator(**kw)
    assert a._lpips is b._lpips and a._inception is b._inception
    c = M.Evaluator(**{**kw, "fid_feature": "192"})
    assert c._inception is not a._inception and c._lpips is a._lpips
