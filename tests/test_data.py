"""wetok.data: bundled photos, image folders, webdataset shards, skip-and-count, config errors."""
import io
import itertools

import numpy as np
import pytest
import torch
from PIL import Image

from wetok import data
from wetok.data import imagefolder
from wetok.data import build_loader, write_shards

BUNDLED = {"name": "bundled", "image_size": 32, "val_crops_per_photo": 4}


def first(loader, n=1):
    batches = list(itertools.islice(iter(loader), n))
    return batches[0] if n == 1 else batches


# ---------------------------------------------------------------- bundled

def test_bundled_train_shapes_and_range():
    loader, stats = build_loader(BUNDLED, "train", 6, seed=0)
    batch = first(loader)
    assert batch.shape == (6, 3, 32, 32) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    assert batch.std() > 0.05  # real content, not a constant
    assert stats.skipped == 0


def test_bundled_val_fixed_and_deterministic():
    a = torch.cat(list(build_loader(BUNDLED, "val", 3, seed=0)[0]))
    b = torch.cat(list(build_loader(BUNDLED, "val", 5, seed=123, num_workers=0)[0]))
    assert a.shape == (2 * 4, 3, 32, 32)  # 2 held-out photos x 4 crops
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    # ranks split the crops without overlap or padding
    parts = [torch.cat(list(build_loader(BUNDLED, "val", 4, seed=0, rank=r, world_size=2)[0]))
             for r in (0, 1)]
    assert parts[0].shape[0] + parts[1].shape[0] == a.shape[0]
    assert torch.equal(parts[0], a[0::2]) and torch.equal(parts[1], a[1::2])


def test_bundled_split_by_photo():
    train = data.bundled_photo_names(["chelsea", "flower"], "train")
    val = data.bundled_photo_names(["chelsea", "flower"], "val")
    assert val == ["chelsea", "flower"]
    assert not set(train) & set(val) and set(train) | set(val) == set(data.BUNDLED_PHOTOS)
    loader, _ = build_loader(BUNDLED, "train", 2, seed=0)
    assert len(loader.dataloader.dataset.images) == len(train) + 1  # stereo pair: 2 images
    # the first val crop is the top-left corner of chelsea after the short-side resize
    import skimage.data
    chelsea = Image.fromarray(skimage.data.chelsea())
    short = round(2.0 * 32)
    chelsea = chelsea.resize((round(chelsea.width * short / chelsea.height), short),
                             Image.BILINEAR)
    expect = torch.from_numpy(np.array(chelsea)[:32, :32]).permute(2, 0, 1) / 127.5 - 1
    got = first(build_loader(BUNDLED, "val", 1, seed=0)[0])[0]
    assert (got - expect).abs().mean() < 0.02


def test_bundled_train_stream_is_seeded():
    a = first(build_loader(BUNDLED, "train", 8, seed=1)[0])
    b = first(build_loader(BUNDLED, "train", 8, seed=1)[0])
    c = first(build_loader(BUNDLED, "train", 8, seed=2)[0])
    d = first(build_loader(BUNDLED, "train", 8, seed=1, rank=1, world_size=2)[0])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, d)
    second = first(build_loader(BUNDLED, "train", 8, seed=1)[0], n=2)[1]
    assert not torch.equal(a, second)


# ---------------------------------------------------------------- image folder

def _noise(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    for split in ("train", "val"):
        for k in range(5):
            cls = root / split / f"n0{k % 2}"
            cls.mkdir(parents=True, exist_ok=True)
            ext, fmt = ("JPEG", "JPEG") if k % 2 else ("png", "PNG")
            _noise(40 + k, 48, k).save(cls / f"img{k}.{ext}", format=fmt)
        _noise(20, 30, 9).save(root / split / "n00" / "small.png")  # smaller than image_size
        (root / split / "n00" / "corrupt.JPEG").write_bytes(
            np.random.default_rng(0).bytes(500))
        buf = io.BytesIO()
        _noise(64, 64, 7).save(buf, format="JPEG")
        (root / split / "n01" / "truncated.JPEG").write_bytes(buf.getvalue()[:1200])
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_imagefolder_val_skips_and_counts(folder, workers):
    cfg = {"name": "imagefolder", "root": str(folder), "image_size": 32}
    loader, stats = build_loader(cfg, "val", 4, seed=0, num_workers=workers)
    images = torch.cat(list(loader))
    assert images.shape == (6, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert stats.skipped == 2
    assert sorted(e.split("/")[-1].split(" ")[0] for e in stats.examples) == \
        ["corrupt.JPEG", "truncated.JPEG"]
    assert stats.as_dict() == {"bad_images": 2, "bad_images_distinct": 2}


def test_imagefolder_train_random_crop_endless(folder):
    cfg = {"name": "imagefolder", "root": str(folder), "image_size": 32}
    loader, stats = build_loader(cfg, "train", 4, seed=0)
    batches = first(loader, n=6)  # 24 images: three passes over the 8 files (2 unreadable)
    assert all(b.shape == (4, 3, 32, 32) for b in batches)
    assert stats.skipped >= 4  # each pass skips both bad files again: counted every time
    assert stats.distinct == 2 and len(stats.examples) == 2
    again = first(build_loader(cfg, "train", 4, seed=0)[0])
    assert torch.equal(batches[0], again)


def test_train_transform_is_a_plain_random_crop():
    img = _noise(40, 48, 3)
    ref = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1
    gen = torch.Generator().manual_seed(0)
    offsets = set()
    for _ in range(5):
        crop = data.train_transform(img, 32, gen, hflip=False)
        hits = [(t, l) for t in range(9) for l in range(17)
                if torch.equal(ref[:, t:t + 32, l:l + 32], crop)]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 1  # the position is random


def test_val_transform_short_side_resize_then_center_crop():
    # 200 x 100 (W x H): red | green (middle half) | blue. Resize short side to 50 -> 100 x 50,
    # center crop 50 -> exactly the green middle half. A squash or a plain crop would not be.
    arr = np.zeros((100, 200, 3), np.uint8)
    arr[:, :50, 0] = 255
    arr[:, 50:150, 1] = 255
    arr[:, 150:, 2] = 255
    out = data.val_transform(Image.fromarray(arr), 50)
    assert out.shape == (3, 50, 50)
    inner = out[:, :, 1:-1]  # the outer columns may blend through the antialiasing filter
    assert torch.allclose(inner[1], torch.ones_like(inner[1]), atol=0.02)
    assert torch.allclose(inner[0], -torch.ones_like(inner[0]), atol=0.02)
    assert torch.allclose(inner[2], -torch.ones_like(inner[2]), atol=0.02)


# ---------------------------------------------------------------- webdataset

@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    items = [np.asarray(_noise(36, 40, k)) for k in range(11)]
    items[5] = b"definitely not an image"  # a bad member (stored as 000000005.jpg)
    paths = write_shards(items, str(out / "train-%06d.tar"), per_shard=4)
    assert len(paths) == 3
    return str(out / "train-{000000..000002}.tar"), paths


def test_webdataset_val_reads_all_and_counts_bad_member(shards):
    pattern, paths = shards
    cfg = {"name": "webdataset", "urls": pattern, "val_urls": paths, "image_size": 32}
    loader, stats = build_loader(cfg, "val", 4, seed=0)
    images = torch.cat(list(loader))
    assert images.shape == (10, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert stats.skipped == 1 and "000000005" in stats.examples[0]
    again = torch.cat(list(build_loader(cfg, "val", 3, seed=5)[0]))
    assert torch.equal(images, again)
    parts = [torch.cat(list(build_loader(cfg, "val", 4, seed=0, rank=r, world_size=2)[0]))
             for r in (0, 1)]
    assert parts[0].shape[0] + parts[1].shape[0] == 10
    _, wstats = build_loader(cfg, "val", 4, seed=0, num_workers=2)
    assert torch.cat(list(_)).shape[0] == 10 and wstats.skipped == 1


def test_webdataset_train_resampled_seeded(shards):
    pattern, _ = shards
    cfg = {"name": "webdataset", "urls": pattern, "image_size": 32, "shuffle_buffer": 8}
    loader, stats = build_loader(cfg, "train", 4, seed=0)
    batches = first(loader, n=12)  # 48 samples from 11-member shards: resampled, endless
    assert all(b.shape == (4, 3, 32, 32) for b in batches)
    assert stats.skipped >= 1 and stats.distinct == 1 and "000000005" in stats.examples[0]
    same = first(build_loader(cfg, "train", 4, seed=0)[0])
    other = first(build_loader(cfg, "train", 4, seed=1)[0])
    resumed = first(build_loader(cfg, "train", 4, seed=0, start_batch=5)[0])
    assert torch.equal(batches[0], same) and not torch.equal(batches[0], other)
    assert not torch.equal(batches[0], resumed)  # a fresh stream, not a replay from batch 0


def test_webdataset_epoch_size_sets_length(shards):
    pattern, _ = shards
    cfg = {"name": "webdataset", "urls": pattern, "image_size": 32, "epoch_size": 12}
    loader, _ = build_loader(cfg, "train", 4, seed=0)
    assert len(loader) == 3
    assert len(first(loader, n=7)) == 7  # still endless across nominal epochs


# ---------------------------------------------------------------- config errors

@pytest.mark.parametrize("cfg, split, key", [
    ({"name": "imagenet", "image_size": 32}, "train", "data.name"),
    ({"name": "bundled", "image_size": 0}, "train", "data.image_size"),
    ({"name": "bundled", "image_size": "64"}, "train", "data.image_size"),
    ({"name": "bundled", "image_size": True}, "train", "data.image_size"),
    ({"name": "bundled", "image_size": 32, "val_photos": ["lena"]}, "val", "data.val_photos"),
    ({"name": "bundled", "image_size": 32, "crops": 3}, "train", "data.crops"),
    ({"name": "imagefolder", "image_size": 32}, "train", "data.root"),
    ({"name": "imagefolder", "image_size": 32, "root": "/nonexistent"}, "train", "data.root"),
    ({"name": "webdataset", "image_size": 32}, "train", "data.urls"),
    ({"name": "webdataset", "image_size": 32, "urls": "/x/a-{0..1}.tar"}, "val", "data.val_urls"),
    ({"name": "webdataset", "image_size": 32, "urls": "/nonexistent/a-{0..1}.tar"}, "train",
     "data.urls"),
])
def test_config_errors_are_one_line_naming_the_key(cfg, split, key):
    with pytest.raises(ValueError) as err:
        build_loader(cfg, split, 2, seed=0)
    message = str(err.value)
    assert "\n" not in message and f"{key}:" in message


def test_bad_split_and_rank():
    with pytest.raises(ValueError, match="split"):
        build_loader(BUNDLED, "test", 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        build_loader(BUNDLED, "train", 2, seed=0, rank=2, world_size=2)


def test_imagefolder_more_ranks_than_files_is_a_config_error(folder):
    cfg = {"name": "imagefolder", "root": str(folder), "image_size": 32}
    with pytest.raises(ValueError, match="data.root"):
        build_loader(cfg, "train", 2, seed=0, rank=15, world_size=16)


@pytest.mark.parametrize("kind", ["bundled", "imagefolder"])
def test_train_batches_ignore_num_workers_and_resume_exactly(folder, kind):
    cfg = BUNDLED if kind == "bundled" else {"name": "imagefolder", "root": str(folder),
                                             "image_size": 32, "hflip": True}
    ref = first(build_loader(cfg, "train", 3, seed=4)[0], n=5)
    workers = first(build_loader(cfg, "train", 3, seed=4, num_workers=2)[0], n=5)
    resumed = first(build_loader(cfg, "train", 3, seed=4, start_batch=3)[0], n=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, workers))
    assert torch.equal(resumed[0], ref[3]) and torch.equal(resumed[1], ref[4])


def test_imagefolder_ranks_read_disjoint_files_each_pass(folder, monkeypatch):
    opened = []
    monkeypatch.setattr(imagefolder, "open_image",
                        lambda path: opened.append(path) or _noise(40, 40, 0))
    cfg = {"name": "imagefolder", "root": str(folder), "image_size": 32}
    files = data.list_images(folder / "train")
    passes = []
    for rank in (0, 1):  # 8 files: two global batches of 2 x 2 make a pass
        first(build_loader(cfg, "train", 2, seed=0, rank=rank, world_size=2)[0], n=4)
        passes.append((opened[:4], opened[4:8]))
        opened.clear()
    (a0, a1), (b0, b1) = passes
    assert len(set(a0)) == len(a0) == 4 and not set(a0) & set(b0)  # a pass: disjoint ranks
    assert set(a0) | set(b0) == set(files)  # ... covering every file
    assert a0 + b0 != a1 + b1  # the next pass is a new permutation


def test_imagefolder_cache_same_batches_one_decode_per_file(folder, monkeypatch):
    plain = {"name": "imagefolder", "root": str(folder), "image_size": 32, "hflip": True}
    ref = first(build_loader(plain, "train", 4, seed=2)[0], n=6)  # 3 passes over 8 files
    opened = []
    real = imagefolder.open_image
    monkeypatch.setattr(imagefolder, "open_image", lambda path: opened.append(path) or real(path))
    loader, stats = build_loader({**plain, "cache_mb": 1}, "train", 4, seed=2)
    cached = first(loader, n=6)
    assert all(torch.equal(a, b) for a, b in zip(ref, cached))
    good = [p for p in set(opened) if "corrupt" not in p and "truncated" not in p]
    assert len(good) == 6 and sum(p in good for p in opened) == 6  # each good file decoded once
    assert stats.skipped >= 4  # bad files are not cached: skipped and counted every pass


@pytest.mark.parametrize("bad", [-1, 1.5, True, "64"])
def test_imagefolder_cache_mb_must_be_a_count(folder, bad):
    cfg = {"name": "imagefolder", "root": str(folder), "image_size": 32, "cache_mb": bad}
    with pytest.raises(ValueError, match=r"^config error: data.cache_mb: expected [^\n]*$"):
        build_loader(cfg, "train", 2, seed=0)


def test_decoded_cache_keeps_to_its_budget(monkeypatch):
    monkeypatch.setattr(imagefolder, "open_image", lambda path: _noise(512, 512, 0))  # 0.75 MiB
    cache = imagefolder.DecodedCache(2)
    for path in ("a", "b", "c", "a"):
        cache(path)
    assert list(cache.images) == ["c", "a"] and cache.used <= 2 * 2**20  # b evicted, a again
    off = imagefolder.DecodedCache(0)
    off("a")
    assert not off.images and off.used == 0


@pytest.mark.parametrize("kind", ["bundled", "imagefolder"])
def test_ranks_split_the_one_process_batches(folder, kind):
    """2 ranks x 2 (either order inside) = 1 process x 4 = 1 x 2 with 2 accumulation steps,
    also after a resume at batch k (start_batch = k per rank)."""
    cfg = BUNDLED if kind == "bundled" else {"name": "imagefolder", "root": str(folder),
                                             "image_size": 32, "hflip": True}
    one = first(build_loader(cfg, "train", 4, seed=3)[0], n=3)
    accum = first(build_loader(cfg, "train", 2, seed=3)[0], n=6)
    ranks = [first(build_loader(cfg, "train", 2, seed=3, rank=r, world_size=2)[0], n=3)
             for r in (0, 1)]
    resumed = [first(build_loader(cfg, "train", 2, seed=3, rank=r, world_size=2,
                                  start_batch=2)[0]) for r in (0, 1)]
    for b in range(3):
        assert torch.equal(torch.cat([ranks[0][b], ranks[1][b]]), one[b])
        assert torch.equal(torch.cat([accum[2 * b], accum[2 * b + 1]]), one[b])
    assert torch.equal(torch.cat(resumed), one[2])
    assert not torch.equal(ranks[0][0], ranks[1][0])


def test_bundled_defaults_are_the_yaml_preset():
    """A bundled config takes the keys it leaves out from conf/data/bundled.yaml, the one place
    they are written."""
    from pathlib import Path

    import yaml

    preset = yaml.safe_load((Path(__file__).resolve().parents[1] / "conf" / "data" /
                             "bundled.yaml").read_text())
    filled = data.validate_data_cfg({"name": "bundled", "image_size": 32})
    assert filled == {**preset, "image_size": 32}
