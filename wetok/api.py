"""Inference API: images <-> token indices.

    tok = Tokenizer.from_checkpoint("runs/x/checkpoints/last.pt")   # EMA weights by default
    idx = tok.encode(images)          # (B, 3, H, W) float in [-1, 1] or uint8 -> (B, g, h, w) long
    rec = tok.decode(idx, generator=torch.Generator().manual_seed(0))   # (B, 3, H, W) in [-1, 1]
    tok.save("my_tokenizer/")         # model.safetensors + config.json
    tok = Tokenizer.load("my_tokenizer/", device="cuda")
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from wetok import checkpoint
from wetok.config import upgrade_saved
from wetok.model import WeTok, build_model

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_PREFIXES = ("module.", "_orig_mod.")


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP (``module.``) / torch.compile (``_orig_mod.``) prefixes."""
    out = {}
    for k, v in state_dict.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _is_stage2(stage: Any) -> bool:
    return str(stage).strip().lower() in ("2", "stage2", "stage_2")


class Tokenizer:
    """Wraps a WeTok for inference (eval mode, no grad). Images are (B, 3, H, W) floats in
    [-1, 1] (uint8 in [0, 255] is accepted and converted); H and W must be multiples of the
    downsampling factor."""

    def __init__(self, model: WeTok, config: Mapping | None = None):
        config = config if config is not None else getattr(model, "config", None)
        if config is None:
            raise ValueError("Tokenizer needs the config that built the model (use build_model)")
        self.model = model.eval()
        self.config = {"model": dict(config["model"]), "quantizer": dict(config["quantizer"]),
                       "generative": model.generative}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def generative(self) -> bool:
        return self.model.generative

    def to(self, device) -> "Tokenizer":
        self.model.to(device)
        return self

    # ------------------------------------------------------------------ encode / decode
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)
            raise ValueError(f"images must be a (B, 3, H, W) tensor, got {shape}")
        dtype = next(self.model.parameters()).dtype
        if images.dtype == torch.uint8:
            images = images.to(self.device, dtype) / 127.5 - 1.0
        else:
            images = images.to(self.device, dtype)
        return images

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, g, h, w) long indices."""
        return self.model.encode(self._prepare(images)).indices

    @torch.inference_mode()
    def decode(self, indices: torch.Tensor, generator: torch.Generator | None = None,
               noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, g, h, w) indices -> (B, 3, H, W) float images clamped to [-1, 1]. A generative
        decoder draws its noise from ``generator`` (reproducible) or torch.randn."""
        z_q = self.model.quantizer.indices_to_codes(indices.to(self.device).long())
        z_q = z_q.to(next(self.model.parameters()).dtype)
        return self.model.decode(z_q, noise=noise, generator=generator).clamp(-1.0, 1.0)

    @torch.inference_mode()
    def reconstruct(self, images: torch.Tensor,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        return self.decode(self.encode(images), generator=generator)

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] floats -> uint8 (rounded)."""
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    # ------------------------------------------------------------------ persistence
    def save(self, path_dir: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path_dir)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
        save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
        (path / CONFIG_NAME).write_text(json.dumps(self.config, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path_dir: str | os.PathLike, device: str | torch.device = "cpu") -> "Tokenizer":
        from safetensors.torch import load_file

        path = Path(path_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {path}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (path / name).is_file():
                raise FileNotFoundError(f"missing {name} in {path} (expected the files written "
                                        f"by Tokenizer.save)")
        config = upgrade_saved(json.loads((path / CONFIG_NAME).read_text()))
        model = build_model(config["model"], config["quantizer"],
                            generative=bool(config["generative"]))
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME), device="cpu"))
        return cls(model.to(device), config)

    @classmethod
    def from_checkpoint(cls, ckpt_path: str | os.PathLike, ema: bool = True,
                        device: str | torch.device = "cpu") -> "Tokenizer":
        """Read a training checkpoint {"model", "ema", "config": {"model", "quantizer",
        "stage"}} (:func:`wetok.checkpoint.load`). ``ema``: use the EMA weights."""
        path = Path(ckpt_path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        ckpt = checkpoint.load(path)
        if not isinstance(ckpt, Mapping) or "config" not in ckpt:
            raise ValueError(f"{path} is not a WeTok training checkpoint (no 'config' entry)")
        key = "ema" if ema else "model"
        state = ckpt.get(key)
        if state is None:
            raise KeyError(f"{path} has no '{key}' weights" + (" (pass ema=False)" if ema else ""))
        cfg = ckpt["config"]
        for k in ("model", "quantizer"):
            if k not in cfg:
                raise KeyError(f"{path}: config has no '{k}' entry")
        generative = _is_stage2(cfg["stage"])
        model = build_model(cfg["model"], cfg["quantizer"], generative=generative)
        state = _strip_prefixes(state)
        state.pop("n_averaged", None)  # torch.optim.swa_utils.AveragedModel bookkeeping
        model.load_state_dict(state)
        return cls(model.to(device))
