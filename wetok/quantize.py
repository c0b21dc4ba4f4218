"""Group-wise lookup-free quantisation (GQ) and its entropy loss, WeTok Sec 3.

One module covers the three quantisers of the paper (names as in the paper):

* LFQ  (Eq. 4): ``g = 1``, sign quantisation over the implicit codebook {-1, 1}^d;
* BSQ:          ``d' = 1`` and ``l2_norm=True``: u is l2-normalised over its d channels and the
                codes are {-1, 1}^d / sqrt(d);
* GQ   (Sec 3.2): anything in between, d = g * d'.

Entropy.  For a token u in R^d the soft code assignment used by the entropy loss (Eq. 5) is
``q(c|u) = softmax_c(2 u.c / tau)`` over c in {-1, 1}^d (official code; tau = 0.01).  Because
``u.c = sum_k u_k c_k`` the softmax factorises over bits (this is Eq. 6 taken down to single
bits):

    q(c|u) = prod_k q_k(c_k|u_k),   q_k(+1|u_k) = sigmoid(x_k),   x_k = 4 u_k / tau.

Hence the token entropy (Eq. 5, first term; Eq. 7) is *exactly* a sum of d binary entropies for
every g, and every distribution over a group's 2^d' codes is a product of bit probabilities.
The codebook entropy (Eq. 5, second term) is H(mean_t q(c|u_t)); the entropy mode (config
``quantizer.entropy_mode``) selects how:

* ``grouped``  paper Eq. 9: sum over groups of H(batch-mean distribution of that group's codes);
               exact for g = 1, otherwise relies on the independence assumption of Eq. 8;
* ``pooled``   official WeTok code: the g group distributions are averaged into ONE 2^d'
               distribution (mean over tokens and groups) and its entropy is returned (not * g);
* ``naive``    Open-MAGVIT2 LFQ: dense (T, 2^d) softmax over the full joint codebook (the token
               entropy too); kept naive on purpose, it is the memory baseline (paper Table 1);
               ignores g;
* ``exact``    the true joint entropy over all 2^d codes (what ``naive`` computes) at
               O(T 2^(d/2)) memory: see :class:`_ExactCodebookEntropy`.  Ignores g: for g > 1
               it differs from ``grouped`` by exactly the error of assumption Eq. 8.

Reduction over the g groups (``reduction``).  Every term is first a sum over groups (Eq. 7 and
Eq. 9 as the paper writes them, ``sum``): its scale then grows with g (upper bound d log 2).
``mean`` divides every term by g (the official WeTok code's scaling; nats per group, upper bound
d' log 2), so that one ``entropy_weight`` means the same for every g:

* token entropy: ``sum`` = mean over tokens of the sum over groups (Eq. 7); ``mean`` = mean over
  tokens and groups (official code); exactly g times smaller;
* ``grouped``: ``sum`` = sum_j H(M_j) (Eq. 9); ``mean`` = mean_j H(M_j);
* ``pooled``:  ``mean`` = H(mean_j M_j) (official code); ``sum`` = g H(mean_j M_j);
* ``exact`` / ``naive``: ``sum`` = H(M), the joint entropy over 2^d codes (equal to Eq. 9's sum
  under assumption Eq. 8); ``mean`` = H(M) / g, the joint entropy per group.
For g = 1 (LFQ) both reductions are the same.

No epsilon enters any value unless ``eps`` > 0 asks for the official code's -M log(M + eps):
x log x uses 0 log 0 = 0; the binary entropy is computed from logits.  Natural log throughout.
All entropy maths runs in fp32 (or fp64 if given fp64, :func:`at_least_fp32`), also under
autocast.

:func:`check_quantizer` is the one check of the quantiser's options: GroupQuantizer calls it, and
so does the config validator before anything is allocated.

About 600 lines, one concept: every entropy mode, the quantiser and codebook usage share the bit
and code maths and index order defined here; the exact joint entropy (a custom autograd
Function with its blocked backward) is a third of it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from wetok.checks import is_int_at_least
from wetok.distributed import AllReduceSum
from wetok.distributed import world as dist_world

ENTROPY_MODES = ("grouped", "pooled", "naive", "exact")
REDUCTIONS = ("mean", "sum")
EXACT_MATMUL_MODES = ("auto", "fp32", "tf32", "bf16")
MAX_GROUP_DIM = 62  # d' bits of a group index in an int64
MAX_ENUMERATED_GROUP_DIM = 16  # grouped / pooled hold 2^d' codes per group and token


# --------------------------------------------------------------------------------------------
# option checks and dtype
# --------------------------------------------------------------------------------------------
def _expect(ok: bool, name: str, expected: str, got) -> None:
    if not ok:
        raise ValueError(f"{name}: expected {expected}, got {got!r}")


def _check_choice(name: str, value, allowed) -> None:
    _expect(value in allowed, name, "one of " + "|".join(allowed), value)


def check_quantizer(groups, group_dim, tau, entropy_mode, entropy_reduction,
                    entropy_eps) -> None:
    """Raise ValueError ("name: expected ..., got ...", names as the arguments and the config's
    quantizer keys) on the first option GroupQuantizer cannot run with."""
    for name, value in (("groups", groups), ("group_dim", group_dim)):
        _expect(is_int_at_least(value, 1), name, "a positive integer", value)
    _expect(group_dim <= MAX_GROUP_DIM, "group_dim",
            f"at most {MAX_GROUP_DIM} (the bits of an int64 index)", group_dim)
    _check_choice("entropy_mode", entropy_mode, ENTROPY_MODES)
    _expect(group_dim <= MAX_ENUMERATED_GROUP_DIM or entropy_mode in ("naive", "exact"),
            "group_dim", f"at most {MAX_ENUMERATED_GROUP_DIM} for grouped/pooled entropy "
            "(2^d' codes per group); use exact", group_dim)
    _check_choice("entropy_reduction", entropy_reduction, REDUCTIONS)
    _expect(tau > 0, "tau", "a positive temperature", tau)
    _expect(entropy_eps >= 0 and not (entropy_eps and entropy_mode == "exact"), "entropy_eps",
            ">= 0 (0 with exact entropy)", entropy_eps)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """t in fp32 or wider: fp16/bf16 -> fp32, fp32 as it is, fp64 kept (the parity tests)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


# --------------------------------------------------------------------------------------------
# small building blocks
# --------------------------------------------------------------------------------------------
def bit_logits(z: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-bit logits x = 4 z / tau, so that q(bit=+1 | z) = sigmoid(x).

    From softmax_c(2 z.c / tau): the two values of bit k differ by 2 * 2 z_k / tau in the logit.
    """
    return z * (4.0 / tau)


def binary_entropy_from_logits(x: torch.Tensor) -> torch.Tensor:
    """H(Bernoulli(sigmoid(x))) elementwise, stable and epsilon-free.

    H = -p log p - (1-p) log(1-p) with log p = -softplus(-x), log(1-p) = -softplus(x), so
    H = sigmoid(x) softplus(-x) + sigmoid(-x) softplus(x): two non-negative terms, no cancellation.
    """
    return torch.sigmoid(x) * F.softplus(-x) + torch.sigmoid(-x) * F.softplus(x)


def code_probs(x: torch.Tensor) -> torch.Tensor:
    """Probabilities of all 2^n codes from n per-bit logits: (..., n) -> (..., 2^n).

    Code index v = sum_k bit_k 2^k (little-endian, bit_k = 1 means +1), probability
    prod_k sigmoid(+-x_k) (Eq. 6 applied bit by bit).  Built by n outer products.
    """
    p1, p0 = torch.sigmoid(x), torch.sigmoid(-x)
    probs = torch.ones_like(x[..., :1])
    for k in range(x.shape[-1]):
        # new index = old index + 2^k * bit_k: bit_k = 0 first, then bit_k = 1
        probs = torch.cat([probs * p0[..., k : k + 1], probs * p1[..., k : k + 1]], dim=-1)
    return probs


def _code_probs_inplace(x: torch.Tensor) -> torch.Tensor:
    """Same as :func:`code_probs` for x (T, n), no autograd, one (T, 2^n) buffer, no copies."""
    t, n = x.shape
    p1, p0 = torch.sigmoid(x), torch.sigmoid(-x)
    out = torch.empty(t, 1 << n, dtype=x.dtype, device=x.device)
    out[:, :1] = 1
    for k in range(n):
        half = 1 << k
        torch.mul(out[:, :half], p1[:, k : k + 1], out=out[:, half : 2 * half])
        out[:, :half].mul_(p0[:, k : k + 1])
    return out


def _bit_marginal_sums(w: torch.Tensor, n: int) -> torch.Tensor:
    """For w (T, 2^n) return (T, n, 2): [t, k, b] = sum of w[t, v] over codes v with bit_k(v) = b."""
    t = w.shape[0]
    out = torch.empty(t, n, 2, dtype=w.dtype, device=w.device)
    for k in range(n):
        out[:, k] = w.view(t, -1, 2, 1 << k).sum(dim=(1, 3))
    return out


class _Entropy(torch.autograd.Function):
    """H(m) = -sum_i m_i log m_i over the last dim, with 0 log 0 = 0 (no epsilon in the value).

    Backward: dH/dm = -(log m + 1); where m == 0 (underflow) the log is clamped at the smallest
    normal float only inside the gradient, which is then multiplied by dm/d(input) = 0 anyway.
    """

    @staticmethod
    def forward(ctx, m):
        ctx.save_for_backward(m)
        return -torch.special.xlogy(m, m).sum(-1)

    @staticmethod
    def backward(ctx, grad):
        (m,) = ctx.saved_tensors
        tiny = torch.finfo(m.dtype).tiny
        return -grad.unsqueeze(-1) * (torch.log(m.clamp_min(tiny)) + 1)


def entropy(m: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of distributions along the last dim; epsilon-free, see :class:`_Entropy`."""
    return _Entropy.apply(m)


def _mean_distribution(prob_sum: torch.Tensor, count: int, sync: bool) -> torch.Tensor:
    """prob_sum / count, or with ``sync`` the token-weighted mean over all ranks."""
    if sync and dist_world() > 1:
        n = torch.tensor([float(count)], device=prob_sum.device, dtype=prob_sum.dtype)
        dist.all_reduce(n)
        return AllReduceSum.apply(prob_sum) / n
    return prob_sum / count


# --------------------------------------------------------------------------------------------
# exact joint codebook entropy over 2^d codes at O(T 2^(d/2)) memory
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _cuda_fp32_matmul(precision: str | None):
    """Temporarily set cuBLAS fp32 matmul precision ('ieee' or 'tf32') with the per-backend API
    (get, set, restore: leaves whatever API the caller uses untouched).  None: leave as is."""
    m = torch.backends.cuda.matmul
    if precision is None:
        yield
        return
    if hasattr(m, "fp32_precision"):  # torch >= 2.9
        name, value = "fp32_precision", precision
    else:
        name, value = "allow_tf32", precision == "tf32"
    old = getattr(m, name)
    setattr(m, name, value)
    try:
        yield
    finally:
        setattr(m, name, old)


def _resolve_matmul(mode: str, x: torch.Tensor) -> str:
    if mode not in EXACT_MATMUL_MODES:
        raise ValueError(f"exact_matmul={mode!r}; allowed: {', '.join(EXACT_MATMUL_MODES)}")
    if x.dtype == torch.float64 or x.device.type != "cuda":
        return "fp32"  # fp64 stays fp64; TF32 does not exist off CUDA; bf16 on CPU is slow
    return "tf32" if mode == "auto" else mode


class _ExactCodebookEntropy(torch.autograd.Function):
    """Exact H(M), M = mean_t q(c|u_t) over all 2^d codes, without materialising T x 2^d.

    Split the d bits into A (low |A| = floor(d/2) bits) and B (the rest).  With
    P_A[t, a] = q(c_A = a | u_t) and P_B[t, b] = q(c_B = b | u_t) (products of bit
    probabilities, Eq. 6), the factorisation q(c|u) = q(c_A|u) q(c_B|u) gives

        M = P_A^T P_B / T          (2^|A| x 2^|B|, joint code = a + 2^|A| b)
        H = -sum_{a,b} M log M.

    M is never held whole: H is accumulated over blocks of rows of M (``block_elems`` entries a
    block) and the blocks are recomputed in backward, where with G = dH/dM = -(log M + 1)

        dH/dP_A = P_B G^T / T,     dH/dP_B = P_A G / T,
        dH/dx_k = sum_a (dH/dP_A)[t,a] P_A[t,a] (bit_k(a) - sigmoid(x_k))   (same for B),

    the last split as sigmoid(-x) * S_1 - sigmoid(x) * S_0 (S_b: sums over codes with bit_k = b)
    so nothing cancels.  Extra memory O(T 2^(d/2) + block_elems); cost 4 matmuls of T x 2^d
    multiply-adds (3 when M is one block, whose G is then kept from forward).

    ``matmul`` is the precision of those big products ('fp32' IEEE, 'tf32', 'bf16').  Measured
    on an H100 (python -m wetok.bench.quantizer, T = 4096, tau = 0.01, z ~ N(0, s^2), s = 0.01
    and 0.1; relative error vs the same computation in fp64, at d = 20 and 24):
        fp32  H <= 4e-7,  grad <= 6e-6
        tf32  H <= 7e-6,  grad <= 2e-3     (default on CUDA: 'auto')
        bf16  H <= 7e-5,  grad <= 2.5e-2   (opt-in; also needs more memory at d = 32)
    Fwd+bwd, block_elems = 2^26, tf32: d = 24 6 ms / 0.44 GiB; d = 32 0.65 s / 4.8 GiB
    (fp32: 12 ms and 3.1 s).  d = 40 would take ~200 s a step and 4 x 16 GiB: impractical.
    With ``sync`` every block of M is all-reduced over the ranks (M = sum_r P_A,r^T P_B,r / T_all),
    in forward and again in backward; the gradient is scaled by the world size R like
    :class:`AllReduceSum`, so that DDP's gradient averaging gives the exact gradient.
    """

    @staticmethod
    def forward(ctx, x, n_a, matmul, block_elems, sync):
        ctx.n_a, ctx.matmul, ctx.block_elems = n_a, matmul, block_elems
        world = dist_world() if sync else 1
        t = x.shape[0]
        if world > 1:
            tt = torch.tensor([float(t)], device=x.device, dtype=torch.float64)
            dist.all_reduce(tt)
            t_all = float(tt.item())
        else:
            t_all = float(t)
        ctx.world, ctx.t_all = world, t_all
        p_a, p_b = _code_probs_inplace(x[:, :n_a]), _code_probs_inplace(x[:, n_a:])
        h = torch.zeros((), dtype=torch.float64, device=x.device)
        keep_g = None
        for rows, m in _m_blocks(p_a, p_b, t_all, matmul, block_elems, world):
            h -= torch.special.xlogy(m, m).sum(dtype=torch.float64)
            if rows.stop - rows.start == p_a.shape[1] and ctx.needs_input_grad[0]:
                keep_g = _grad_of_entropy(m)  # single block: keep G, skip recompute
        ctx.save_for_backward(x, keep_g if keep_g is not None else torch.empty(0))
        ctx.keep_g = keep_g is not None
        return h.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_h):
        x, kept = ctx.saved_tensors
        n_a, matmul = ctx.n_a, ctx.matmul
        x_a, x_b = x[:, :n_a], x[:, n_a:]
        p_a, p_b = _code_probs_inplace(x_a), _code_probs_inplace(x_b)
        alpha = ctx.world / ctx.t_all  # see AllReduceSum for the factor R
        g_a = torch.empty_like(p_a)
        g_b = torch.zeros_like(p_b)
        lo_a, lo_b = _matmul_operand(p_a, matmul), _matmul_operand(p_b, matmul)
        if ctx.keep_g:
            blocks = [(slice(0, p_a.shape[1]), kept)]
        else:
            blocks = (
                (rows, _grad_of_entropy(m))
                for rows, m in _m_blocks(p_a, p_b, ctx.t_all, matmul, ctx.block_elems, ctx.world)
            )
        with _cuda_fp32_matmul(_cublas_precision(matmul, x)):
            for rows, g in blocks:
                g = _matmul_operand(g, matmul)
                g_a[:, rows] = torch.mm(lo_b, g.t()).to(g_a.dtype)  # P_B G^T
                if matmul == "bf16":
                    g_b += torch.mm(lo_a[:, rows], g).to(g_b.dtype)  # P_A G
                else:
                    g_b.addmm_(lo_a[:, rows], g)  # P_A G, in place
        scale = grad_h.to(x.dtype) * alpha
        grad_x = torch.cat([_chain_to_logits(g_a, p_a, x_a), _chain_to_logits(g_b, p_b, x_b)], 1)
        return grad_x * scale, None, None, None, None


def _grad_of_entropy(m: torch.Tensor) -> torch.Tensor:
    """G = dH/dM = -(log M + 1), log clamped at the smallest normal float where M underflowed."""
    return m.clamp_min(torch.finfo(m.dtype).tiny).log_().add_(1).neg_()


def _cublas_precision(matmul: str, x: torch.Tensor) -> str | None:
    if x.device.type != "cuda" or x.dtype != torch.float32 or matmul == "bf16":
        return None
    return "tf32" if matmul == "tf32" else "ieee"


def _matmul_operand(p: torch.Tensor, matmul: str) -> torch.Tensor:
    return p.to(torch.bfloat16) if matmul == "bf16" else p


def _m_blocks(p_a, p_b, t_all, matmul, block_elems, world):
    """Yield (rows, M[rows, :]) for consecutive row blocks of M = P_A^T P_B / T (all ranks)."""
    k_a, k_b = p_a.shape[1], p_b.shape[1]
    step = max(1, min(k_a, block_elems // k_b))
    lo_a, lo_b = _matmul_operand(p_a, matmul), _matmul_operand(p_b, matmul)
    for start in range(0, k_a, step):
        rows = slice(start, min(k_a, start + step))
        with _cuda_fp32_matmul(_cublas_precision(matmul, p_a)):
            m = torch.mm(lo_a[:, rows].t(), lo_b).to(p_a.dtype)
        if world > 1:
            dist.all_reduce(m)
        yield rows, m.div_(t_all)


def _chain_to_logits(g_p: torch.Tensor, p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dH/dx from dH/dP for P = code_probs(x): sum_a g P (bit_k(a) - sigmoid(x_k))."""
    w = g_p.mul_(p)  # in place: g_p is ours
    s = _bit_marginal_sums(w, x.shape[1])
    return torch.sigmoid(-x) * s[..., 1] - torch.sigmoid(x) * s[..., 0]


def exact_codebook_entropy(
    x: torch.Tensor, *, matmul: str = "auto", block_elems: int = 1 << 26, sync: bool = False
) -> torch.Tensor:
    """Exact joint codebook entropy H(mean_t q(c|u_t)) over all 2^d codes from bit logits x (T, d).

    See :class:`_ExactCodebookEntropy`.  ``matmul='auto'``: fp32 (IEEE) off CUDA, TF32 on CUDA
    (fp64 input stays fp64).  ``block_elems`` bounds the entries of M held at once (default
    2^26 = 256 MiB in fp32; a few such buffers are live at a time).
    """
    n_a = x.shape[1] // 2
    return _ExactCodebookEntropy.apply(x, n_a, _resolve_matmul(matmul, x), int(block_elems), sync)


# --------------------------------------------------------------------------------------------
# public entropy function
# --------------------------------------------------------------------------------------------
def entropy_terms(
    z: torch.Tensor,
    group_dim: int,
    tau: float = 0.01,
    mode: str = "grouped",
    *,
    reduction: str = "mean",
    sync: bool = False,
    exact_matmul: str = "auto",
    block_elems: int = 1 << 26,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token entropy (Eq. 7) and codebook entropy (Eq. 9 or variant) of latents z (N, d).

    Returns 0-dim tensors in nats, differentiable w.r.t. z, in fp32 (fp64 if z is fp64), also
    under autocast.  Token entropy = mean over tokens of sum over groups of H(q_G(c_k|u)) =
    sum over all d bits of binary entropies (exact for every g).  ``mode``, how the codebook
    entropy is computed: grouped | pooled | naive | exact (GroupQuantizer's ``entropy_mode``);
    ``reduction`` (mean | sum) how both terms combine over the g groups: ``sum`` as Eq. 7/9,
    ``mean`` = the sums / g (official code; module docstring).
    ``sync``: average the batch-mean code distributions over torch.distributed ranks (off =
    official behaviour; token entropy is never synced).  ``exact_matmul`` / ``block_elems``: see
    :func:`exact_codebook_entropy`.
    ``eps`` > 0: codebook entropy -sum M log(M + eps), as the official code computes it (1e-5);
    grouped / pooled / naive only.
    """
    _check_choice("mode", mode, ENTROPY_MODES)
    _check_choice("reduction", reduction, REDUCTIONS)
    if z.dim() != 2:
        raise ValueError(f"z must be (N, d), got shape {tuple(z.shape)}")
    n, d = z.shape
    if group_dim < 1 or d % group_dim:
        raise ValueError(f"group_dim={group_dim} must divide d={d}")
    g = d // group_dim
    per_sum = 1.0 if reduction == "sum" else 1.0 / g  # factor on every sum over the g groups
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = at_least_fp32(z)
        if mode == "naive":
            token, cb = _naive_entropy_terms(z, tau, sync, eps)
            return token * per_sum, cb * per_sum
        x = bit_logits(z, tau)
        token = binary_entropy_from_logits(x).sum(-1).mean() * per_sum
        if mode == "exact":
            cb = exact_codebook_entropy(x, matmul=exact_matmul, block_elems=block_elems, sync=sync)
            return token, cb * per_sum
        probs = code_probs(x.view(n, g, group_dim))  # (N, g, 2^d')
        if mode == "grouped":  # Eq. 9
            cb = _codebook_entropy(_mean_distribution(probs.sum(0), n, sync), eps).sum() * per_sum
        else:  # pooled: one 2^d' distribution over tokens and groups (official code), g x for sum
            m = _mean_distribution(probs.sum((0, 1)), n * g, sync)
            cb = _codebook_entropy(m, eps) * (g * per_sum)
        return token, cb


def full_codebook(d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The explicit LFQ codebook {-1, 1}^d as (2^d, d), row v = code with index v (little-endian)."""
    v = torch.arange(1 << d, device=device)
    bits = (v.unsqueeze(1) >> torch.arange(d, device=device)) & 1
    return (2 * bits - 1).to(dtype)


def _codebook_entropy(m: torch.Tensor, eps: float) -> torch.Tensor:
    """H(M) epsilon-free, or the official code's -sum M log(M + eps) when eps > 0."""
    return entropy(m) if eps == 0 else -(m * torch.log(m + eps)).sum(-1)


def _naive_entropy_terms(z: torch.Tensor, tau: float, sync: bool, eps: float = 0.0):
    """Open-MAGVIT2 style: dense softmax over all 2^d codes.  Memory O(T 2^d), on purpose."""
    codebook = full_codebook(z.shape[1], z.device, z.dtype)
    logits = 2 * z @ codebook.t() / tau
    log_p = torch.log_softmax(logits, dim=-1)
    p = log_p.exp()
    token = -(p * log_p).sum(-1).mean()
    cb = _codebook_entropy(_mean_distribution(p.sum(0), z.shape[0], sync), eps)
    return token, cb


# --------------------------------------------------------------------------------------------
# the quantiser
# --------------------------------------------------------------------------------------------
@dataclass
class QuantizerOutput:
    """z_q (B,d,h,w) with straight-through gradient; indices (B,g,h,w) long; commit_loss 0-dim;
    token_entropy / codebook_entropy 0-dim fp32 tensors, or None when not computed."""

    z_q: torch.Tensor
    indices: torch.Tensor
    commit_loss: torch.Tensor
    token_entropy: torch.Tensor | None = None
    codebook_entropy: torch.Tensor | None = None


class GroupQuantizer(nn.Module):
    """Group-wise lookup-free quantiser (WeTok Sec 3.2): LFQ (g=1), BSQ (d'=1, l2_norm), GQ.

    forward(u (B, d, h, w), entropy=None) -> QuantizerOutput with
      * z_q = u + sg(q - u) (Eq. 2), q = sign(u) in {-1, +1} (Eq. 4; u = 0 -> -1);
        with ``l2_norm`` u is first l2-normalised over its d channels and q = sign(u) / sqrt(d);
      * indices (B, g, h, w): group j holds channels j*d' .. j*d'+d'-1, index sum_k bit_k 2^k
        (little-endian), bit_k = 1 iff q > 0;
      * commit_loss = mean (u - sg(q))^2 (unweighted; the weight lives in the losses);
      * token_entropy, codebook_entropy from :func:`entropy_terms` when ``entropy`` is True, or
        when it is None and the module is training; else None.  With ``l2_norm`` the entropy is
        that of softmax(2 u.c / tau) over the codebook actually used, c in {-1,1}^d / sqrt(d),
        i.e. entropy_terms(u / sqrt(d)): per-bit logits 4 u_k / (sqrt(d) tau).
        ``entropy_mode``: how the codebook entropy is computed (grouped | pooled | naive | exact);
        ``entropy_reduction`` (mean | sum): how both entropies combine over the g groups (module
        docstring; mean = official code, sum = Eq. 7/9). Options checked by
        :func:`check_quantizer`.
    """

    def __init__(
        self,
        groups: int,
        group_dim: int,
        tau: float = 0.01,
        entropy_mode: str = "grouped",
        l2_norm: bool = False,
        sync_entropy: bool = False,
        entropy_reduction: str = "mean",
        entropy_eps: float = 0.0,
    ):
        super().__init__()
        check_quantizer(groups, group_dim, tau, entropy_mode, entropy_reduction, entropy_eps)
        self.groups, self.group_dim, self.tau = groups, group_dim, tau
        self.entropy_mode, self.l2_norm, self.sync_entropy = entropy_mode, l2_norm, sync_entropy
        self.entropy_reduction, self.entropy_eps = entropy_reduction, entropy_eps
        self.register_buffer("bit_weights", 2 ** torch.arange(group_dim), persistent=False)

    @property
    def dim(self) -> int:
        """d = g * d'."""
        return self.groups * self.group_dim

    @property
    def code_scale(self) -> float:
        """Magnitude of a code entry: 1, or 1/sqrt(d) for BSQ (l2_norm)."""
        return 1.0 / math.sqrt(self.dim) if self.l2_norm else 1.0

    def extra_repr(self) -> str:
        return (
            f"groups={self.groups}, group_dim={self.group_dim}, tau={self.tau}, "
            f"entropy_mode={self.entropy_mode!r}, l2_norm={self.l2_norm}, "
            f"sync_entropy={self.sync_entropy}, entropy_reduction={self.entropy_reduction!r}"
        )

    def forward(self, u: torch.Tensor, entropy: bool | None = None) -> QuantizerOutput:
        b, d, h, w = u.shape
        if d != self.dim:
            raise ValueError(f"expected {self.dim} channels (g={self.groups} x d'={self.group_dim}), got {d}")
        if self.l2_norm:
            u = F.normalize(u, dim=1)
        positive = u > 0
        q = torch.where(positive, self.code_scale, -self.code_scale).to(u.dtype)
        z_q = u + (q - u).detach()  # Eq. 2
        commit = F.mse_loss(at_least_fp32(u), at_least_fp32(q))
        bits = positive.view(b, self.groups, self.group_dim, h, w).long()
        indices = (bits * self.bit_weights.view(1, 1, -1, 1, 1)).sum(2)
        out = QuantizerOutput(z_q=z_q, indices=indices, commit_loss=commit)
        if entropy is None:
            entropy = self.training
        if entropy:
            z = u.permute(0, 2, 3, 1).reshape(-1, d) * self.code_scale
            out.token_entropy, out.codebook_entropy = entropy_terms(
                z, self.group_dim, self.tau, self.entropy_mode, sync=self.sync_entropy,
                reduction=self.entropy_reduction,
                eps=self.entropy_eps,
            )
        return out

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, g, h, w) long -> (B, d, h, w) float codes, equal to forward's z_q values."""
        b, g, h, w = indices.shape
        if g != self.groups:
            raise ValueError(f"expected {self.groups} groups, got {g}")
        shifts = torch.arange(self.group_dim, device=indices.device).view(1, 1, -1, 1, 1)
        bits = (indices.unsqueeze(2) >> shifts) & 1
        codes = (2 * bits - 1).float() * self.code_scale
        return codes.view(b, self.dim, h, w)


# --------------------------------------------------------------------------------------------
# usage statistics over an evaluation pass
# --------------------------------------------------------------------------------------------
class CodebookUsage:
    """Accumulates codebook usage of indices (B, g, h, w) over an evaluation pass.

    compute() -> {"usage_per_group": [fraction of the 2^d' sub-codes of group j seen],
                  "usage": mean of those (the official code's number pools groups instead),
                  "joint_codes": number of distinct joint codes (all g indices) seen}.
    Sets of seen values are kept as sorted unique tensors, merged lazily (amortised).
    CUDA indices go to pinned host memory without a device sync: each batch is merged at the
    next update, once its copy is done (one batch in flight), so the GPU never waits on it.
    Local to this process until :meth:`gather_ranks` (every rank calls it).
    """

    def __init__(self, groups: int, group_dim: int):
        self.groups, self.group_dim = groups, group_dim
        self.reset()

    def reset(self) -> None:
        self._seen = [[] for _ in range(self.groups)]  # per group: list of unique tensors
        self._joint: list[torch.Tensor] = []
        self._pending = None  # (pinned host copy, CUDA event) of the last CUDA batch

    @staticmethod
    def _merge(parts: list, dim=None) -> list:
        total = sum(p.shape[0] for p in parts)
        if len(parts) > 64 or (len(parts) > 1 and total > 2 * max(p.shape[0] for p in parts)):
            return [torch.unique(torch.cat(parts), dim=dim)]
        return parts

    @torch.no_grad()
    def update(self, indices: torch.Tensor) -> None:
        if indices.dim() != 4 or indices.shape[1] != self.groups:
            raise ValueError(f"indices must be (B, {self.groups}, h, w), got {tuple(indices.shape)}")
        rows = indices.permute(0, 2, 3, 1).reshape(-1, self.groups)
        if rows.is_cuda:
            host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
            host.copy_(rows, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._flush()
            self._pending = (host, event)
        else:
            self._add(rows)

    def _flush(self) -> None:
        if self._pending is not None:
            host, event = self._pending
            self._pending = None
            event.synchronize()
            self._add(host)

    def _add(self, rows: torch.Tensor) -> None:
        rows = rows.long()
        for j in range(self.groups):
            self._seen[j] = self._merge(self._seen[j] + [torch.unique(rows[:, j])])
        if self.groups * self.group_dim <= 62:
            shifts = torch.arange(self.groups) * self.group_dim
            key = (rows << shifts).sum(1)
            self._joint = self._merge(self._joint + [torch.unique(key)])
        else:
            self._joint = self._merge(self._joint + [torch.unique(rows, dim=0)], dim=0)

    def gather_ranks(self) -> None:
        """Merge the codes seen on every torch.distributed rank into this one (no-op alone)."""
        self._flush()
        if dist_world() == 1:
            return
        parts = [None] * dist_world()
        dist.all_gather_object(parts, (self._seen, self._joint))
        self._seen = [[t for seen, _ in parts for t in seen[j]] for j in range(self.groups)]
        self._joint = [t for _, joint in parts for t in joint]

    def compute(self) -> dict:
        self._flush()
        size = float(2**self.group_dim)
        per_group = []
        for j in range(self.groups):
            parts = self._seen[j]
            per_group.append(torch.unique(torch.cat(parts)).numel() / size if parts else 0.0)
        if not self._joint:
            joint = 0
        elif self.groups * self.group_dim <= 62:
            joint = torch.unique(torch.cat(self._joint)).numel()
        else:
            joint = torch.unique(torch.cat(self._joint), dim=0).shape[0]
        return {
            "usage_per_group": per_group,
            "usage": sum(per_group) / len(per_group),
            "joint_codes": int(joint),
        }
