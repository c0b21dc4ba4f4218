"""Compare the records of two training runs (DDP vs one process, resumed vs uninterrupted).

    python -m wetok.bench.ddp_check RUN REFERENCE [--grad-steps 1] [--keys loss loss_rec ...]

Prints, per logged train step, the largest relative difference of the logged values (with the
key) and, when both runs hold a checkpoint of step 1 (``checkpoints/step_0000001.pt``, or
``last.pt`` at step 1), the gradient gap |g - g_ref| / |g_ref| of G and D at step 1, read from
Adam's first moment ((1 - beta1) g after one step). Exit status 1 when the step lists differ.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

SKIP = ("step", "split", "time_s", "img_per_s", "lr", "peak_mem_gib")


def train_rows(run_dir: Path) -> dict[int, dict]:
    """The logged train values of a run, by step."""
    rows = (json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r for r in rows if r["split"] == "train"}


def rel_gaps(run: dict[int, dict], ref: dict[int, dict], keys=None) -> dict[int, tuple[float, str]]:
    """Per step: (largest |a - b| / max(|b|, 1e-6) over the keys, that key)."""
    out = {}
    for step in sorted(ref):
        names = keys or [k for k in ref[step] if k not in SKIP and k in run.get(step, {})]
        out[step] = max(((abs(run[step][k] - ref[step][k]) / max(abs(ref[step][k]), 1e-6), k)
                         for k in names), default=(0.0, "-"))
    return out


def step1_checkpoint(run_dir: Path) -> Path | None:
    kept = Path(run_dir) / "checkpoints" / "step_0000001.pt"
    if kept.is_file():
        return kept
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if last.is_file() and torch.load(last, map_location="cpu", weights_only=True)["step"] == 1:
        return last
    return None


def first_moments(path: Path, opt: str) -> torch.Tensor:
    """Adam's first moment of one optimizer ('opt_g' | 'opt_d'), all parameters in a row
    (empty when it has not stepped, e.g. D before loss.disc_start)."""
    state = torch.load(path, map_location="cpu", weights_only=True)[opt]["state"]
    return torch.cat([state[i]["exp_avg"].flatten().double() for i in sorted(state)] or
                     [torch.zeros(0, dtype=torch.float64)])


def gradient_gap(run_dir: Path, reference: Path, opt: str) -> float | None:
    """|g - g_ref| / |g_ref| at step 1 over all parameters of one optimizer (None: the
    reference's optimizer took no step or had no gradient, e.g. D before loss.disc_start)."""
    got = first_moments(step1_checkpoint(run_dir), opt)
    want = first_moments(step1_checkpoint(reference), opt)
    if not want.any():  # also an empty one
        return None
    return float((got - want).norm() / want.norm())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wetok.bench.ddp_check",
                                description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("reference", type=Path)
    p.add_argument("--keys", nargs="*", default=None, help="logged keys (default: all)")
    p.add_argument("--label", default="run vs reference")
    args = p.parse_args(argv)
    run, ref = train_rows(args.run), train_rows(args.reference)
    print(f"## {args.label}: {args.run} vs {args.reference}")
    if sorted(run) != sorted(ref):
        print(f"different logged steps: {sorted(run)} vs {sorted(ref)}")
        return 1
    print("| step | max rel. diff | key | loss | loss (reference) |\n|---|---|---|---|---|")
    for step, (gap, key) in rel_gaps(run, ref, args.keys).items():
        print(f"| {step} | {gap:.2e} | {key} | {run[step]['loss']:.6f} | "
              f"{ref[step]['loss']:.6f} |")
    if step1_checkpoint(args.run) and step1_checkpoint(args.reference):
        for opt in ("opt_g", "opt_d"):
            gap = gradient_gap(args.run, args.reference, opt)
            print(f"step-1 gradient gap {opt}: " + ("no gradient" if gap is None else f"{gap:.2e}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
