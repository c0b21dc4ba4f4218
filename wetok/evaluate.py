"""Evaluation: rFID, LPIPS, SSIM, PSNR, codebook usage and validation loss, under EMA weights.

    python -m wetok.evaluate runs/quick/default              # a run folder (its last checkpoint)
    python -m wetok.evaluate path/to/last.pt --num-images 50000

Writes eval.json beside the checkpoint's run folder and prints the values. Metrics whose
pretrained weights are missing are listed as skipped, with the reason.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from wetok import checkpoint
from wetok.data import build_loader
from wetok.metrics import Evaluator
from wetok.model import build_model
from wetok.quantize import CodebookUsage


def reference_name(cfg: DictConfig, num_images: int | None) -> str:
    """Cache key of the real images' rFID statistics: data source, split, size, count."""
    source = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    return f"{cfg.data.name}-val-{cfg.data.image_size}px-{num_images or 'all'}-{digest}"


@torch.no_grad()
def evaluate_model(model, cfg: DictConfig, device: torch.device, loss=None,
                   num_images: int | None = None) -> tuple[dict, dict]:
    """One pass over the validation split; returns (values, skipped metrics with reasons).

    val_loss is the reconstruction loss (plus the perceptual term when the loss has LPIPS).
    The generative decoder's noise comes from a generator seeded with eval.noise_seed.
    """
    num_images = num_images if num_images is not None else cfg.eval.num_images
    loader, stats = build_loader(cfg.data, "val", cfg.eval.batch_size, seed=cfg.seed)
    evaluator = Evaluator(metrics=tuple(cfg.eval.metrics), device=device,
                          weights=cfg.weights, fid_cache_dir=cfg.eval.cache_dir,
                          fid_ref_name=reference_name(cfg, num_images))
    usage = CodebookUsage(cfg.quantizer.groups, cfg.quantizer.group_dim)
    noise = torch.Generator(device).manual_seed(cfg.eval.noise_seed)
    was_training = model.training
    model.eval()
    seen, loss_sum = 0, 0.0
    for x in loader:
        if num_images is not None and seen >= num_images:
            break
        if num_images is not None:
            x = x[: num_images - seen]
        x = x.to(device)
        qout = model.encode(x)
        x_rec = model.decode(qout.z_q, generator=noise).float().clamp(-1, 1)
        if loss is not None:
            loss_sum += float(loss.reconstruction(x, x_rec)) * len(x)
        evaluator.update(x, x_rec)
        usage.update(qout.indices)
        seen += len(x)
    model.train(was_training)
    values, skipped = evaluator.compute()
    values.update(usage.compute())
    if loss is not None and seen:
        values["val_loss"] = loss_sum / seen
    values["num_images"] = seen
    if stats.skipped:
        values["bad_images"] = stats.skipped
    return values, skipped


def _resolve_checkpoint(path: Path) -> Path:
    from wetok.convert import ConvertError, evaluation_checkpoint

    try:  # a `python -m wetok.convert` folder, or an official .ckpt (converted beside it)
        converted = evaluation_checkpoint(path)
    except ConvertError as exc:
        raise FileNotFoundError(f"{path}: not convertible: {exc}") from None
    if converted is not None:
        return converted
    if path.is_dir():
        found = checkpoint.last_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoints/last.pt in this run folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wetok-eval", description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="run folder or checkpoint file")
    parser.add_argument("--num-images", type=int, default=None,
                        help="validation images (default: the run's eval.num_images)")
    parser.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--noise-seed", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="where to write eval.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.root=/imagenet")
    args = parser.parse_args(argv)
    try:
        ckpt_path = _resolve_checkpoint(args.path)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    state = checkpoint.load(ckpt_path)
    cfg = OmegaConf.merge(OmegaConf.create(state["config"]),
                          OmegaConf.from_dotlist(args.overrides))
    if args.noise_seed is not None:
        cfg.eval.noise_seed = args.noise_seed
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    model = build_model(cfg.model, cfg.quantizer, generative=cfg.stage == 2)
    model.load_state_dict(state["model" if args.raw else "ema"])
    from wetok.losses import WeTokLoss

    loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights, perceptual=False)
    values, skipped = evaluate_model(model.to(device), cfg, device, loss.to(device),
                                     num_images=args.num_images)
    record = {"checkpoint": str(ckpt_path), "step": state["step"],
              "weights": "raw" if args.raw else "ema", "values": values, "skipped": skipped}
    out = args.out or ckpt_path.parent.parent / "eval.json"
    checkpoint.atomic_write_text(out, json.dumps(record, indent=2))
    for key, value in values.items():
        print(f"{key:>20s}  {value:.6g}" if isinstance(value, float) else f"{key:>20s}  {value}")
    for key, reason in skipped.items():
        print(f"{key:>20s}  skipped: {reason}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
