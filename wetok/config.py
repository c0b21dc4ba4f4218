"""Config checks that run before anything is allocated, and the run-folder resolver.

Every error is one line: the key, what was expected, what was found.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wetok.quantize import CODEBOOK_MODES, REDUCTIONS

SCHEDULES = ("constant", "warmup_cosine")
RECON_LOSSES = ("l1", "l2")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu", "cuda")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
METRICS = ("psnr", "ssim", "lpips", "rfid")
WANDB_MODES = ("auto", "online", "offline", "disabled")


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
    if not (isinstance(seeds, int) and not isinstance(seeds, bool) and seeds > 0):
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


def _positive_int(cfg: DictConfig, key: str) -> int:
    value = OmegaConf.select(cfg, key)
    _expect(isinstance(value, int) and not isinstance(value, bool) and value > 0,
            key, "a positive integer", value)
    return value


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


def validate(cfg: DictConfig, world_size: int = 1) -> None:
    """Check a composed config; raise ConfigError (one line) on the first problem."""
    g = _positive_int(cfg, "quantizer.groups")
    d_prime = _positive_int(cfg, "quantizer.group_dim")
    d = cfg.quantizer.get("dim")
    _expect(d is None or d == g * d_prime, "quantizer.dim",
            f"d = groups * group_dim = {g} * {d_prime} = {g * d_prime}", d)
    _one_of(cfg, "quantizer.codebook_entropy", CODEBOOK_MODES)
    _one_of(cfg, "quantizer.entropy_reduction", REDUCTIONS)
    _expect(cfg.quantizer.tau > 0, "quantizer.tau", "a positive temperature", cfg.quantizer.tau)
    if cfg.quantizer.codebook_entropy == "grouped" or cfg.quantizer.codebook_entropy == "pooled":
        _expect(d_prime <= 16, "quantizer.group_dim",
                "at most 16 for grouped/pooled entropy (2^d' codes per group); use exact", d_prime)

    channels = _positive_int(cfg, "model.channels")
    _expect(channels % 32 == 0, "model.channels", "a multiple of 32 (GroupNorm with 32 groups)",
            channels)
    _positive_int(cfg, "model.num_res_blocks")
    down = _positive_int(cfg, "model.downsample")
    from wetok.model import resolve_channel_mult

    try:
        resolve_channel_mult(cfg.model)
    except ValueError as exc:
        raise ConfigError(f"config error: {exc}") from None

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
    _one_of(cfg, "loss.recon", RECON_LOSSES)
    _one_of(cfg, "train.precision", PRECISIONS)
    _one_of(cfg, "train.device", DEVICES)
    _one_of(cfg, "train.compile_mode", COMPILE_MODES)
    if cfg.train.compile:
        import torch._inductor.config as inductor

        known = inductor.get_config_copy()
        for name in compile_options(cfg):
            _expect(name in known, "train.compile_options", "torch._inductor.config option names",
                    name)
    _expect(isinstance(cfg.eval.num_workers, int) and cfg.eval.num_workers >= 0,
            "eval.num_workers", "a non-negative integer", cfg.eval.num_workers)
    _expect(isinstance(cfg.eval.compile, bool), "eval.compile", "true or false", cfg.eval.compile)
    for name in cfg.eval.metrics:
        _expect(name in METRICS, "eval.metrics", "items from " + "|".join(METRICS), name)
    if cfg.logger.wandb:
        _one_of(cfg, "logger.mode", WANDB_MODES)

    for key, low in (("train.num_workers", 0), ("train.cpu_threads", 1)):
        value = OmegaConf.select(cfg, key)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)
                               and value >= low)
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
