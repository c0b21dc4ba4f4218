"""Pretrained-weight lookup (LPIPS VGG16 trunk, rFID InceptionV3): one place, never a download.

A file is looked up at the configured path (config key ``weights.<name>``: the file itself or
the folder holding it) or else in ``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/
checkpoints``), where torchvision and torch-fidelity would have downloaded it. Existence is
checked first; a missing file raises :class:`MissingWeightsError` with a one-line message that
names the file, the folder to put it in and the config key to point at it instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

VGG16_FILE = "vgg16-397923af.pth"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class WeightSpec:
    name: str      # config key under `weights.`
    file: str      # file name as torchvision / torch-fidelity download it
    purpose: str   # what needs it (for the message)


WEIGHTS: dict[str, WeightSpec] = {
    "vgg16": WeightSpec("vgg16", VGG16_FILE, "LPIPS VGG16 trunk (torchvision ImageNet weights)"),
    "inception": WeightSpec("inception", INCEPTION_FILE, "rFID InceptionV3 (torch-fidelity)"),
}


class MissingWeightsError(FileNotFoundError):
    """A pretrained weights file is not on disk (offline: it is never downloaded)."""

    def __init__(self, message: str, *, name: str, file: str, folder: Path, config_key: str):
        super().__init__(message)
        self.name, self.file, self.folder, self.config_key = name, file, folder, config_key

    def __str__(self) -> str:
        return self.args[0]


def checkpoints_dir() -> Path:
    """``torch.hub.get_dir()/checkpoints`` (``$TORCH_HOME/hub/checkpoints``), read at call time."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_weights(name: str, path: str | os.PathLike | None = None) -> Path:
    """Path of the weights file ``name`` ("vgg16" | "inception"); raises MissingWeightsError.

    ``path``: the configured location (a file, or a folder holding the file); None: the torch
    hub checkpoints folder.
    """
    if name not in WEIGHTS:
        raise KeyError(f"unknown weights {name!r}; known: {', '.join(WEIGHTS)}")
    spec = WEIGHTS[name]
    folder = checkpoints_dir()
    key = f"weights.{spec.name}"
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        candidate = p / spec.file if p.is_dir() else p
        if candidate.is_file():
            return candidate
        msg = (f"missing pretrained weights {spec.file} ({spec.purpose}): {key}={p} "
               f"does not exist; "
               f"put {spec.file} there, or in {folder} and unset {key}")
        raise MissingWeightsError(msg, name=name, file=spec.file, folder=folder, config_key=key)
    candidate = folder / spec.file
    if candidate.is_file():
        return candidate
    msg = (f"missing pretrained weights {spec.file} ({spec.purpose}): put it in {folder} "
           f"or set {key}=/path/to/{spec.file}")
    raise MissingWeightsError(msg, name=name, file=spec.file, folder=folder, config_key=key)


def configured_path(weights_cfg: Mapping[str, Any] | None, name: str) -> str | None:
    """``weights_cfg[name]`` from a plain dict / DictConfig (None when absent or null)."""
    if weights_cfg is None:
        return None
    value = weights_cfg.get(name, None)
    return None if value is None else str(value)


def resolve(name: str, weights_cfg: Mapping[str, Any] | None = None) -> Path:
    """find_weights with the path taken from the ``weights`` config group."""
    return find_weights(name, configured_path(weights_cfg, name))
