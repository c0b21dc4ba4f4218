"""Inference API (Tokenizer): encode/decode, save/load, training checkpoints (CPU, fast)."""
import argparse
import json

import pytest
import torch

from conftest import model_preset
from wetok.api import Tokenizer
from wetok.model import build_model, to_generative_state_dict

QCFG = model_preset("gq", "quantizer")
# a quantizer config as an older version saved it: the mode under its old name, no
# entropy_reduction / entropy_eps yet
OLD_QCFG = {"name": "gq", "groups": 4, "group_dim": 8, "tau": 0.01, "codebook_entropy": "grouped",
            "l2_norm": False, "sync_entropy": False, "commit_weight": 0.25}
TINY = {"name": "tiny", **model_preset("tiny")}


def _tok(generative=False, seed=0):
    torch.manual_seed(seed)
    return Tokenizer(build_model(TINY, QCFG, generative=generative))


def _images(n=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_round_trip_shapes_and_range():
    tok = _tok()
    x = _images()
    idx = tok.encode(x)
    assert idx.shape == (2, 4, 4, 4) and idx.dtype == torch.long
    assert idx.min() >= 0 and idx.max() < 256
    rec = tok.decode(idx)
    assert rec.shape == x.shape and rec.dtype == torch.float32
    assert rec.min() >= -1 and rec.max() <= 1
    # decode(indices) equals the model's own reconstruction through z_q
    with torch.no_grad():
        ref, _ = tok.model(x)
    torch.testing.assert_close(rec, ref.clamp(-1, 1))


def test_uint8_input():
    tok = _tok()
    u8 = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(tok.encode(u8), tok.encode(u8.float() / 127.5 - 1))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        tok.encode(torch.zeros(3, 32, 32))


def test_save_load_identical(tmp_path):
    for generative in (False, True):
        tok = _tok(generative=generative, seed=3)
        out = tok.save(tmp_path / f"g{int(generative)}")
        assert (out / "model.safetensors").is_file()
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["generative"] is generative and cfg["quantizer"]["groups"] == 4
        tok2 = Tokenizer.load(out)
        x = _images(seed=1)
        idx = tok.encode(x)
        assert torch.equal(idx, tok2.encode(x))
        a = tok.decode(idx, generator=torch.Generator().manual_seed(5))
        b = tok2.decode(idx, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b)


def test_old_configs_still_load(tmp_path):
    """config.json / checkpoint configs saved before quantizer.entropy_mode (and its siblings)
    existed load as the current conf/ names them; a re-save writes the current names."""
    tok = _tok(seed=3)
    out = tok.save(tmp_path / "old")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "quantizer": OLD_QCFG}))
    old = Tokenizer.load(out)
    assert old.config["quantizer"] == QCFG  # renamed, and the keys added since filled in
    x = _images(seed=1)
    assert torch.equal(old.encode(x), tok.encode(x))
    resaved = json.loads((old.save(tmp_path / "new") / "config.json").read_text())
    assert resaved["quantizer"]["entropy_mode"] == "grouped"
    assert "codebook_entropy" not in resaved["quantizer"]
    path, _, sd_ema = _checkpoint(tmp_path, 1, quantizer=OLD_QCFG)
    key = "decoder.conv_out.weight"
    assert torch.equal(Tokenizer.from_checkpoint(path).model.state_dict()[key], sd_ema[key])


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        Tokenizer.load(tmp_path)
    _tok().save(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Tokenizer.load(tmp_path / "t")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        Tokenizer.from_checkpoint(tmp_path / "missing.pt")


def _checkpoint(tmp_path, stage, quantizer=QCFG):
    torch.manual_seed(0)
    raw = build_model(TINY, QCFG)
    ema = build_model(TINY, QCFG)  # different weights
    sd_raw, sd_ema = raw.state_dict(), ema.state_dict()
    if stage == 2:
        sd_raw, sd_ema = to_generative_state_dict(sd_raw), to_generative_state_dict(sd_ema)
    path = tmp_path / f"stage{stage}.pt"
    torch.save({"model": sd_raw,
                "ema": {"module." + k: v for k, v in sd_ema.items()},  # prefixes are stripped
                "config": {"model": dict(TINY), "quantizer": dict(quantizer), "stage": stage},
                "step": 10}, path)
    return path, sd_raw, sd_ema


@pytest.mark.parametrize("stage", [1, 2])
def test_from_checkpoint(tmp_path, stage):
    path, sd_raw, sd_ema = _checkpoint(tmp_path, stage)
    tok_ema = Tokenizer.from_checkpoint(path)
    tok_raw = Tokenizer.from_checkpoint(path, ema=False)
    assert tok_ema.generative is (stage == 2)
    key = "decoder.conv_out.weight"
    assert torch.equal(tok_ema.model.state_dict()[key], sd_ema[key])
    assert torch.equal(tok_raw.model.state_dict()[key], sd_raw[key])
    x = _images()
    assert tok_ema.decode(tok_ema.encode(x),
                          generator=torch.Generator().manual_seed(0)).shape == x.shape


def test_from_checkpoint_is_weights_only(tmp_path):
    path = tmp_path / "unsafe.pt"
    torch.save({"model": {}, "ema": {}, "config": argparse.Namespace(model=1)}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unpickl|unsupported"):
        Tokenizer.from_checkpoint(path)


def test_from_checkpoint_without_ema(tmp_path):
    path, _, _ = _checkpoint(tmp_path, 1)
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"] = None
    torch.save(ckpt, path)
    with pytest.raises(KeyError, match="ema=False"):
        Tokenizer.from_checkpoint(path)
    Tokenizer.from_checkpoint(path, ema=False)
