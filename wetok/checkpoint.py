"""Atomic checkpoint and text writes (temp file + rename), and finding a run's last checkpoint."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from wetok.config import upgrade_saved


def _atomic(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def save(state: dict, path: Path) -> None:
    """torch.save to a temp file in the same folder, then rename: a crash never leaves half a file."""
    _atomic(path, lambda f: torch.save(state, f))


def load(path: Path, map_location="cpu", mmap: bool = False) -> dict:
    """Checkpoints hold tensors and plain containers only: weights_only=True. A config saved by
    an older version comes back under the current names (wetok.config.upgrade_saved).
    ``mmap``: tensors are read from the file when used (a caller that needs a few of them)."""
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if isinstance(state, dict) and isinstance(state.get("config"), dict):
        state["config"] = upgrade_saved(state["config"])
    return state


def last_checkpoint(run_dir: Path) -> Path | None:
    path = Path(run_dir) / "checkpoints" / "last.pt"
    return path if path.is_file() else None
