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

data_cfg kinds (`name`), beside `image_size`; the keys a config leaves out take the values
of wetok.data.validate.defaults (bundled: conf/data/bundled.yaml):
- bundled: real photographs shipped in scikit-image and scikit-learn; nothing to download.
  Photos: astronaut, chelsea, coffee, rocket, hubble_deep_field, retina,
  immunohistochemistry, stereo_motorcycle (left and right views, one name), camera, moon,
  page, coins, text, clock, grass, gravel, brick, cell (grey ones copied to 3 channels),
  china, flower (scikit-learn). Split by photo: `val_photos` are held out. Every photo is
  resized so its short side is `crop_scale` * image_size. train: random crop + horizontal
  flip (`hflip`). val: `val_crops_per_photo` fixed crops on a grid, row-major.
- imagefolder: `root`/`train_dir` ("train") and `root`/`val_dir` ("val"),
  any depth (ImageNet: <class>/*.JPEG). train: passes over seeded permutations of the files
  (global sample n is file n of the permutation of pass n // files); short side resized up to
  image_size only if smaller, random crop (paper), `hflip` (false); an unreadable file
  is replaced by a random other one. val: short side resized to image_size, center crop
  (paper protocol). Bilinear, antialiased (PIL).
- webdataset: tar shards, `urls` (brace pattern or list) for train, `val_urls` for val.
  train: resampled shards, seeded deterministically per (seed, rank, worker); a seeded
  shuffle buffer (`shuffle_buffer`, 1000); optional `epoch_size` (samples per rank)
  sets the DataLoader epoch with .with_epoch(). val: the shards in order, split by rank
  then worker, not resampled. Image member: jpg;png;jpeg;webp. Same crops as imagefolder.

`write_shards(items, pattern, per_shard)` writes tar shards (tests; converting a folder).

Modules: loader (build_loader, Loader), validate (config checks, defaults), stream (skip
counting, seeded streams, transforms), bundled, imagefolder, shards (webdataset reader and
writer).
"""
from wetok.data.bundled import BUNDLED_PHOTOS, bundled_photo_names
from wetok.data.imagefolder import IMAGE_EXTS, list_images
from wetok.data.loader import Loader, build_loader
from wetok.data.shards import write_shards
from wetok.data.stream import DataStats, to_tensor, train_transform, val_transform
from wetok.data.validate import KINDS, validate_data_cfg

__all__ = ["BUNDLED_PHOTOS", "DataStats", "IMAGE_EXTS", "KINDS", "Loader", "build_loader",
           "bundled_photo_names", "list_images", "to_tensor", "train_transform",
           "val_transform", "validate_data_cfg", "write_shards"]
