"""What every data source shares: counting skipped items (DataStats, Pending), the seeded
random streams (a generator per sample, per (rank, worker)), the indexed training stream whose
global sample n is a function of (seed, n), decoding and the train/val transforms.
"""
from __future__ import annotations

import io
import itertools
import logging
import threading

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

log = logging.getLogger(__name__)

MAX_BAD_IN_A_ROW = 1000


# ---------------------------------------------------------------- counting skipped items

class DataStats:
    """Skipped (unreadable) items seen by the main process, summed over workers.

    skipped: every skip (an endless train stream meets the same bad file again each pass);
    distinct: different keys; examples: the first distinct keys (also logged).
    """

    def __init__(self, keep: int = 20):
        self.skipped = 0
        self.examples: list[str] = []
        self._seen: set[str] = set()
        self._keep = keep
        self._lock = threading.Lock()

    @property
    def distinct(self) -> int:
        return len(self._seen)

    def record(self, keys) -> None:
        with self._lock:
            for key in keys:
                self.skipped += 1
                if key not in self._seen:
                    self._seen.add(key)
                    if len(self.examples) < self._keep:
                        self.examples.append(key)
                        log.warning("skipped unreadable image %s", key)

    def as_dict(self) -> dict:
        return {"bad_images": self.skipped, "bad_images_distinct": self.distinct}

    def __repr__(self) -> str:
        return (f"DataStats(skipped={self.skipped}, distinct={self.distinct}, "
                f"examples={self.examples[:3]})")


class Pending:
    """Keys skipped inside one worker since its last returned sample."""

    def __init__(self):
        self.keys: list[str] = []
        self.in_a_row = 0

    def add(self, key: str) -> None:
        self.keys.append(key)
        self.in_a_row += 1
        if self.in_a_row >= MAX_BAD_IN_A_ROW:
            raise RuntimeError(f"{self.in_a_row} unreadable images in a row (last: {key}); "
                               "check the data path")

    def take(self) -> list[str]:
        keys, self.keys, self.in_a_row = self.keys, [], 0
        return keys

    def __call__(self, exn: Exception) -> bool:  # a webdataset handler: count and go on
        self.add(f"{type(exn).__name__}: {str(exn)[:200]}")
        return True


def collate(samples):
    """(image or None, skipped keys) pairs -> (batch or None, all skipped keys)."""
    images = [img for img, _ in samples if img is not None]
    skipped = [key for _, keys in samples for key in keys]
    return (torch.stack(images) if images else None), skipped


# ---------------------------------------------------------------- image helpers

def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float (3, H, W) in [-1, 1]."""
    return TF.pil_to_tensor(img.convert("RGB")).float() / 127.5 - 1.0


def open_image(source) -> Image.Image:
    """Fully decode a file path or bytes; raises on corrupt or truncated data."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.convert("RGB")  # convert() forces the whole decode


def current_worker() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def seeded_generator(*ints: int) -> torch.Generator:
    """A torch generator seeded from non-negative ints (a tag first keeps uses apart)."""
    state = np.random.SeedSequence(list(ints)).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def worker_generator(seed: int, rank: int, epoch: int = 0) -> tuple[torch.Generator, int, int]:
    """A generator for this (seed, rank, worker, epoch); returns (gen, worker, num_workers)."""
    worker, workers = current_worker()
    return seeded_generator(0, seed, rank, worker, epoch), worker, workers


def randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(high + 1, (1,), generator=gen))


class IndexedTrain(IterableDataset):
    """Endless training stream whose global sample n is a function of (seed, n).

    Batch b of rank r (world size R, batch size B) holds global samples (b R + r) B ...
    (b R + r + 1) B - 1: slice r of global batch b, so any R x B with the same R B sees the
    same samples per step. Worker w makes batches start_batch + w, + w + W, ... (the order in
    which the DataLoader collects them), so the batches do not depend on num_workers and a
    resumed run continues exactly where it stopped, at no cost (start_batch).
    """

    def __init__(self, batch_size, start_batch, seed, rank, world_size):
        self.batch_size, self.start_batch, self.seed = batch_size, start_batch, seed
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        worker, workers = current_worker()
        pending, size = Pending(), self.batch_size
        for b in itertools.count(self.start_batch + worker, workers):
            first = (b * self.world_size + self.rank) * size
            for n in range(first, first + size):
                img = self.sample(n, seeded_generator(1, self.seed, n), pending)
                yield img, pending.take()

    def sample(self, n, gen, pending) -> torch.Tensor:
        raise NotImplementedError


def train_transform(img: Image.Image, size: int, gen: torch.Generator, hflip: bool):
    """Resize the short side up to `size` if smaller, random crop, optional flip."""
    if min(img.size) < size:
        img = TF.resize(img, size)
    w, h = img.size
    top, left = randint(gen, h - size), randint(gen, w - size)
    img = TF.crop(img, top, left, size, size)
    if hflip and randint(gen, 1):
        img = TF.hflip(img)
    return to_tensor(img)


def val_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Paper protocol: resize the short side to `size`, center crop size x size."""
    return to_tensor(TF.center_crop(TF.resize(img, size), size))
