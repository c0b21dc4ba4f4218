"""Official WeTok / Open-MAGVIT2 checkpoints in: ``python -m wetok.convert SRC OUT_DIR``.

SRC is a Lightning ``.ckpt`` of the reference code (``state_dict`` with ``encoder.*``,
``decoder.*``, ``loss.discriminator.*`` and, with EMA, ``model_ema.<name without dots>``, as
LitEma stores it). OUT_DIR receives

* ``model.safetensors`` + ``config.json``: read by ``Tokenizer.load(OUT_DIR)`` (EMA weights
  unless ``--no-ema``; the reference's own generation-stage loading takes the EMA ones);
* ``checkpoint.pt``: a training checkpoint (raw + EMA generator, discriminator, a fully composed
  config at the reference's settings) for ``init_from=OUT_DIR/checkpoint.pt`` and for
  ``python -m wetok.evaluate OUT_DIR``.

The model config comes from the tensor shapes (C, ch_mult, B, d, generative decoder); g (and so
d' = d / g) is not stored in any tensor: it comes from ``--config`` (the official YAML:
``num_codebooks``, ``n_embed`` = 2^d'), the checkpoint's ``hyper_parameters`` when Lightning saved
them, or ``--groups``. Values given twice must agree. Unknown, missing or mis-shaped tensors stop
the conversion with one line naming them, before anything is written.
"""
from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from wetok import checkpoint
from wetok.discriminator import NLayerDiscriminator
from wetok.model import build_model

CHECKPOINT_NAME = "checkpoint.pt"
EMA_PREFIX = "model_ema."
DISC_PREFIX = "loss.discriminator."
# reference tensors with no counterpart here: the frozen LPIPS network and LitEma bookkeeping
IGNORED = (re.compile(r"loss\.perceptual_loss\."), re.compile(r"model_ema\.(decay|num_updates)$"))
# reference module path -> project module path (generator)
RENAMES = [
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\."), r"encoder.levels.\1.blocks.\2.shortcut."),
    (re.compile(r"^encoder\.down\.(\d+)\.block\.(\d+)\."), r"encoder.levels.\1.blocks.\2."),
    (re.compile(r"^encoder\.down\.(\d+)\.downsample\."), r"encoder.levels.\1.down."),
    (re.compile(r"^(en|de)coder\.mid_block\.(\d+)\.nin_shortcut\."), r"\1coder.mid.\2.shortcut."),
    (re.compile(r"^(en|de)coder\.mid_block\.(\d+)\."), r"\1coder.mid.\2."),
    (re.compile(r"^decoder\.adaptive\.(\d+)\."), r"decoder.levels.\1.norm."),
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\.nin_shortcut\."), r"decoder.levels.\1.blocks.\2.shortcut."),
    (re.compile(r"^decoder\.up\.(\d+)\.block\.(\d+)\."), r"decoder.levels.\1.blocks.\2."),
    (re.compile(r"^decoder\.up\.(\d+)\.upsample\.conv1\."), r"decoder.levels.\1.up.conv."),
    (re.compile(r"^(en|de)coder\.(conv_in|conv_out|norm_out)\."), r"\1coder.\2."),
]
# the settings of the reference code, for the written config (docs/parity.md lists them)
REFERENCE_QUANTIZER = {"entropy_mode": "pooled", "entropy_reduction": "mean",
                       "entropy_eps": 1e-5, "tau": 0.01, "l2_norm": False,
                       "sync_entropy": False, "commit_weight": 0.25, "entropy_weight": 0.1,
                       "zeta": 1.0}


class ConvertError(ValueError):
    """A checkpoint or config that cannot be converted (one line)."""


def project_key(ref_key: str) -> str | None:
    """Reference generator key -> project key (None when no rule applies)."""
    for pattern, repl in RENAMES:
        if pattern.match(ref_key):
            return pattern.sub(repl, ref_key, count=1)
    return None


def read_checkpoint(path: Path) -> Mapping:
    """torch.load with weights_only=True; full unpickling only when the file needs it (warned)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        warnings.warn(f"{path}: not loadable with weights_only=True ({first}); loading it with "
                      f"full unpickling: only do this for files you trust", stacklevel=2)
        return torch.load(path, map_location="cpu", weights_only=False)


# ---------------------------------------------------------------------------------- config
def shape_config(sd: Mapping[str, torch.Tensor]) -> dict:
    """C, ch_mult, B, d and the generative decoder from the reference tensors' shapes."""
    try:
        c = sd["encoder.conv_in.weight"].shape[0]
        d = sd["encoder.conv_out.weight"].shape[0]
        conv_in = sd["decoder.conv_in.weight"].shape[1]
    except KeyError as exc:
        raise ConvertError(f"missing {exc.args[0]}: not a WeTok / Open-MAGVIT2 state_dict") from None
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
    mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // c for i in levels]
    if conv_in not in (d, 2 * d):
        raise ConvertError(f"decoder.conv_in.weight takes {conv_in} channels; expected d={d} "
                           f"or 2d={2 * d} (generative decoder)")
    cfg = {"channels": c, "channel_mult": mult, "num_res_blocks": len(blocks), "d": d,
           "downsample": 2 ** (len(mult) - 1), "generative": conv_in == 2 * d}
    convs = [k for k, v in sd.items() if k.startswith(DISC_PREFIX) and v.dim() == 4]
    if convs:  # PatchGAN: n_layers + 2 convs, the first with ndf outputs
        cfg.update(disc_ndf=sd[DISC_PREFIX + "main.0.weight"].shape[0], disc_layers=len(convs) - 2)
    return cfg


def yaml_config(path: Path) -> dict:
    """The same values (and g, d') from an official WeTok / Open-MAGVIT2 training YAML."""
    from omegaconf import OmegaConf

    root = OmegaConf.to_container(OmegaConf.load(path))
    args = (root.get("model") or {}).get("init_args") or (root.get("model") or {}).get("params")
    if not isinstance(args, Mapping) or "ddconfig" not in args:
        raise ConvertError(f"{path}: no model.init_args.ddconfig (not an official WeTok / "
                           f"Open-MAGVIT2 config)")
    dd = args["ddconfig"]
    out = {"channels": dd["ch"], "channel_mult": list(dd["ch_mult"]),
           "num_res_blocks": dd["num_res_blocks"], "d": dd["z_channels"],
           "generative": bool(args.get("gan_decoder", False)),
           "groups": int(args.get("num_codebooks", 1))}
    if "n_embed" in args:
        out["group_dim"] = int(math.log2(int(args["n_embed"])))
    return out


def _hyper_config(ckpt: Mapping) -> dict:
    hp = ckpt.get("hyper_parameters") if isinstance(ckpt, Mapping) else None
    if not isinstance(hp, Mapping):
        return {}
    hp = hp.get("init_args", hp)
    out = {}
    if "num_codebooks" in hp:
        out["groups"] = int(hp["num_codebooks"])
    if "n_embed" in hp:
        out["group_dim"] = int(math.log2(int(hp["n_embed"])))
    return out


def resolve_config(sd, ckpt, yaml_path: Path | None, groups: int | None) -> dict:
    """Merge shapes, YAML, hyper_parameters and --groups; any disagreement is an error."""
    cfg = shape_config(sd)
    sources = [("the tensor shapes", cfg)]
    if yaml_path is not None:
        sources.append((str(yaml_path), yaml_config(yaml_path)))
    sources.append(("the checkpoint's hyper_parameters", _hyper_config(ckpt)))
    if groups is not None:
        sources.append(("--groups", {"groups": groups}))
    merged: dict = {}
    for name, values in sources:
        for key, value in values.items():
            if key in merged and merged[key][1] != value:
                raise ConvertError(f"{key}: {merged[key][1]!r} from {merged[key][0]} but "
                                   f"{value!r} from {name}")
            merged.setdefault(key, (name, value))
    cfg = {k: v for k, (_, v) in merged.items()}
    if "groups" not in cfg:
        raise ConvertError("g is not stored in the tensors: pass --config OFFICIAL.yaml or "
                           "--groups G")
    d, g = cfg["d"], cfg["groups"]
    if g < 1 or d % g:
        raise ConvertError(f"g={g} does not divide d={d}")
    cfg.setdefault("group_dim", d // g)
    if cfg["group_dim"] * g != d:
        raise ConvertError(f"g={g} x d'={cfg['group_dim']} != d={d} (z_channels)")
    return cfg


# ---------------------------------------------------------------------------------- weights
def split_state(sd: Mapping[str, torch.Tensor]):
    """Reference state_dict -> (raw generator, EMA generator or None, discriminator, unknown keys),
    generator keys in the project's names. EMA tensors of frozen (absent) parameters are the raw
    ones (LitEma tracks trainable parameters only)."""
    raw, disc, unknown, ema_src = {}, {}, [], {}
    for k, v in sd.items():
        if any(p.match(k) for p in IGNORED):
            continue
        if k.startswith(EMA_PREFIX):
            ema_src[k[len(EMA_PREFIX):]] = v
        elif k.startswith(DISC_PREFIX):
            disc[k[len(DISC_PREFIX):]] = v
        elif (new := project_key(k)) is not None:
            raw[new] = (k, v)
        else:
            unknown.append(k)
    ema = None
    if ema_src:
        ema, used = {}, set()
        for new, (k, v) in raw.items():
            flat = k.replace(".", "")
            ema[new] = ema_src.get(flat, v)
            used.add(flat)
        used |= {(DISC_PREFIX + k).replace(".", "") for k in disc}
        unknown += [EMA_PREFIX + k for k in ema_src if k not in used]
    return {n: v for n, (_, v) in raw.items()}, ema, disc, unknown


def _check(name: str, got: Mapping, expected: Mapping, unknown: list) -> list[str]:
    problems = []
    missing = [k for k in expected if k not in got]
    extra = [k for k in got if k not in expected]
    shaped = [f"{k} {tuple(got[k].shape)} vs {tuple(expected[k].shape)}" for k in got
              if k in expected and got[k].shape != expected[k].shape]
    for label, keys in (("unknown", unknown + extra), ("missing", missing), ("mis-shaped", shaped)):
        if keys:
            problems.append(f"{name} {label}: {', '.join(keys)}")
    return problems


def project_config(cfg: Mapping, out_dir: Path) -> dict:
    """The project's full composed config at the reference settings for this model."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    conf_dir = Path(__file__).resolve().parent.parent / "conf"
    with initialize_config_dir(str(conf_dir), version_base="1.3"):
        composed = compose("config", overrides=["loss=default"])
    q = {"name": "lfq" if cfg["groups"] == 1 else "gq", "dim": cfg["d"], "groups": cfg["groups"],
         "group_dim": cfg["group_dim"], **REFERENCE_QUANTIZER}
    m = {"name": "converted", "channels": cfg["channels"], "channel_mult": cfg["channel_mult"],
         "downsample": cfg["downsample"], "num_res_blocks": cfg["num_res_blocks"]}
    OmegaConf.set_struct(composed, False)
    composed.model, composed.quantizer = m, {**OmegaConf.to_container(composed.quantizer), **q}
    composed.stage = 2 if cfg["generative"] else 1
    for key in ("disc_ndf", "disc_layers"):
        if key in cfg:
            composed.loss[key] = cfg[key]
    composed.run_dir = str(out_dir)
    composed.name = "converted"
    return OmegaConf.to_container(composed, resolve=True)


def convert(src: Path, out_dir: Path, yaml_path: Path | None = None, groups: int | None = None,
            ema: bool = True) -> dict:
    """Convert SRC into OUT_DIR (see the module docstring); returns the resolved config."""
    src = Path(src)
    if not src.is_file():
        raise ConvertError(f"{src}: no such checkpoint file")
    ckpt = read_checkpoint(src)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise ConvertError(f"{src}: no state_dict mapping in the file")
    cfg = resolve_config(sd, ckpt, yaml_path, groups)
    raw, ema_sd, disc, unknown = split_state(sd)
    full = project_config(cfg, Path(out_dir))
    model = build_model(full["model"], full["quantizer"], generative=cfg["generative"])
    expected = model.state_dict()
    ref_disc = NLayerDiscriminator(ndf=full["loss"]["disc_ndf"], n_layers=full["loss"]["disc_layers"])
    problems = _check("generator", raw, expected, unknown)
    if ema_sd is not None:
        problems += _check("EMA", ema_sd, expected, [])
    if disc:
        problems += _check("discriminator", disc, ref_disc.state_dict(), [])
    if problems:
        raise ConvertError(f"{src}: " + "; ".join(problems))
    if ema and ema_sd is None:
        warnings.warn(f"{src}: no EMA weights (model_ema.*); using the raw ones", stacklevel=2)
    chosen = ema_sd if ema and ema_sd is not None else raw
    model.load_state_dict(chosen)

    from wetok.api import Tokenizer

    out_dir = Path(out_dir)
    Tokenizer(model).save(out_dir)
    state = {"step": 0, "model": raw, "ema": ema_sd if ema_sd is not None else raw,
             "disc": disc or ref_disc.state_dict(),
             "loss": {"lecam.ema_real": torch.zeros(()), "lecam.ema_fake": torch.zeros(())},
             "config": full, "source": str(src), "weights": "ema" if chosen is ema_sd else "raw"}
    checkpoint.save(state, out_dir / CHECKPOINT_NAME)
    return cfg


def evaluation_checkpoint(path: Path) -> Path | None:
    """For ``python -m wetok.evaluate``: a converted folder -> its checkpoint.pt; an official
    ``.ckpt`` -> converted (once) into ``<name>.wetok/`` beside it; else None."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file():
        return path / CHECKPOINT_NAME
    if path.is_file() and path.suffix == ".ckpt":
        out = path.with_name(path.stem + ".wetok")
        if not (out / CHECKPOINT_NAME).is_file():
            convert(path, out)
        return out / CHECKPOINT_NAME
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wetok.convert",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="official .ckpt (Lightning) file")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--config", type=Path, default=None, help="the official YAML")
    parser.add_argument("--groups", type=int, default=None, help="g (when no YAML is given)")
    parser.add_argument("--no-ema", action="store_true", help="raw weights instead of EMA")
    args = parser.parse_args(argv)
    try:
        cfg = convert(args.src, args.out_dir, args.config, args.groups, ema=not args.no_ema)
    except (ConvertError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out_dir} (C={cfg['channels']} ch_mult={cfg['channel_mult']} "
          f"B={cfg['num_res_blocks']} d={cfg['d']} g={cfg['groups']} d'={cfg['group_dim']} "
          f"generative={cfg['generative']}, {'raw' if args.no_ema else 'EMA'} weights)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
