"""Image data for the tokenizer: float tensors in [-1, 1], shape (3, H, W).

    loader, stats = build_loader(data_cfg, "train" | "val", batch_size, seed=0,
                                 rank=0, world_size=1, num_workers=0)

`loader` yields image batches (B, 3, S, S), S = data_cfg.image_size.
- train: an endless stream (iterate with next(); no epochs to manage). bundled and
  imagefolder: sample n of the GLOBAL stream is a function of (seed, n), and rank r of
  world_size W takes slice r of each global batch of W * batch_size samples, so the union of
  the ranks' batches is the one-process batch of W * batch_size (2 ranks x 8 = 1 x 16 =
  1 x 8 with 2 accumulation steps), the batches do not depend on num_workers, and
  `start_batch=k` (resume) continues exactly at batch k for free.
  webdataset: each (rank, worker) reads its own seeded stream of resampled shards (the
  batches depend on num_workers and on the world size); tar streams cannot jump ahead, so
  `start_batch=k` starts a fresh stream seeded with (seed, k) instead of replaying.
- val: one deterministic pass; rank r gets every world_size-th item (webdataset: shard),
  nothing padded; the last batch may be smaller. For metrics on the whole split, build it
  with world_size=1 (or gather across ranks).

Unreadable items (corrupt or truncated files, bad tar members, missing shards) are skipped
and counted, never fatal: workers attach the keys they skipped to the next sample they
return, and the main process adds them to `stats` (a DataStats: `stats.skipped` total,
`stats.distinct`, `stats.examples` the first distinct keys, also logged; `stats.as_dict()` ->
{"bad_images": skipped, "bad_images_distinct": distinct}). 1000 unreadable items in a row
raise (the data is broken).

data_cfg kinds (`name`), beside `image_size`:
- bundled: real photographs shipped in scikit-image and scikit-learn; nothing to download.
  Photos: astronaut, chelsea, coffee, rocket, hubble_deep_field, retina,
  immunohistochemistry, stereo_motorcycle (left and right views, one name), camera, moon,
  page, coins, text, clock, grass, gravel, brick, cell (grey ones copied to 3 channels),
  china, flower (scikit-learn). Split by photo: `val_photos` (default [chelsea, flower]) are
  held out. Every photo is resized so its short side is `crop_scale` * image_size
  (default 2.0). train: random crop + horizontal flip (`hflip`, default true). val:
  `val_crops_per_photo` (default 32) fixed crops on a grid, row-major.
- imagefolder: `root`/`train_dir` (default "train") and `root`/`val_dir` (default "val"),
  any depth (ImageNet: <class>/*.JPEG). train: passes over seeded permutations of the files
  (global sample n is file n of the permutation of pass n // files); short side resized up to image_size only
  if smaller, random crop (paper), `hflip` default false; an unreadable file is replaced by
  a random other one. val: short side resized to
  image_size, center crop (paper protocol). Bilinear, antialiased (PIL).
- webdataset: tar shards, `urls` (brace pattern or list) for train, `val_urls` for val.
  train: resampled shards, seeded deterministically per (seed, rank, worker); a seeded
  shuffle buffer (`shuffle_buffer`, default 1000); optional `epoch_size` (samples per rank)
  sets the DataLoader epoch with .with_epoch(). val: the shards in order, split by rank
  then worker, not resampled. Image member: jpg;png;jpeg;webp. Same crops as imagefolder.

`write_shards(items, pattern, per_shard)` writes tar shards (tests; converting a folder).
"""
from __future__ import annotations

import io
import itertools
import logging
import random
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

log = logging.getLogger(__name__)

KINDS = ("bundled", "imagefolder", "webdataset")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
WDS_IMAGE_KEYS = ("jpg", "png", "jpeg", "webp")
MAX_BAD_IN_A_ROW = 1000

# All ship inside the packages (checked offline, without pooch); grey ones become 3 channels.
_SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina",
                   "immunohistochemistry", "stereo_motorcycle", "camera", "moon", "page",
                   "coins", "text", "clock", "grass", "gravel", "brick", "cell")
_SKLEARN_PHOTOS = ("china", "flower")
BUNDLED_PHOTOS = _SKIMAGE_PHOTOS + _SKLEARN_PHOTOS

_COMMON_KEYS = {"name", "image_size", "hflip"}
_KEYS = {
    "bundled": _COMMON_KEYS | {"val_photos", "crop_scale", "val_crops_per_photo"},
    "imagefolder": _COMMON_KEYS | {"root", "train_dir", "val_dir"},
    "webdataset": _COMMON_KEYS | {"urls", "val_urls", "epoch_size", "shuffle_buffer"},
}
_DEFAULTS = {
    "bundled": dict(val_photos=["chelsea", "flower"], crop_scale=2.0, val_crops_per_photo=32,
                    hflip=True),
    "imagefolder": dict(train_dir="train", val_dir="val", hflip=False),
    "webdataset": dict(val_urls=None, epoch_size=None, shuffle_buffer=1000, hflip=False),
}


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


class _Pending:
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


def _collate(samples):
    """(image or None, skipped keys) pairs -> (batch or None, all skipped keys)."""
    images = [img for img, _ in samples if img is not None]
    skipped = [key for _, keys in samples for key in keys]
    return (torch.stack(images) if images else None), skipped


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


# ---------------------------------------------------------------- image helpers

def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL image -> float (3, H, W) in [-1, 1]."""
    return TF.pil_to_tensor(img.convert("RGB")).float() / 127.5 - 1.0


def _open(source) -> Image.Image:
    """Fully decode a file path or bytes; raises on corrupt or truncated data."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        return img.convert("RGB")  # convert() forces the whole decode


def _worker() -> tuple[int, int]:
    """(this DataLoader worker's id, number of workers); (0, 1) in the main process."""
    info = get_worker_info()
    return (info.id, info.num_workers) if info else (0, 1)


def _generator(*ints: int) -> torch.Generator:
    """A torch generator seeded from non-negative ints (a tag first keeps uses apart)."""
    state = np.random.SeedSequence(list(ints)).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _rng(seed: int, rank: int, epoch: int = 0) -> tuple[torch.Generator, int, int]:
    """A generator for this (seed, rank, worker, epoch); returns (gen, worker, num_workers)."""
    worker, workers = _worker()
    return _generator(0, seed, rank, worker, epoch), worker, workers


def _randint(gen: torch.Generator, high: int) -> int:
    """Uniform integer in [0, high]."""
    return int(torch.randint(high + 1, (1,), generator=gen))


class _IndexedTrain(IterableDataset):
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
        worker, workers = _worker()
        pending, size = _Pending(), self.batch_size
        for b in itertools.count(self.start_batch + worker, workers):
            first = (b * self.world_size + self.rank) * size
            for n in range(first, first + size):
                img = self.sample(n, _generator(1, self.seed, n), pending)
                yield img, pending.take()

    def sample(self, n, gen, pending) -> torch.Tensor:
        raise NotImplementedError


def train_transform(img: Image.Image, size: int, gen: torch.Generator, hflip: bool):
    """Resize the short side up to `size` if smaller, random crop, optional flip."""
    if min(img.size) < size:
        img = TF.resize(img, size)
    w, h = img.size
    top, left = _randint(gen, h - size), _randint(gen, w - size)
    img = TF.crop(img, top, left, size, size)
    if hflip and _randint(gen, 1):
        img = TF.hflip(img)
    return to_tensor(img)


def val_transform(img: Image.Image, size: int) -> torch.Tensor:
    """Paper protocol: resize the short side to `size`, center crop size x size."""
    return to_tensor(TF.center_crop(TF.resize(img, size), size))


# ---------------------------------------------------------------- config checks

def _fail(key: str, expected: str, got) -> None:
    raise ValueError(f"config error: data.{key}: expected {expected}, got {got!r}")


def validate_data_cfg(data_cfg: Mapping, split: str | None = None) -> dict:
    """Check data_cfg (one-line ValueError naming the key); return it with defaults filled."""
    cfg = {k: list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
           for k, v in dict(data_cfg).items()}  # OmegaConf lists -> plain lists
    name = cfg.get("name")
    if name not in KINDS:
        _fail("name", "one of " + "|".join(KINDS), name)
    unknown = sorted(set(cfg) - _KEYS[name])
    if unknown:
        _fail(unknown[0], f"no such key for {name} (known: {', '.join(sorted(_KEYS[name]))})",
              cfg[unknown[0]])
    cfg = {**_DEFAULTS[name], **cfg}
    size = cfg.get("image_size")
    if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
        _fail("image_size", "a positive integer", size)
    if name == "bundled":
        for photo in cfg["val_photos"] or []:
            if photo not in BUNDLED_PHOTOS:
                _fail("val_photos", "names from " + "|".join(BUNDLED_PHOTOS), photo)
        if len(set(cfg["val_photos"] or [])) >= len(BUNDLED_PHOTOS):
            _fail("val_photos", "at least one photo left for training", cfg["val_photos"])
        if not (isinstance(cfg["crop_scale"], (int, float)) and cfg["crop_scale"] >= 1):
            _fail("crop_scale", "a number >= 1", cfg["crop_scale"])
        n = cfg["val_crops_per_photo"]
        if not (isinstance(n, int) and not isinstance(n, bool) and n > 0):
            _fail("val_crops_per_photo", "a positive integer", n)
    elif name == "imagefolder":
        root = cfg.get("root")
        if not root:
            _fail("root", "the dataset folder (root/train/<class>/*.JPEG, root/val/...)", root)
        for sp in ("train", "val") if split is None else (split,):
            folder = Path(root) / cfg[f"{sp}_dir"]
            if not folder.is_dir():
                _fail("root" if sp == "train" else "val_dir",
                      f"a folder with {sp} images at {folder}", str(root))
    else:
        for key in ("urls", "val_urls") if split == "val" else ("urls",):
            if not cfg.get(key):
                _fail(key, "tar shards as a brace pattern or a list", cfg.get(key))
        for key in ("epoch_size", "shuffle_buffer"):
            value = cfg[key]
            if value is not None and not (isinstance(value, int) and value >= 0):
                _fail(key, "a non-negative integer or null", value)
    return cfg


# ---------------------------------------------------------------- bundled photos

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
            photos[name] = [np.asarray(_open(str(folder / f"{name}.jpg")))]
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


class _BundledTrain(_IndexedTrain):
    def __init__(self, images, size, hflip, **kw):
        super().__init__(**kw)
        self.images, self.size, self.hflip = images, size, hflip

    def sample(self, n, gen, pending):
        img = self.images[_randint(gen, len(self.images) - 1)]
        return train_transform(img, self.size, gen, self.hflip)


class _ListStream(IterableDataset):
    """A fixed list of ready tensors, this rank's share, split over workers."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __iter__(self):
        worker, workers = _worker()
        for t in self.tensors[worker::workers]:
            yield t, []


# ---------------------------------------------------------------- image folders

def _list_images(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTS and p.is_file())


class _FolderTrain(_IndexedTrain):
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
            gen = _generator(2, self.seed, epoch)
            self._order = (epoch, torch.randperm(len(self.files), generator=gen).tolist())
        return self._order[1]

    def sample(self, n, gen, pending):
        epoch, i = divmod(n, len(self.files))
        index = self.order(epoch)[i]
        while True:  # pending.add raises after MAX_BAD_IN_A_ROW failures
            try:
                img = _open(self.files[index])
                return train_transform(img, self.size, gen, self.hflip)
            except Exception as exn:  # corrupt, truncated, unreadable: skip and count
                pending.add(f"{self.files[index]} ({type(exn).__name__})")
                index = _randint(gen, len(self.files) - 1)


class _FolderVal(IterableDataset):
    """One pass in file order: this rank's share, split over workers; bad files dropped."""

    def __init__(self, files, size):
        self.files, self.size = files, size

    def __iter__(self):
        worker, workers = _worker()
        pending = _Pending()
        for path in self.files[worker::workers]:
            try:
                img = val_transform(_open(path), self.size)
            except Exception as exn:  # corrupt, truncated, unreadable: skip and count
                pending.add(f"{path} ({type(exn).__name__})")
                continue
            yield img, pending.take()
        if pending.keys:
            yield None, pending.take()


# ---------------------------------------------------------------- webdataset shards

def _local_shards_exist(urls) -> None:
    import webdataset as wds

    key = "urls"
    for url in wds.shardlists.expand_urls(urls) if isinstance(urls, str) else urls:
        if "://" not in url and not url.startswith("pipe:") and not Path(url).exists():
            _fail(key, "existing tar shards", url)


class _WorkerSeed:
    """webdataset worker_seed: distinct and reproducible per (rank, worker)."""

    def __init__(self, rank):
        self.rank = rank

    def __call__(self):
        return self.rank * 1000 + _worker()[0]


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
        gen, _, _ = _rng(self.seed, self.rank, self.passes)
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
        gen, _, _ = _rng(self.seed + 1, self.rank, self.passes)
        self.passes += 1
        for sample in src:
            key = f"{sample.get('__url__')}:{sample.get('__key__')}"
            data = next((sample[k] for k in WDS_IMAGE_KEYS if k in sample), None)
            try:
                if data is None:
                    raise KeyError("no jpg/png/jpeg/webp member")
                img = _open(data)
            except Exception as exn:
                self.pending.add(f"{key} ({type(exn).__name__})")
                continue
            img = (train_transform(img, self.size, gen, self.hflip) if self.train
                   else val_transform(img, self.size))
            yield img, self.pending.take()
        if self.pending.keys:
            yield None, self.pending.take()


def _webdataset(cfg, train, seed, rank, world_size):
    import webdataset as wds

    urls = cfg["urls"] if train else cfg["val_urls"]
    _local_shards_exist(urls)
    pending = _Pending()
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


# ---------------------------------------------------------------- entry points

def build_loader(data_cfg: Mapping, split: str, batch_size: int, *, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, start_batch: int = 0,
                 pin_memory: bool = False):
    """-> (loader, DataStats). See the module docstring for what each kind yields.

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
    train, size, name = split == "train", cfg["image_size"], cfg["name"]
    indexed = dict(batch_size=batch_size, start_batch=start_batch, seed=seed, rank=rank,
                   world_size=world_size)
    length = None

    if name == "bundled":
        names = bundled_photo_names(cfg["val_photos"], split)
        images = _bundled_images(names, round(cfg["crop_scale"] * size))
        if train:
            dataset = _BundledTrain(images, size, cfg["hflip"], **indexed)
        else:
            crops = [to_tensor(c) for img in images
                     for c in _grid_crops(img, size, cfg["val_crops_per_photo"])]
            dataset = _ListStream(crops[rank::world_size])
    elif name == "imagefolder":
        folder = Path(cfg["root"]) / cfg["train_dir" if train else "val_dir"]
        files = _list_images(folder)
        if len(files) < (world_size if train else 1):
            _fail("root", f"at least {world_size} image files ({'|'.join(IMAGE_EXTS)}) "
                  f"under {folder}", f"{len(files)} files")
        if train:
            dataset = _FolderTrain(files, size, cfg["hflip"], **indexed)
        else:
            dataset = _FolderVal(files[rank::world_size], size)
    else:
        if start_batch:  # tar streams cannot jump ahead: a fresh seeded stream instead
            seed = int(np.random.SeedSequence([seed, start_batch]).generate_state(1)[0])
        dataset = _webdataset(cfg, train, seed, rank, world_size)

    stats, kw = DataStats(), dict(batch_size=batch_size, num_workers=num_workers,
                                  collate_fn=_collate, persistent_workers=num_workers > 0,
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
