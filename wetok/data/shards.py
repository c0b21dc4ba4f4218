"""webdataset tar shards: the reader (train: resampled and shuffled, endless; val: in order,
split by rank and worker) and write_shards, the writer (tests; converting a folder)."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from wetok.data.stream import (Pending, current_worker, open_image, train_transform,
                               val_transform, worker_generator)
from wetok.data.validate import fail

WDS_IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")


def _local_shards_exist(urls) -> None:
    import webdataset as wds

    key = "urls"
    for url in wds.shardlists.expand_urls(urls) if isinstance(urls, str) else urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).exists():
            fail(key, "existing tar shards", url)


class _WorkerSeed:
    """webdataset worker_seed: distinct and reproducible per (rank, worker)."""

    def __init__(self, rank):
        self.rank = rank

    def __call__(self):
        return self.rank * 1000 + current_worker()[0]


class _ByRank:
    """Node splitter with an explicit rank: every world_size-th shard from `rank`."""

    def __init__(self, rank, world_size):
        self.rank, self.world_size = rank, world_size

    def __call__(self, src):
        yield from (x for i, x in enumerate(src) if i % self.world_size == self.rank)


class _Shuffle:
    """Seeded shuffle buffer; a new order per (seed, rank, worker, pass)."""

    def __init__(self, bufsize, seed, rank):
        self.bufsize, self.seed, self.rank, self.passes = bufsize, seed, rank, 0

    def __call__(self, src):
        gen, _, _ = worker_generator(self.seed, self.rank, self.passes)
        self.passes += 1
        rng, buf = random.Random(int(torch.randint(2**62, (1,), generator=gen))), []
        for sample in src:
            buf.append(sample)
            if len(buf) >= self.bufsize:
                k = rng.randrange(len(buf))
                buf[k], buf[-1] = buf[-1], buf[k]
                yield buf.pop()
        rng.shuffle(buf)
        yield from buf


class _DecodeStage:
    """Tar samples -> (image, skipped keys); bad or image-less samples are counted."""

    def __init__(self, pending, size, seed, rank, train, hflip):
        self.pending, self.size, self.seed, self.rank = pending, size, seed, rank
        self.train, self.hflip, self.passes = train, hflip, 0

    def __call__(self, src):
        gen, _, _ = worker_generator(self.seed + 1, self.rank, self.passes)
        self.passes += 1
        for sample in src:
            key = f"{sample.get('__url__')}:{sample.get('__key__')}"
            data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            try:
                if data is None:
                    raise KeyError("no jpg/png/jpeg/webp member")
                img = open_image(data)
            except Exception as exn:
                self.pending.add(f"{key} ({type(exn).__name__})")
                continue
            img = (train_transform(img, self.size, gen, self.hflip) if self.train
                   else val_transform(img, self.size))
            yield img, self.pending.take()
        if self.pending.keys:
            yield None, self.pending.take()


def dataset(cfg: dict, train: bool, seed: int, start_batch: int, rank: int, world_size: int):
    """The webdataset pipeline: train resampled shards, seeded per (seed, rank, worker), through
    a seeded shuffle buffer; val the shards in order, split by rank then worker."""
    import webdataset as wds

    if start_batch:  # tar streams cannot jump ahead: a fresh seeded stream instead
        seed = int(np.random.SeedSequence([seed, start_batch]).generate_state(1)[0])
    urls = cfg["urls"] if train else cfg["val_urls"]
    _local_shards_exist(urls)
    pending = Pending()
    if train:  # endless, each (rank, worker) its own reproducible shard sequence
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True,
                                      worker_seed=_WorkerSeed(rank))]
    else:
        stages = [wds.SimpleShardList(urls), _ByRank(rank, world_size), wds.split_by_worker]
    stages.append(wds.tarfile_to_samples(handler=pending))
    if train and cfg["shuffle_buffer"]:
        stages.append(_Shuffle(cfg["shuffle_buffer"], seed, rank))
    stages.append(_DecodeStage(pending, cfg["image_size"], seed, rank, train, cfg["hflip"]))
    return wds.DataPipeline(*stages)


def write_shards(items, pattern: str, per_shard: int = 1000) -> list[str]:
    """Write webdataset tar shards; returns the shard paths.

    pattern: printf-style, e.g. "out/train-%06d.tar". Each item may be a file path (its bytes
    are stored as-is under its suffix: no re-encoding), encoded image bytes (stored as .jpg),
    a PIL image or uint8 array (H, W[, 3]) (encoded as .png), or a ready sample dict.
    """
    import webdataset as wds

    paths = []
    Path(pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0,
                         post=lambda fname: paths.append(fname)) as sink:
        for i, item in enumerate(items):
            sample = {"__key__": f"{i:09d}"}
            if isinstance(item, dict):
                sample.update(item)
            elif isinstance(item, (str, Path)):
                sample[Path(item).suffix.lower().lstrip(".")] = Path(item).read_bytes()
            elif isinstance(item, bytes):
                sample["jpg"] = item
            else:
                img = item if isinstance(item, Image.Image) else Image.fromarray(np.asarray(item))
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                sample["png"] = buf.getvalue()
            sink.write(sample)
    return paths
