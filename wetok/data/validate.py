"""Checks of a data config (one-line ValueError naming the key) and the values of the keys it
leaves out.

Defaults: bundled takes conf/data/bundled.yaml, the one place its values are written.
imagefolder and webdataset have optional keys that no data preset states (conf/data/
imagenet.yaml, general.yaml and wallpapers.yaml leave them out, and so do the configs saved in
existing runs and checkpoints), so their values are stated here, once (UNSTATED_DEFAULTS).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import OmegaConf

from wetok.checks import is_int_at_least
from wetok.data.bundled import BUNDLED_PHOTOS

KINDS = ("bundled", "imagefolder", "webdataset")
BUNDLED_YAML = Path(__file__).resolve().parents[2] / "conf" / "data" / "bundled.yaml"

_COMMON_KEYS = {"name", "image_size", "hflip"}
_KEYS = {
    "bundled": _COMMON_KEYS | {"val_photos", "crop_scale", "val_crops_per_photo"},
    "imagefolder": _COMMON_KEYS | {"root", "train_dir", "val_dir", "cache_mb"},
    "webdataset": _COMMON_KEYS | {"urls", "val_urls", "epoch_size", "shuffle_buffer"},
}
UNSTATED_DEFAULTS = {
    "imagefolder": dict(train_dir="train", val_dir="val", hflip=False, cache_mb=0),
    "webdataset": dict(val_urls=None, epoch_size=None, shuffle_buffer=1000, hflip=False),
}


def defaults(name: str) -> dict:
    """The values that a data config of kind `name` takes for the optional keys it omits."""
    if name == "bundled":
        preset = OmegaConf.to_container(OmegaConf.load(BUNDLED_YAML))
        return {k: v for k, v in preset.items() if k not in ("name", "image_size")}
    return dict(UNSTATED_DEFAULTS[name])


def fail(key: str, expected: str, got) -> None:
    raise ValueError(f"config error: data.{key}: expected {expected}, got {got!r}")


def validate_data_cfg(data_cfg: Mapping, split: str | None = None) -> dict:
    """Check data_cfg (one-line ValueError naming the key); return it with defaults filled."""
    cfg = {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
           for k, v in dict(data_cfg).items()}  # OmegaConf lists -> plain lists
    name = cfg.get("name")
    if name not in KINDS:
        fail("name", "one of " + "|".join(KINDS), name)
    unknown = sorted(set(cfg) - _KEYS[name])
    if unknown:
        fail(unknown[0], f"no such key for {name} (known: {', '.join(sorted(_KEYS[name]))})",
             cfg[unknown[0]])
    cfg = {**defaults(name), **cfg}
    size = cfg.get("image_size")
    if not is_int_at_least(size, 1):
        fail("image_size", "a positive integer", size)
    if name == "bundled":
        for photo in cfg["val_photos"] or []:
            if photo not in BUNDLED_PHOTOS:
                fail("val_photos", "names from " + "|".join(BUNDLED_PHOTOS), photo)
        if len(set(cfg["val_photos"] or [])) >= len(BUNDLED_PHOTOS):
            fail("val_photos", "at least one photo left for training", cfg["val_photos"])
        if not (isinstance(cfg["crop_scale"], (int, float)) and cfg["crop_scale"] >= 1):
            fail("crop_scale", "a number >= 1", cfg["crop_scale"])
        n = cfg["val_crops_per_photo"]
        if not is_int_at_least(n, 1):
            fail("val_crops_per_photo", "a positive integer", n)
    elif name == "imagefolder":
        root = cfg.get("root")
        if not root:
            fail("root", "the dataset folder (root/train/<class>/*.JPEG, root/val/...)", root)
        for sp in ("train", "val") if split is None else (split,):
            folder = Path(root) / cfg[f"{sp}_dir"]
            if not folder.is_dir():
                fail("root" if sp == "train" else "val_dir",
                     f"a folder with {sp} images at {folder}", str(root))
        mb = cfg["cache_mb"]
        if not is_int_at_least(mb, 0):
            fail("cache_mb", "MiB of decoded training images kept per loader worker (>= 0)", mb)
    else:
        for key in ("urls", "val_urls") if split == "val" else ("urls",):
            if not cfg.get(key):
                fail(key, "tar shards as a brace pattern or a list", cfg.get(key))
        for key in ("epoch_size", "shuffle_buffer"):
            value = cfg[key]
            if value is not None and not (isinstance(value, int) and value >= 0):
                fail(key, "a non-negative integer or null", value)
    return cfg
