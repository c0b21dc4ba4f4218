"""The bundled photos: real photographs shipped in scikit-image and scikit-learn (no download),
split by photo; train: random crops of the resized photos, val: fixed grid crops."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import IterableDataset

from wetok.data.stream import (IndexedTrain, current_worker, open_image, randint, to_tensor,
                               train_transform)

# All ship inside the packages (checked offline, without pooch); grey ones become 3 channels.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                   "immunohistochemistry", "stereo_motorcycle", "camera", "moon", "page",
                   "coins", "text", "clock", "grass", "gravel", "brick", "cell")
_SKLEARN_PHOTOS = ("china", "flower")
BUNDLED_PHOTOS = _SKIMAGE_PHOTOS + _SKLEARN_PHOTOS


@lru_cache(maxsize=1)
def _bundled_arrays() -> dict[str, list[np.ndarray]]:
    import importlib.util

    import skimage.data

    photos = {}
    for name in _SKIMAGE_PHOTOS:
        out = getattr(skimage.data, name)()
        photos[name] = list(out[:2]) if name == "stereo_motorcycle" else [out]
    # scikit-learn's two sample photos, read from the package folder (importing sklearn is slow)
    folder = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "images"
    for name in _SKLEARN_PHOTOS:
        if (folder / f"{name}.jpg").exists():
            photos[name] = [np.asarray(open_image(str(folder / f"{name}.jpg")))]
        else:  # another layout: the public loader
            from sklearn.datasets import load_sample_image
            photos[name] = [load_sample_image(f"{name}.jpg")]
    return photos


def bundled_photo_names(val_photos, split: str) -> list[str]:
    """The bundled photo names of one split (train: all but val_photos)."""
    held_out = set(val_photos or [])
    return [n for n in BUNDLED_PHOTOS if (n in held_out) == (split == "val")]


def _bundled_images(names, short_side: int) -> list[Image.Image]:
    images = []
    for name in names:
        for array in _bundled_arrays()[name]:
            img = Image.fromarray(array).convert("RGB")
            images.append(TF.resize(img, short_side))
    return images


def _grid_crops(img: Image.Image, size: int, n: int) -> list[Image.Image]:
    """n fixed crops: a rows x cols grid spanning the image, taken row-major."""
    rows = max(1, int(n ** 0.5))
    cols = -(-n // rows)
    w, h = img.size
    tops = np.linspace(0, h - size, rows).round().astype(int)
    lefts = np.linspace(0, w - size, cols).round().astype(int)
    boxes = [(t, l) for t in tops for l in lefts][:n]
    return [TF.crop(img, int(t), int(l), size, size) for t, l in boxes]


class _BundledTrain(IndexedTrain):
    def __init__(self, images, size, hflip, **kw):
        super().__init__(**kw)
        self.images, self.size, self.hflip = images, size, hflip

    def sample(self, n, gen, pending):
        img = self.images[randint(gen, len(self.images) - 1)]
        return train_transform(img, self.size, gen, self.hflip)


class _ListStream(IterableDataset):
    """A fixed list of ready tensors, this rank's share, split over workers."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __iter__(self):
        worker, workers = current_worker()
        for t in self.tensors[worker::workers]:
            yield t, []


def dataset(cfg: dict, train: bool, **indexed) -> IterableDataset:
    """The bundled photos of one split, short side resized to crop_scale * image_size: the
    indexed training stream (indexed: IndexedTrain's batch_size, start_batch, seed, rank,
    world_size), or this rank's share of the fixed validation crops."""
    size = cfg["image_size"]
    names = bundled_photo_names(cfg["val_photos"], "train" if train else "val")
    images = _bundled_images(names, round(cfg["crop_scale"] * size))
    if train:
        return _BundledTrain(images, size, cfg["hflip"], **indexed)
    crops = [to_tensor(c) for img in images
             for c in _grid_crops(img, size, cfg["val_crops_per_photo"])]
    return _ListStream(crops[indexed["rank"]::indexed["world_size"]])
