"""Tests of wetok.quantize against brute-force float64 enumeration of the {-1, 1}^d codebook."""

import math
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from wetok.quantize import (
    CodebookUsage,
    GroupQuantizer,
    check_quantizer,
    entropy_terms,
    exact_codebook_entropy,
    full_codebook,
)

TAU = 0.01


def _latents(n, d, scale=0.01, seed=0, dtype=torch.float64):
    """z ~ N(0, scale^2): with tau = 0.01 the bit logits 4 z / tau ~ N(0, 16 scale^2/1e-4),
    i.e. not saturated for scale = 0.01, so the entropies are far from trivial."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


def _h(m):
    return -(m * m.log()).sum(-1)


def brute_force(z, group_dim, tau, codebook, reduction="sum"):
    """Reference: enumerate all 2^d codes, p = softmax(2 z.c / tau) in float64.

    ``sum`` as Eq. 7/9 (pooled: g x the pooled entropy); ``mean``: everything / g."""
    n, d = z.shape
    g = d // group_dim
    codes = full_codebook(d, dtype=torch.float64)
    p = torch.softmax(2 * z.double() @ codes.t() / tau, dim=-1)  # (n, 2^d)
    token = _h(p).mean()
    joint = p.mean(0)
    idx = torch.arange(2**d)
    per_group = torch.stack(
        [
            torch.zeros(2**group_dim, dtype=torch.float64).index_add(
                0, (idx >> (j * group_dim)) & (2**group_dim - 1), joint
            )
            for j in range(g)
        ]
    )  # marginal distribution of each group's code, (g, 2^d')
    if codebook in ("naive", "exact"):
        cb = _h(joint)
    elif codebook == "grouped":
        cb = _h(per_group).sum()
    else:
        cb = g * _h(per_group.mean(0))
    if reduction == "mean":
        return token / g, cb / g
    return token, cb


def _values_and_grads(fn, z):
    z = z.clone().requires_grad_(True)
    tok, cb = fn(z)
    (g_tok,) = torch.autograd.grad(tok, z, retain_graph=True)
    (g_cb,) = torch.autograd.grad(cb, z)
    return tok.detach(), cb.detach(), g_tok, g_cb


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("codebook", ["grouped", "pooled", "naive", "exact"])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_against_brute_force(codebook, groups, dtype, tol, reduction):
    d = 6
    z = _latents(40, d, seed=groups)
    ref = _values_and_grads(lambda x: brute_force(x, d // groups, TAU, codebook, reduction), z)
    got = _values_and_grads(
        lambda x: entropy_terms(x, d // groups, TAU, codebook, reduction=reduction), z.to(dtype))
    for r, o in zip(ref, got):
        assert o.dtype == dtype
        torch.testing.assert_close(o.double(), r, rtol=tol, atol=tol * r.abs().max().item())
    # the entropies are not trivial: neither saturated nor uniform
    per = groups if reduction == "mean" else 1
    assert 0.5 / per < ref[0].item() < (d * math.log(2) - 0.5) / per
    assert ref[1].item() > 0.5 / per


@pytest.mark.parametrize("codebook", ["grouped", "pooled", "naive", "exact"])
def test_sum_is_g_times_mean(codebook):
    """The two reductions differ by exactly g in both terms (g = 4, d' = 8 as issue 13 measured:
    token entropy 5.088 summed vs 1.272 averaged on its latents)."""
    g = 4
    d_prime = 8 if codebook in ("grouped", "pooled") else 3  # joint modes: 2^d codes, keep d small
    z = _latents(64, g * d_prime, scale=0.003, seed=11)
    tok_sum, cb_sum = entropy_terms(z, d_prime, TAU, codebook, reduction="sum")
    tok_mean, cb_mean = entropy_terms(z, d_prime, TAU, codebook, reduction="mean")
    torch.testing.assert_close(tok_sum, g * tok_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(cb_sum, g * cb_mean, rtol=1e-12, atol=0)
    assert tok_mean > 0.5  # not saturated, so the factor is visible
    # mean is the official per-group scaling: bounded by d' log 2 whatever g
    assert tok_mean < d_prime * math.log(2) < tok_sum
    # with mean the default quantiser and the official pooled value coincide
    q = GroupQuantizer(g, d_prime, entropy_mode=codebook).train()
    u = z.float().view(4, 4, 4, g * d_prime).permute(0, 3, 1, 2)
    out = q(u)
    torch.testing.assert_close(out.token_entropy, tok_mean.float(), rtol=1e-5, atol=0)


def test_g1_modes_agree_and_bsq_formula():
    d = 8
    z = _latents(50, d)
    lfq = brute_force(z, d, TAU, "exact")
    for mode in ("grouped", "exact", "naive", "pooled"):
        tok, cb = entropy_terms(z, d, TAU, mode)  # g = 1: every mode is LFQ
        torch.testing.assert_close(tok, lfq[0], rtol=1e-10, atol=0)
        torch.testing.assert_close(cb, lfq[1], rtol=1e-10, atol=0)
    # d' = 1 (BSQ): sum over bits of the binary entropy of the batch-mean bit probability
    p = torch.sigmoid(4 * z / TAU).mean(0)
    bsq = -(p * p.log() + (1 - p) * (1 - p).log()).sum()
    bsq_sum = entropy_terms(z, 1, TAU, "grouped", reduction="sum")[1]
    torch.testing.assert_close(bsq_sum, bsq, rtol=1e-10, atol=0)
    # ... which over-estimates the true (joint) entropy: the BSQ approximation error
    assert bsq > lfq[1] + 0.1
    # mean: the per-bit average of the same binary entropies
    torch.testing.assert_close(entropy_terms(z, 1, TAU, "grouped")[1], bsq / d, rtol=1e-10, atol=0)


@pytest.mark.parametrize("d", [12, 16])
def test_exact_equals_naive(d):
    z = _latents(64, d, seed=d, dtype=torch.float32)
    naive = _values_and_grads(lambda x: entropy_terms(x, d, TAU, "naive"), z)
    # g ignored by the joint entropy, except by the reduction: sum = the joint entropy itself
    exact = _values_and_grads(lambda x: entropy_terms(x, 4, TAU, "exact", reduction="sum"), z)
    for a, b in zip(naive, exact):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
    grouped = entropy_terms(z, 4, TAU, "grouped", reduction="sum")[1]
    assert grouped > exact[1] + 0.01  # Eq. 8 is an approximation for g > 1
    assert 0.5 < exact[1] < d * math.log(2) - 0.5  # neither collapsed nor uniform


def test_exact_blocks_and_gradcheck():
    x = _latents(7, 7, scale=1.0, seed=3).requires_grad_(True)  # logits ~ N(0, 1)
    one = exact_codebook_entropy(x)
    blocked = exact_codebook_entropy(x, block_elems=8)  # 2^3 rows x 2^4 cols -> 8 blocks of 1 row
    torch.testing.assert_close(blocked, one, rtol=1e-12, atol=0)
    g1 = torch.autograd.grad(one, x)[0]
    g2 = torch.autograd.grad(blocked, x)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)
    assert torch.autograd.gradcheck(lambda t: exact_codebook_entropy(t, block_elems=8), (x,))
    assert torch.autograd.gradcheck(lambda t: exact_codebook_entropy(t), (x,))


@pytest.mark.parametrize("codebook", ["grouped", "pooled", "naive", "exact"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_saturated_no_epsilon(codebook, reduction):
    d, n = 6, 10
    codes = full_codebook(d)[torch.tensor([0, 3, 5, 9, 17, 20, 33, 40, 51, 63])]
    z = (codes * 1.0).requires_grad_(True)  # logits +-400: probabilities exactly 0 / 1 in fp32
    tok, cb = entropy_terms(z, d, TAU, codebook, reduction=reduction)
    assert tok.item() == 0.0
    assert abs(cb.item() - math.log(n)) < 1e-6  # g = 1: every mode is log T, no eps bias
    (tok - cb).backward()
    assert torch.isfinite(z.grad).all()
    # uniform over all 64 codes, g = 3: sum: grouped = 3 log 4 = log 64 = exact = 3 x pooled's
    # log 4; mean: every mode log 64 / 3 = log 4
    z = full_codebook(d)
    expected = math.log(2**d) / (3 if reduction == "mean" else 1)
    for mode in ("grouped", "exact", "naive", "pooled"):
        assert abs(entropy_terms(z, 2, TAU, mode, reduction=reduction)[1].item() - expected) < 1e-6


def test_unknown_mode_and_bad_group():
    with pytest.raises(ValueError, match=r"mode: .*grouped\|pooled\|naive\|exact, got 'joint'"):
        entropy_terms(torch.zeros(4, 6), 2, mode="joint")
    with pytest.raises(ValueError, match="must divide"):
        entropy_terms(torch.zeros(4, 6), 4)
    with pytest.raises(ValueError, match="entropy_mode: .*, got 'x'"):
        GroupQuantizer(2, 3, entropy_mode="x")
    with pytest.raises(ValueError, match=r"reduction: expected one of mean\|sum, got 'avg'"):
        entropy_terms(torch.zeros(4, 6), 2, reduction="avg")
    with pytest.raises(ValueError,
                       match=r"entropy_reduction: expected one of mean\|sum, got 'avg'"):
        GroupQuantizer(2, 3, entropy_reduction="avg")


@pytest.mark.parametrize("kwargs, name", [
    (dict(groups=0, group_dim=3), "groups"),
    (dict(groups=1, group_dim=63, entropy_mode="exact"), "group_dim"),  # int64 indices
    (dict(groups=1, group_dim=17), "group_dim"),  # grouped: 2^d' codes per group
    (dict(groups=2, group_dim=3, tau=0.0), "tau"),
    (dict(groups=2, group_dim=3, entropy_eps=-1e-5), "entropy_eps"),
    (dict(groups=2, group_dim=3, entropy_mode="exact", entropy_eps=1e-5), "entropy_eps"),
])
def test_options_are_checked_in_one_place(kwargs, name):
    """GroupQuantizer and the config validator share check_quantizer (one message format)."""
    with pytest.raises(ValueError, match=f"^{name}: expected .*, got "):
        GroupQuantizer(**kwargs)
    args = {"tau": 0.01, "entropy_mode": "grouped", "entropy_reduction": "mean",
            "entropy_eps": 0.0, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}: expected"):
        check_quantizer(**args)
    GroupQuantizer(1, 20, entropy_mode="exact")  # d' > 16 runs with the joint modes


def test_bit_order_little_endian():
    q = GroupQuantizer(groups=2, group_dim=3).eval()
    u = torch.tensor([0.5, -1.0, 2.0, -0.1, 0.0, 3.0]).view(1, 6, 1, 1)
    out = q(u)
    # group 0: bits (1, 0, 1) -> 1 + 4 = 5; group 1: bits (0, 0, 1) (u = 0 -> -1) -> 4
    assert out.indices.view(-1).tolist() == [5, 4]
    assert out.z_q.view(-1).tolist() == [1, -1, 1, -1, -1, 1]
    assert out.token_entropy is None and out.codebook_entropy is None
    assert out.indices.dtype == torch.long and out.indices.shape == (1, 2, 1, 1)
    torch.testing.assert_close(out.commit_loss, ((u - out.z_q) ** 2).mean())


@pytest.mark.parametrize("groups,group_dim,l2", [(1, 8, False), (4, 2, False), (8, 1, True)])
def test_round_trip_and_ste(groups, group_dim, l2):
    q = GroupQuantizer(groups, group_dim, l2_norm=l2).train()
    u = torch.randn(2, groups * group_dim, 3, 5, requires_grad=True)
    out = q(u)
    torch.testing.assert_close(q.indices_to_codes(out.indices), out.z_q.detach())
    if l2:  # BSQ codes live on the sphere: +-1/sqrt(d)
        assert torch.allclose(out.z_q.detach().abs(), torch.full_like(u, 8**-0.5))
    assert out.token_entropy.dtype == torch.float32 and out.token_entropy.dim() == 0
    w = torch.randn_like(u)
    (out.z_q * w).sum().backward()
    if not l2:  # straight-through: d z_q / d u = identity
        torch.testing.assert_close(u.grad, w)
    else:
        assert u.grad.abs().sum() > 0


def test_gradient_reaches_encoder_and_entropy_flag():
    torch.manual_seed(0)
    enc = nn.Conv2d(3, 6, 3, padding=1)
    q = GroupQuantizer(3, 2).eval()
    out = q(enc(torch.randn(2, 3, 8, 8)), entropy=True)
    assert out.codebook_entropy is not None
    loss = out.z_q.square().mean() + 0.25 * out.commit_loss + out.token_entropy - out.codebook_entropy
    loss.backward()
    assert enc.weight.grad is not None and enc.weight.grad.abs().sum() > 0
    assert q.train()(enc(torch.randn(1, 3, 4, 4)), entropy=False).token_entropy is None


def test_bf16_autocast_gives_fp32_entropies():
    q = GroupQuantizer(2, 4, entropy_mode="exact").train()
    u = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(u.bfloat16())
        tok, cb = entropy_terms(u.permute(0, 2, 3, 1).reshape(-1, 8).bfloat16(), 4, mode="grouped")
    for t in (out.token_entropy, out.codebook_entropy, tok, cb):
        assert t.dtype == torch.float32 and torch.isfinite(t)
    assert out.z_q.dtype == torch.bfloat16


def test_codebook_usage():
    usage = CodebookUsage(groups=2, group_dim=2)
    tokens = torch.tensor([[0, 0], [1, 1], [1, 3]])  # rows: (group 0 index, group 1 index)
    usage.update(tokens.t().reshape(1, 2, 3, 1))
    usage.update(torch.tensor([[0, 1]]).t().reshape(1, 2, 1, 1))  # token (0, 1)
    r = usage.compute()
    assert r["usage_per_group"] == [2 / 4, 3 / 4]  # group 0 saw {0, 1}; group 1 saw {0, 1, 3}
    assert r["usage"] == pytest.approx(5 / 8)
    assert r["joint_codes"] == 4  # (0,0), (1,1), (1,3), (0,1)
    # wide codes (d > 62) use row-unique instead of the int64 hash
    wide = CodebookUsage(groups=2, group_dim=40)
    idx = torch.tensor([[2**39, 5], [2**39, 5], [1, 5]]).t().reshape(1, 2, 3, 1)
    wide.update(idx)
    assert wide.compute()["joint_codes"] == 2
    usage.reset()
    assert usage.compute()["joint_codes"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the asynchronous copy path is CUDA's")
def test_codebook_usage_on_cuda_equals_the_host_path():
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 2**6, (4, 3, 5, 5), generator=gen) for _ in range(5)]
    host, device = CodebookUsage(3, 6), CodebookUsage(3, 6)
    for b in batches:
        host.update(b)
        device.update(b.cuda())
    assert device._pending is not None  # the last batch is still in flight here
    assert device.compute() == host.compute()


def _sync_worker(rank, world, tmp, z):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    part = z.chunk(world)[rank].clone().requires_grad_(True)
    out = {}
    for mode in ("grouped", "pooled", "exact"):
        kwargs = {"block_elems": 4} if mode == "exact" else {}  # several all-reduced blocks
        cb = entropy_terms(part, 2, TAU, mode, sync=True, **kwargs)[1]
        (grad,) = torch.autograd.grad(cb, part)
        out[mode] = (cb.detach(), grad)
    torch.save(out, f"{tmp}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sync_entropy_two_ranks():
    """With sync, each rank sees H of the global mean distribution, and its gradient is
    world * dH/dz_local, so DDP's averaging gives the exact global gradient."""
    z = _latents(24, 6, seed=7)
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_sync_worker, args=(world, tmp, z), nprocs=world)
        results = [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]
    for mode in ("grouped", "pooled", "exact"):
        zz = z.clone().requires_grad_(True)
        ref = entropy_terms(zz, 2, TAU, mode)[1]
        (ref_grad,) = torch.autograd.grad(ref, zz)
        for rank in range(world):
            cb, grad = results[rank][mode]
            torch.testing.assert_close(cb, ref.detach(), rtol=1e-10, atol=0)
            torch.testing.assert_close(grad, world * ref_grad.chunk(world)[rank], rtol=1e-8, atol=1e-12)
