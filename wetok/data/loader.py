"""build_loader: a data config -> (Loader, DataStats); the Loader yields image batches and
counts what the workers skipped (see wetok.data for what each kind yields)."""
from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import DataLoader

from wetok.data import bundled, imagefolder, shards
from wetok.data.stream import DataStats, collate
from wetok.data.validate import validate_data_cfg


class Loader:
    """Wraps a DataLoader of (images, skipped) batches: records skips, yields images."""

    def __init__(self, dataloader, stats: DataStats, endless: bool, length: int | None = None):
        self.dataloader, self.stats, self.endless, self.length = (dataloader, stats, endless,
                                                                  length)

    def __iter__(self):
        while True:
            produced = False
            for images, skipped in self.dataloader:
                if skipped:
                    self.stats.record(skipped)
                if images is not None:
                    produced = True
                    yield images
            if not self.endless:
                return
            if not produced:
                raise RuntimeError("the training data produced no images for this rank "
                                   "(all unreadable, or more ranks x workers than files)")

    def __len__(self):
        if self.length is None:
            raise TypeError("this loader has no length (an endless training stream)")
        return self.length


def build_loader(data_cfg: Mapping, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0,
                 pin_memory: bool = False):
    """-> (loader, DataStats). See wetok.data's docstring for what each kind yields.

    start_batch (train): continue the stream after this many batches of this rank (resume).
    """
    if split not in ("train", "val"):
        raise ValueError(f"split: expected train|val, got {split!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    cfg = validate_data_cfg(data_cfg, split)
    for arg, value in (("seed", seed), ("start_batch", start_batch)):
        if not (isinstance(value, int) and value >= 0):
            raise ValueError(f"{arg}: expected a non-negative integer, got {value!r}")
    train, name = split == "train", cfg["name"]
    if name == "webdataset":
        dataset = shards.dataset(cfg, train, seed, start_batch, rank, world_size)
    else:
        source = bundled if name == "bundled" else imagefolder
        dataset = source.dataset(cfg, train, batch_size=batch_size, start_batch=start_batch,
                                 seed=seed, rank=rank, world_size=world_size)
    length = None
    stats, kw = DataStats(), dict(batch_size=batch_size, num_workers=num_workers,
                                  collate_fn=collate, persistent_workers=num_workers > 0,
                                  pin_memory=pin_memory)
    if name == "webdataset" and train and cfg["epoch_size"]:
        import webdataset as wds

        # DDP-friendly nominal epoch: the same number of batches on every rank; persistent
        # workers carry on with their stream across epochs instead of restarting it.
        length = max(1, cfg["epoch_size"] // batch_size)
        dataloader = wds.WebLoader(dataset, **kw).with_epoch(length)
    else:
        dataloader = DataLoader(dataset, **kw)
    return Loader(dataloader, stats, endless=train, length=length), stats
