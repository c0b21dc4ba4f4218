"""Image folders (ImageNet's <split>/<class>/*.JPEG layout, any depth): train passes over
seeded permutations of the files with random crops; val one pass in file order, centre crops."""
from __future__ import annotations

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


class _FolderTrain(IndexedTrain):
    """Pass e is a seeded permutation of the files; global sample n is file n mod N of pass
    n // N (N files), whatever the world size.

    An unreadable file is counted and replaced by a random other file (seeded too).
    """

    def __init__(self, files, size, hflip, **kw):
        super().__init__(**kw)
        self.files, self.size, self.hflip = files, size, hflip
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
                img = open_image(self.files[index])
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
        return _FolderTrain(files, cfg["image_size"], cfg["hflip"], **indexed)
    return _FolderVal(files[indexed["rank"]::world_size], cfg["image_size"])
