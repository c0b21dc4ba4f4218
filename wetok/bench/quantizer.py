"""Memory and time of the entropy loss (token + codebook, forward + backward) per codebook mode.

    python -m wetok.bench.quantizer [--device cuda] [--tokens 4096] [--dims 8 16 20 24 32 40]
                                    [--repeats 5] [--csv PATH]

Modes: ``naive`` (dense T x 2^d softmax, Open-MAGVIT2), ``grouped`` (paper Eq. 9, d' = the largest
divisor of d not above --group-dim), ``exact`` (true joint entropy, O(T 2^(d/2)) memory).
Peak memory = max_memory_allocated during one step minus what was allocated before it (the
latents).  Time = median over --repeats of CUDA-event-timed steps after one warm-up.  Out of
memory is reported as OOM and the table goes on (larger d of that mode are then not tried); a
step whose time, extrapolated from the previous d >= 16 (x 2^delta_d for naive/exact), exceeds
--time-limit is skipped.  Afterwards the
relative error of ``exact`` vs a float64 reference is printed per matmul precision.
"""

from __future__ import annotations

import argparse
import csv
import statistics

import torch

from wetok.bench.common import GIB, StepTimer, free, is_oom, sync
from wetok.quantize import entropy_terms

MODES = ("naive", "grouped", "exact")


def _group_dim(d: int, cap: int) -> int:
    return max(k for k in range(1, min(d, cap) + 1) if d % k == 0)


def _latents(tokens: int, d: int, device, scale: float = 0.01, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(tokens, d, generator=gen) * scale).to(device).requires_grad_(True)


def _step(z, mode, group_dim, tau, matmul, block_elems):
    tok, cb = entropy_terms(z, group_dim, tau, mode, exact_matmul=matmul, block_elems=block_elems)
    (tok - cb).backward()
    z.grad = None


def measure(mode, d, args) -> dict:
    """One table cell: peak extra memory (GiB) and median time (ms) of one fwd+bwd step."""
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    gd = _group_dim(d, args.group_dim) if mode == "grouped" else d
    row = {"d": d, "mode": mode, "group_dim": gd, "peak_gib": None, "ms": None, "status": "ok"}
    z = _latents(args.tokens, d, dev)
    oom = False
    try:
        sync(dev)
        if cuda:
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        _step(z, mode, gd, args.tau, args.exact_matmul, args.block_elems)  # also the warm-up
        sync(dev)
        if cuda:
            row["peak_gib"] = (torch.cuda.max_memory_allocated(dev) - base) / GIB
        timer = StepTimer(dev)
        for _ in range(args.repeats):
            with timer.step():
                _step(z, mode, gd, args.tau, args.exact_matmul, args.block_elems)
            sync(dev)
        row["ms"] = statistics.median(timer.times_ms())
    except Exception as err:
        if not is_oom(err):
            raise
        oom = True
    if oom:  # outside the except block, so the traceback's tensors are gone
        row["status"] = "OOM"
    del z
    free(dev)
    return row


def _cell(row, cuda: bool) -> str:
    if row["status"] != "ok":
        return row["status"]
    mem = f"{row['peak_gib']:.3f} GiB" if cuda else "n/a (CPU)"
    return f"{mem}, {row['ms']:.2f} ms"


def relative_errors(d, args) -> list[dict]:
    """exact-mode value and gradient vs float64 exact mode, per matmul precision and z scale."""
    dev = torch.device(args.device)
    out = []
    for scale in (0.01, 0.1):  # bit logits 4 z / tau ~ N(0, 4^2) (soft) and N(0, 40^2) (near hard)
        # reference on the same fp32 latents, so only the arithmetic differs
        z64 = _latents(args.tokens, d, dev, scale, seed=1).detach().double().requires_grad_(True)
        ref = entropy_terms(z64, d, args.tau, "exact")[1]
        (g_ref,) = torch.autograd.grad(ref, z64)
        precisions = ("fp32", "tf32", "bf16") if dev.type == "cuda" else ("fp32",)
        for p in precisions:
            z = z64.detach().float().requires_grad_(True)
            h = entropy_terms(z, d, args.tau, "exact", exact_matmul=p, block_elems=args.block_elems)[1]
            (g,) = torch.autograd.grad(h, z)
            out.append({
                "d": d, "z_std": scale, "matmul": p, "H_fp64": ref.item(),
                "rel_err_H": abs(h.item() - ref.item()) / abs(ref.item()),
                "rel_err_grad": ((g.double() - g_ref).norm() / g_ref.norm()).item(),
            })
        del z64, g_ref
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=4096, help="T (paper: batch 16 x 16 x 16)")
    ap.add_argument("--dims", type=int, nargs="+", default=[8, 16, 20, 24, 32, 40])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--group-dim", type=int, default=8, help="d' cap for grouped")
    ap.add_argument("--tau", type=float, default=0.01)
    ap.add_argument("--exact-matmul", default="auto", choices=["auto", "fp32", "tf32", "bf16"])
    ap.add_argument("--block-elems", type=int, default=1 << 26, help="exact: entries of M per block")
    ap.add_argument("--time-limit", type=float, default=60.0, help="skip steps estimated slower (s)")
    ap.add_argument("--error-dim", type=int, default=None,
                    help="d for the fp64 error check (default 24 on CUDA, min(24, max dims) on CPU)")
    ap.add_argument("--csv", default=None, help="also write the rows to this CSV")
    args = ap.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    name = torch.cuda.get_device_name(args.device) if cuda else "CPU"
    print(f"# entropy loss fwd+bwd, T={args.tokens} tokens, tau={args.tau}, device={name}, "
          f"exact matmul={args.exact_matmul}, block={args.block_elems}, torch {torch.__version__}\n")

    rows, last = [], {}
    for d in args.dims:
        for mode in args.modes:
            prev = last.get(mode)
            if prev is not None and prev["status"] == "OOM":  # memory only grows with d
                rows.append({**prev, "d": d, "status": f"OOM (as at d={prev['d']})"})
                continue
            if prev is not None and mode != "grouped" and prev["d"] >= 16:  # below: overhead-bound
                est = prev["ms"] / 1e3 * 2.0 ** (d - prev["d"])
                if est > args.time_limit:
                    rows.append({"d": d, "mode": mode, "group_dim": d, "peak_gib": None, "ms": None,
                                 "status": f"skipped (est. {est:.0f} s)"})
                    continue
            row = measure(mode, d, args)
            rows.append(row)
            last[mode] = row
            print(f"  d={d} {mode}: {_cell(row, cuda)}", flush=True)

    by = {(r["d"], r["mode"]): r for r in rows}
    heads = {"naive": "naive", "grouped": "grouped (g x d')", "exact": "exact"}
    print("\n| d | " + " | ".join(heads[m] for m in args.modes) + " |")
    print("|---|" + "---|" * len(args.modes))
    for d in args.dims:
        gd = _group_dim(d, args.group_dim)
        cells = [_cell(by[d, m], cuda) + (f" ({d // gd}x{gd})" if m == "grouped" else "")
                 for m in args.modes]
        print(f"| {d} | " + " | ".join(cells) + " |")

    err_d = args.error_dim or (24 if cuda else min(24, max(args.dims)))
    errs = relative_errors(err_d, args)
    print(f"\nexact mode vs float64 exact mode, d={err_d}, T={args.tokens}:\n")
    print("| z std | matmul | H (fp64) | rel. error H | rel. error grad |\n|---|---|---|---|---|")
    for e in errs:
        print(f"| {e['z_std']} | {e['matmul']} | {e['H_fp64']:.6f} | {e['rel_err_H']:.2e} "
              f"| {e['rel_err_grad']:.2e} |")

    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["d", "mode", "group_dim", "peak_gib", "ms", "status"])
            w.writeheader()
            w.writerows(rows)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
