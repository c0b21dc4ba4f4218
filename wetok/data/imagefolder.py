"""Image folders (ImageNet's <split>/<class>/*.JPEG layout, any depth): train passes over
seeded permutations of the files with random crops; val one pass in file order, centre crops.

A small folder (the wallpapers: 9 photos) is decoded again for every crop unless
``data.cache_mb`` keeps decoded photos in each loader worker: decoding a 512 x 819 JPEG takes
about 2.6 ms, the crop 0.24 ms, so at 800 img/s decoding alone needs two CPU cores per run.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from wetok.data.stream import (IndexedTrain, Pending, current_worker, open_image, randint,
                               seeded_generator, train_transform, val_transform)
from wetok.data.validate import fail

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def list_images(folder: Path) -> list[str]:
    """The image files under folder, any depth, sorted."""
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file())


def _pixel_bytes(img) -> int:
    return img.width * img.height * 3  # RGB, 8 bits per channel


class DecodedCache:
    """Least-recently-used decoded RGB images by path, at most `mb` MiB of pixels (0: off)."""

    def __init__(self, mb: int):
        self.budget, self.used, self.images = mb * 2**20, 0, OrderedDict()

    def __call__(self, path: str):
        if path in self.images:
            self.images.move_to_end(path)
            return self.images[path]
        img = open_image(path)
        size = _pixel_bytes(img)
        if size <= self.budget:
            while self.used + size > self.budget:
                self.used -= _pixel_bytes(self.images.popitem(last=False)[1])
            self.images[path], self.used = img, self.used + size
        return img


class _FolderTrain(IndexedTrain):
    """Pass e is a seeded permutation of the files; global sample n is file n mod N of pass
    n // N (N files), whatever the world size.

    An unreadable file is counted and replaced by a random other file (seeded too).
    """

    def __init__(self, files, size, hflip, cache_mb, **kw):
        super().__init__(**kw)
        self.files, self.size, self.hflip = files, size, hflip
        self.decoded = DecodedCache(cache_mb)
        self._order = (-1, None)

    def order(self, epoch):
        if self._order[0] != epoch:
            gen = seeded_generator(2, self.seed, epoch)
            self._order = (epoch, torch.randperm(len(self.files), generator=gen).tolist())
        return self._order[1]

    def sample(self, n, gen, pending):
        epoch, i = divmod(n, len(self.files))
        index = self.order(epoch)[i]
        while True:  # pending.add raises after MAX_BAD_IN_A_ROW failures
            try:
                img = self.decoded(self.files[index])
                return train_transform(img, self.size, gen, self.hflip)
            except Exception as exn:  # corrupt, truncated, unreadable: skip and count
                pending.add(f"{self.files[index]} ({type(exn).__name__})")
                index = randint(gen, len(self.files) - 1)


class _FolderVal(IterableDataset):
    """One pass in file order: this rank's share, split over workers; bad files dropped."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __iter__(self):
        worker, workers = current_worker()
        pending = Pending()
        for path in self.files[worker::workers]:
            try:
                img = val_transform(open_image(path), self.size)
            except Exception as exn:  # corrupt, truncated, unreadable: skip and count
                pending.add(f"{path} ({type(exn).__name__})")
                continue
            yield img, pending.take()
        if pending.keys:
            yield None, pending.take()


def dataset(cfg: dict, train: bool, **indexed) -> IterableDataset:
    """root/train_dir or root/val_dir: the indexed training stream (indexed: IndexedTrain's
    batch_size, start_batch, seed, rank, world_size), or this rank's share of the files in
    order."""
    folder = Path(cfg["root"]) / cfg["train_dir" if train else "val_dir"]
    files = list_images(folder)
    world_size = indexed["world_size"]
    if len(files) < (world_size if train else 1):
        fail("root", f"at least {world_size} image files ({'|'.join(IMAGE_EXTS)}) "
             f"under {folder}", f"{len(files)} files")
    if train:
        return _FolderTrain(files, cfg["image_size"], cfg["hflip"], cfg["cache_mb"], **indexed)
    return _FolderVal(files[indexed["rank"]::world_size], cfg["image_size"])
