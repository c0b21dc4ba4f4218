"""Config checks that run before anything is allocated, the run-folder resolver, and old or
deprecated config keys read under their current names.

Every error is one line: the key, what was expected, what was found. A module that owns an
option owns its check (quantize.check_quantizer, model.check_channels / resolve_channel_mult,
losses.loss_arguments / check_loss, data.validate_data_cfg) and its list of choices (metrics.
METRICS ...); ``validate`` calls them. The lists below have no other home (train.py and
records.py read these keys).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import warnings
from collections.abc import Mapping, MutableMapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from wetok.checks import is_int_at_least
from wetok.quantize import check_quantizer

SCHEDULES = ("constant", "warmup_cosine")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WANDB_MODES = ("auto", "online", "offline", "disabled")
RENAMED = {"codebook_entropy": "entropy_mode"}  # quantizer keys: deprecated name -> name now
CONF = Path(__file__).resolve().parent.parent / "conf"


class ConfigError(ValueError):
    """A config value that cannot work; the message is one line naming the key."""


def run_id(override_dirname: str) -> str:
    """Stable run-folder name from the job's overrides (same overrides -> same folder).

    Readable when short and safe; otherwise a readable prefix plus a hash of the whole string.
    """
    if not override_dirname:
        return "default"
    safe = re.sub(r"[^A-Za-z0-9=,._+-]", "_", override_dirname)
    if safe == override_dirname and len(safe) <= 96:
        return safe
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return f"{safe[:80]}-{digest}"


def stage2_init(stage: int, path: str) -> str | None:
    """`init_from` of a sweep over both stages: the stage-1 checkpoint for stage 2, none for 1."""
    return path if int(stage) == 2 else None


def seed_sweep(seeds, seed) -> str:
    """The sweeps' `seed` values: `seed` alone, or with `+seeds=N` the N seeds seed..seed+N-1
    (each its own run folder; the seed sets initialisation and data order)."""
    if seeds is None:
        return str(seed)
    if not is_int_at_least(seeds, 1):
        raise ConfigError(f"config error: seeds: expected a positive integer, got {seeds!r}")
    return ",".join(str(seed + i) for i in range(seeds))


def rank_zero_only(value, other=None):
    """``value`` in the process of global rank 0, ``other`` in the others (Hydra's run-folder
    files: ranks > 0 write nothing there). The rank comes from the launcher's environment."""
    from wetok.distributed import global_rank

    return value if global_rank() == 0 else other


for _name, _fn in (("run_id", run_id), ("stage2_init", stage2_init),
                   ("seed_sweep", seed_sweep), ("rank_zero_only", rank_zero_only)):
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _fn)


def _expect(ok: bool, key: str, expected: str, got) -> None:
    if not ok:
        raise ConfigError(f"config error: {key}: expected {expected}, got {got!r}")


@contextlib.contextmanager
def _checked(group: str):
    """A module's check (ValueError "key: expected ..., got ...") as a ConfigError on group.key."""
    try:
        yield
    except ValueError as exc:
        raise ConfigError(f"config error: {group}.{exc}") from None


def _rename(quantizer: MutableMapping) -> list[str]:
    """Deprecated quantizer keys under their current names, in place (the old key's value wins:
    a composed config also holds the new key's default); returns the old names found."""
    found = [old for old in RENAMED if old in quantizer]
    with open_dict(quantizer) if isinstance(quantizer, DictConfig) else contextlib.nullcontext():
        for old in found:
            quantizer[RENAMED[old]] = quantizer.pop(old)
    return found


def rename_deprecated(cfg: DictConfig) -> None:
    """A user config or override may still say quantizer.codebook_entropy: it becomes
    quantizer.entropy_mode (in place, one DeprecationWarning), so runs record the new name."""
    for old in _rename(cfg.quantizer):
        warnings.warn(f"quantizer.{old} is deprecated: use quantizer.{RENAMED[old]}",
                      DeprecationWarning, stacklevel=3)


@functools.lru_cache(maxsize=1)
def _quantizer_keys() -> dict:
    """Every quantizer key with its value in conf/quantizer/gq.yaml (the base of the others)."""
    return OmegaConf.to_container(OmegaConf.load(CONF / "quantizer" / "gq.yaml"))


def upgrade_saved(config: Mapping) -> dict:
    """A config saved by an older version (a checkpoint's config, a tokenizer's config.json) as
    the current conf/ names it: deprecated quantizer keys renamed (silently: the file is not
    the user's to fix), keys added since filled with conf/quantizer/gq.yaml's values."""
    out = dict(config)
    if isinstance(out.get("quantizer"), Mapping):
        quantizer = dict(out["quantizer"])
        _rename(quantizer)
        out["quantizer"] = {**_quantizer_keys(), **quantizer}
    return out


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    _expect(is_int_at_least(value, 1), key, "a positive integer", value)
    return value


def _booleans(cfg: DictConfig, keys, default=None) -> None:
    """Each of these dotted keys is true or false (an absent one counts as ``default``)."""
    for key in keys:
        value = OmegaConf.select(cfg, key, default=default)
        _expect(isinstance(value, bool), key, "true or false", value)


def _one_of(cfg: DictConfig, key: str, allowed) -> None:
    value = OmegaConf.select(cfg, key)
    _expect(value in allowed, key, "one of " + "|".join(allowed), value)


def compile_options(cfg: DictConfig) -> dict:
    """Inductor options of ``train.compile_mode`` (torch.compile's modes) updated by
    ``train.compile_options`` (nested keys joined with dots: {triton: {cudagraphs: true}})."""
    from torch._inductor import list_mode_options

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    extra = OmegaConf.to_container(cfg.train.compile_options, resolve=True) or {}
    return {**list_mode_options(cfg.train.compile_mode), **dict(flat(extra))}


def use_compile_cache(cfg: DictConfig) -> None:
    """Point torch.compile's on-disk cache at ``compile_cache_dir`` (TORCHINDUCTOR_CACHE_DIR; it
    keys entries by torch/Triton version and GPU, so nodes may share it); null keeps /tmp.
    A TORCHINDUCTOR_CACHE_DIR the user exported wins; Inductor's own default, which importing
    torch._inductor writes into the environment, does not. Call before the first compile."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    path, current = cfg.get("compile_cache_dir"), os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if path is not None and current in (None, "", os.path.abspath(default_cache_dir())):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(path).expanduser().absolute())


def validate_eval(cfg: DictConfig) -> None:
    """Check the eval group (also of a saved run's config, whose older keys may be absent)."""
    from wetok.metrics import METRICS

    ev = cfg.eval
    _positive_int(cfg, "eval.batch_size")
    num = ev.get("num_images")
    _expect(num is None or is_int_at_least(num, 1), "eval.num_images",
            "null (the whole split) or a positive integer", num)
    workers = ev.get("num_workers", 0)
    _expect(is_int_at_least(workers, 0), "eval.num_workers", "a non-negative integer", workers)
    _booleans(cfg, ("eval.compile", "eval.cudnn_benchmark"), default=False)  # older runs: absent
    mode = ev.get("compile_mode", "default")
    _expect(mode in COMPILE_MODES, "eval.compile_mode", "one of " + "|".join(COMPILE_MODES), mode)
    for name in ev.metrics:
        _expect(name in METRICS, "eval.metrics", "items from " + "|".join(METRICS), name)


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Check a composed config; raise ConfigError (one line) on the first problem. A deprecated
    key is renamed first (:func:`rename_deprecated`)."""
    from wetok.losses import check_loss, loss_arguments
    from wetok.model import check_channels, resolve_channel_mult

    rename_deprecated(cfg)
    q = cfg.quantizer
    with _checked("quantizer"):
        check_quantizer(q.groups, q.group_dim, q.tau, q.entropy_mode, q.entropy_reduction,
                        q.entropy_eps)
    _expect(q.dim is None or q.dim == q.groups * q.group_dim, "quantizer.dim",
            f"d = groups * group_dim = {q.groups} * {q.group_dim} = {q.groups * q.group_dim}",
            q.dim)

    channels = _positive_int(cfg, "model.channels")
    _positive_int(cfg, "model.num_res_blocks")
    down = _positive_int(cfg, "model.downsample")
    with _checked("model"):
        check_channels(channels)
        resolve_channel_mult(cfg.model)

    from wetok.data import validate_data_cfg

    try:
        validate_data_cfg(cfg.data)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    size = cfg.data.image_size
    _expect(size % down == 0, "data.image_size",
            f"a multiple of the downsampling factor {down}", size)

    _one_of(cfg, "schedule.name", SCHEDULES)
    _expect(0 <= cfg.schedule.end_ratio <= 1, "schedule.end_ratio", "a value in [0, 1]",
            cfg.schedule.end_ratio)
    with _checked("loss"):
        loss_arguments(cfg.loss, q)
        check_loss(cfg.loss.recon, cfg.loss.gen_loss)
    _one_of(cfg, "train.precision", PRECISIONS)
    _one_of(cfg, "train.device", DEVICES)
    _one_of(cfg, "train.compile_mode", COMPILE_MODES)
    _booleans(cfg, ("train.compile", "train.channels_last", "train.cudnn_benchmark",
                    "train.deterministic"))
    cache = cfg.get("compile_cache_dir")
    _expect(cache is None or isinstance(cache, str), "compile_cache_dir", "null or a folder", cache)
    if cfg.train.compile:
        import torch._inductor.config as inductor

        known = inductor.get_config_copy()
        for name in compile_options(cfg):
            _expect(name in known, "train.compile_options", "torch._inductor.config option names",
                    name)
    validate_eval(cfg)
    if cfg.logger.wandb:
        _one_of(cfg, "logger.mode", WANDB_MODES)

    for key, low in (("train.num_workers", 0), ("train.cpu_threads", 1)):
        value = OmegaConf.select(cfg, key)
        ok = value is None or is_int_at_least(value, low)
        _expect(ok, key, f"null (auto) or an integer >= {low}", value)
    timeout = cfg.train.dist_timeout_s
    _expect(isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0,
            "train.dist_timeout_s", "a positive number of seconds", timeout)
    steps = _positive_int(cfg, "train.steps")
    _expect(cfg.schedule.warmup_steps < steps or cfg.schedule.name == "constant",
            "schedule.warmup_steps", f"fewer than train.steps={steps}", cfg.schedule.warmup_steps)
    batch = _positive_int(cfg, "train.batch_size")
    global_batch = cfg.train.global_batch_size
    if global_batch is not None:
        _expect(isinstance(global_batch, int) and global_batch % (batch * world_size) == 0,
                "train.global_batch_size",
                f"a multiple of batch_size x world size = {batch} x {world_size}", global_batch)

    _expect(cfg.stage in (1, 2), "stage", "1 (reconstruction) or 2 (generative decoder)", cfg.stage)
    if cfg.stage == 2:
        _expect(cfg.init_from is not None, "init_from",
                "a stage-1 checkpoint path for stage 2", cfg.init_from)


def check_init_from(cfg: DictConfig) -> Path:
    """The stage-1 checkpoint must exist before a stage-2 run allocates anything."""
    path = Path(cfg.init_from)
    _expect(path.is_file(), "init_from", "an existing stage-1 checkpoint file", str(path))
    return path


def accumulation_steps(cfg: DictConfig, world_size: int) -> int:
    """Micro-batches per optimizer step so that the global batch is reached."""
    if cfg.train.global_batch_size is None:
        return 1
    return cfg.train.global_batch_size // (cfg.train.batch_size * world_size)
