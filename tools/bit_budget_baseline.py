"""The avg-pool baseline at a bit budget: each token-grid cell's colour mean coded in d bits.

    python tools/bit_budget_baseline.py scale=short experiment=table06_gfq   # markdown table
    python tools/bit_budget_baseline.py scale=short --bits 8 16 256

A tokenizer with d = g d' bits per token is compared in every evaluation with average pooling
at its token grid, whose three colour means are floats. This prints what the same grid scores
when each mean is coded in d bits (wetok.baselines.avg_pool with ``bits``: uniform bins, 5-6-5
at 16 bits), on the validation images of the composed config, beside the float avg pool and the
mean colour: the PSNR/SSIM a plain d-bit colour code reaches without any learning.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def table(overrides: list[str], bits: list[int]) -> str:
    from hydra import compose, initialize_config_dir

    import wetok.config  # noqa: F401  (run_id resolver)
    from wetok import baselines as BL
    from wetok.data import build_loader
    from wetok.metrics import Evaluator
    from wetok.model import downsample_factor

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    factor = downsample_factor(cfg.model)
    d = cfg.quantizer.groups * cfg.quantizer.group_dim
    # name -> (bits per token, prediction of a batch)
    predictors = {"mean colour": ("-", BL.mean_colour),
                  "avg pool (float means)": ("-", lambda x: BL.avg_pool(x, factor))}
    for b in sorted(set(bits) | {d}):
        predictors[f"avg pool, {b}-bit means {BL.colour_bits(b)}"] = (
            str(b), lambda x, b=b: BL.avg_pool(x, factor, bits=b))
    scores = {name: Evaluator(metrics=BL.BASELINE_METRICS) for name in predictors}
    loader, _ = build_loader(cfg.data, "val", cfg.eval.batch_size, seed=cfg.seed)
    seen = 0
    for x in loader:
        if cfg.eval.num_images is not None:
            x = x[: cfg.eval.num_images - seen]
        for name, (_, predict) in predictors.items():
            scores[name].update(x, predict(x))
        seen += len(x)
        if cfg.eval.num_images is not None and seen >= cfg.eval.num_images:
            break
    lines = [f"{seen} validation images of data `{cfg.data.name}` at {cfg.data.image_size}², "
             f"token grid {factor}x (the tokenizer: d = {d} bits per token)", "",
             "| predictor | bits per token | PSNR | SSIM |", "|---|---|---|---|"]
    for name, (n_bits, _) in predictors.items():
        values, _ = scores[name].compute()
        lines.append(f"| {name} | {n_bits} | {values['psnr']:.2f} | {values['ssim']:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 8, 16, 24],
                        help="bit budgets per token (the config's d = g d' is always added)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m wetok.train")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    print(table(args.overrides, args.bits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
