"""Encoder / decoder / generative decoder / discriminator (CPU, fast)."""
import time

import pytest
import torch
import torch.nn.functional as F

from conftest import model_preset
from wetok.discriminator import NLayerDiscriminator
from wetok.model import (CHANNEL_MULT, Decoder, GroupNormSiLU, _group_norm_by_channel,
                         build_model, depth_to_space,
                         count_params, freeze_for_stage2, param_table,
                         to_generative_state_dict)

QCFG = model_preset("gq", "quantizer")
TINY = model_preset("tiny")


def _tiny(generative=False, seed=0, **over):
    torch.manual_seed(seed)
    return build_model({**TINY, **over}, QCFG, generative=generative)


@pytest.mark.parametrize("ds", [8, 16, 32])
def test_shapes(ds):
    model = build_model({"channels": 32, "channel_mult": None, "downsample": ds,
                         "num_res_blocks": 1}, QCFG)
    size = 2 * ds
    x = torch.randn(2, 3, size, size)
    x_rec, q = model(x)
    assert x_rec.shape == x.shape
    assert q.z_q.shape == (2, 32, 2, 2)
    assert q.indices.shape == (2, 4, 2, 2)
    assert len(model.encoder.levels) == len(CHANNEL_MULT[ds])
    # 1x1 latent (unbiased variance undefined) stays finite
    x_rec1, _ = model(torch.randn(1, 3, ds, ds))
    assert torch.isfinite(x_rec1).all()


def test_paper_param_counts():
    """Paper Sec 4.2: C=256, B=4, 16x, d=32 -> 198M encoder, 261M decoder."""
    with torch.device("meta"):
        model = build_model(model_preset("c256_b4"), QCFG)
    enc, dec = count_params(model.encoder) / 1e6, count_params(model.decoder) / 1e6
    assert abs(enc - 198) / 198 < 0.03, enc
    assert abs(dec - 261) / 261 < 0.03, dec


def test_param_table_grid():
    rows = param_table()
    assert len(rows) == 27
    row = next(r for r in rows if (r["downsample"], r["channels"], r["num_res_blocks"])
               == (16, 256, 4))
    assert abs(row["encoder_M"] - 198) < 6 and abs(row["decoder_M"] - 261) < 8
    assert 2.0 < row["discriminator_M"] < 3.5


def test_channel_mult_checks():
    with pytest.raises(ValueError, match="downsample"):
        build_model({"channels": 32, "channel_mult": [1, 2], "downsample": 8,
                     "num_res_blocks": 1}, QCFG)
    with pytest.raises(ValueError, match="divisible"):
        build_model({"channels": 48, "channel_mult": [1, 2], "downsample": None,
                     "num_res_blocks": 1}, QCFG)


def test_gn_silu_matches_plain():
    torch.manual_seed(0)
    norm = GroupNormSiLU(32, 64, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 64, 5, 7, dtype=torch.double, requires_grad=True)
    y = norm(x)
    y_ref = F.silu(F.group_norm(x, 32, norm.weight, norm.bias, 1e-6))
    g = torch.randn_like(y)
    ga = torch.autograd.grad(y, (x, norm.weight, norm.bias), g)
    gb = torch.autograd.grad(y_ref, (x, norm.weight, norm.bias), g)
    torch.testing.assert_close(y, y_ref)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_by_channel_matches_group_norm(affine):
    """The compiled path's GroupNorm (per-channel statistics) is F.group_norm:
    values and gradients, and the output stays channels_last (no layout change)."""
    torch.manual_seed(0)
    x = torch.randn(2, 64, 5, 7, dtype=torch.double).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(64, dtype=torch.double, requires_grad=True) if affine else None
    b = torch.randn(64, dtype=torch.double, requires_grad=True) if affine else None
    y = _group_norm_by_channel(x, 32, w, b, 1e-6)
    y_ref = F.group_norm(x, 32, w, b, 1e-6)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref)
    wrt = [t for t in (x, w, b) if t is not None]
    g = torch.randn_like(y)
    for a, r in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(y_ref, wrt, g)):
        torch.testing.assert_close(a, r)
    y16 = _group_norm_by_channel(x.detach().bfloat16(), 32, None, None, 1e-6)  # fp32 maths
    assert y16.dtype == torch.float32
    torch.testing.assert_close(y16, F.group_norm(x.detach().bfloat16().float(), 32, eps=1e-6))


def test_depth_to_space_dcr_order_and_layout():
    """Channel (i*2 + j)*C + c goes to pixel (2h + i, 2w + j) of channel c (the reference's DCR
    order), in both memory formats, and channels_last stays channels_last."""
    x = torch.randn(2, 4 * 3, 5, 6)
    for fmt in (torch.contiguous_format, torch.channels_last):
        y = depth_to_space(x.contiguous(memory_format=fmt))
        assert y.shape == (2, 3, 10, 12) and y.is_contiguous(memory_format=fmt)
        for i in range(2):
            for j in range(2):
                k = (i * 2 + j) * 3
                torch.testing.assert_close(y[:, :, i::2, j::2], x[:, k:k + 3])


def test_tiny_forward_backward_fast():
    """The CPU preset: forward + backward on 32x32 images well under a second. Measured as
    single-thread CPU time (best of 5; idle machine: ~0.1 s for batch 4) so that a loaded,
    shared test machine does not make this flaky."""
    model = _tiny()
    x = torch.randn(4, 3, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for _ in range(6):  # the first is a warm-up
            model.zero_grad(set_to_none=True)
            t0 = time.process_time()
            x_rec, q = model(x)
            (x_rec.abs().mean() + q.commit_loss).backward()
            times.append(time.process_time() - t0)
    finally:
        torch.set_num_threads(threads)
    assert min(times[1:]) < 0.5, times
    assert all(p.grad is not None for p in model.encoder.parameters())


def _converted_pair():
    stage1 = _tiny(seed=1)
    # make AdaGN / biases non-trivial so the test is not vacuous
    with torch.no_grad():
        for p in stage1.decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stage2 = build_model(TINY, QCFG, generative=True)
    stage2.load_state_dict(to_generative_state_dict(stage1.state_dict()))
    return stage1.eval(), stage2.eval()


def test_generative_zero_init_equivalence():
    stage1, stage2 = _converted_pair()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, q = stage1(x)
        z_q = q.z_q
        out_a = stage2.decode(z_q, noise=torch.randn_like(z_q))
        out_b = stage2.decode(z_q, generator=torch.Generator().manual_seed(123))
        out_c, _ = stage2(x)
    assert not torch.equal(stage2.decoder.draw_noise(z_q, torch.Generator().manual_seed(1)),
                           stage2.decoder.draw_noise(z_q, torch.Generator().manual_seed(2)))
    for out in (out_a, out_b, out_c):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_to_generative_state_dict_keys():
    model = _tiny()
    sd = model.state_dict()
    d = 32
    ema = {"module." + k: v.clone() for k, v in sd.items()}  # e.g. an AveragedModel's keys
    conv = to_generative_state_dict(sd)
    conv_ema = to_generative_state_dict(ema)
    w = conv["decoder.conv_in.weight"]
    assert w.shape[1] == 2 * d and torch.equal(w[:, :d], sd["decoder.conv_in.weight"])
    assert torch.count_nonzero(w[:, d:]) == 0
    assert conv_ema["module.decoder.conv_in.weight"].shape[1] == 2 * d
    assert sd["decoder.conv_in.weight"].shape[1] == d  # input untouched
    assert to_generative_state_dict(conv)["decoder.conv_in.weight"].shape[1] == 2 * d  # idempotent
    with pytest.raises(KeyError):
        to_generative_state_dict({"encoder.conv_in.weight": torch.zeros(1)})


def test_stage2_frozen_parts_get_no_grad():
    _, stage2 = _converted_pair()
    stage2.train()
    freeze_for_stage2(stage2)
    x = torch.randn(2, 3, 32, 32)
    x_rec, q = stage2(x, generator=torch.Generator().manual_seed(0))
    (x_rec.abs().mean() + q.commit_loss).backward()
    frozen = list(stage2.encoder.parameters()) + list(stage2.quantizer.parameters())
    assert frozen and all(p.grad is None and not p.requires_grad for p in frozen)
    dec = list(stage2.decoder.named_parameters())
    missing = [n for n, p in dec if p.grad is None]
    assert not missing, missing
    # the zero-initialised noise weights do receive gradient
    assert stage2.decoder.conv_in.weight.grad[:, 32:].abs().sum() > 0


def test_generator_noise_reproducible():
    model = _tiny(generative=True).eval()  # fresh: noise weights non-zero
    z_q = model.quantizer.indices_to_codes(torch.randint(0, 256, (2, 4, 4, 4)))
    with torch.no_grad():
        a = model.decode(z_q, generator=torch.Generator().manual_seed(7))
        b = model.decode(z_q, generator=torch.Generator().manual_seed(7))
        c = model.decode(z_q, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="noise shape"):
        model.decode(z_q, noise=torch.randn(2, 32, 2, 2))


def test_non_generative_decoder_ignores_noise():
    dec = Decoder(32, [1, 2], 1, 32).eval()
    z = torch.randn(1, 32, 4, 4)
    with torch.no_grad():
        assert torch.equal(dec(z), dec(z, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("size,out", [(256, 30), (64, 6)])
def test_discriminator_shape_and_init(size, out):
    torch.manual_seed(0)
    disc = NLayerDiscriminator()
    y = disc(torch.randn(2, 3, size, size))
    assert y.shape == (2, 1, out, out)
    bn = [m for m in disc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 3
    w = torch.cat([m.weight.detach() for m in bn])
    assert abs(w.mean().item() - 1.0) < 0.01 and w.std().item() < 0.05
    first = disc.main[0].weight.detach()
    assert abs(first.std().item() - 0.02) < 0.005
    assert NLayerDiscriminator(in_channels=1, ndf=32, n_layers=2)(
        torch.randn(1, 1, 64, 64)).shape[1] == 1
