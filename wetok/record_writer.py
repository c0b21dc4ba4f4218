"""Writes run records: metrics.jsonl + summary.json in the run folder (always), W&B on rank 0
(optional). The format is wetok.record_schema; analysis.record_reader reads it back.

The local record is the source of truth for analysis/: W&B offline runs cannot be read back.
W&B never stops a run: an init or log failure falls back to offline, then to local-only.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from wetok.checkpoint import atomic_write_text
from wetok.record_schema import (CONFIG_FILE, METRICS_FILE, SCHEMA_VERSION, SUMMARY_FILE,
                                 check_summary_fields)

log = logging.getLogger(__name__)

CHOICE_GROUPS = ("quantizer", "model", "schedule", "data", "loss", "optim", "experiment", "scale")


def flat_params(cfg: DictConfig) -> dict:
    """The resolved config flattened with the paper's names: {"quantizer.groups": 4, ...}."""
    out = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, name + ".")
            else:
                out[name] = value

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def config_choices(cfg: DictConfig) -> dict:
    """Which option of each config group built this run (from Hydra when it ran the job)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not running under Hydra (tests calling train() directly)
        choices = {}
    picked = {g: choices.get(g) for g in CHOICE_GROUPS if choices.get(g) is not None}
    for group in ("quantizer", "model"):
        picked.setdefault(group, cfg[group].get("name"))
    picked.setdefault("data", cfg.data.name)
    picked.setdefault("schedule", cfg.schedule.name)
    return picked


class RecordWriter:
    """Writes metrics.jsonl and summary.json (rank 0) and mirrors them to W&B when enabled."""

    def __init__(self, run_dir: Path, cfg: DictConfig, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.cfg = cfg
        self.summary: dict = {}
        self.wandb = None
        self.t0 = time.time()
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.run_dir / CONFIG_FILE, OmegaConf.to_yaml(cfg, resolve=True))
        summary_path = self.run_dir / SUMMARY_FILE
        if summary_path.exists():  # resumed run: keep what earlier attempts counted
            self.summary = json.loads(summary_path.read_text())
        self.summary.update(
            schema_version=SCHEMA_VERSION, name=cfg.name, sweep=cfg.sweep, stage=cfg.stage,
            status="running", choices=config_choices(cfg), params=flat_params(cfg),
        )
        self.summary.setdefault("wall_time_s", 0.0)
        self.summary.setdefault("counts", {})
        self.summary.setdefault("skipped", {})
        self._wall_before = self.summary["wall_time_s"]
        if cfg.logger.wandb:
            self.wandb = start_wandb(cfg, self.summary["params"], self.summary["choices"])

    def log(self, step: int, split: str, values: dict, images: dict | None = None) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time_s": round(time.time() - self.t0, 3), "split": split, **values}
        with open(self.run_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            prefix = "" if split == "train" else f"{split}/"
            payload = {f"{prefix}{k}": v for k, v in values.items()}
            if images:
                payload.update({k: self.wandb.Image(v) for k, v in images.items()})
            self._wandb_call(lambda: self.wandb.log(payload, step=step))

    def update(self, status: str | None = None, **fields) -> None:
        """Merge fields (wetok.record_schema.SUMMARY_FIELDS) into summary.json and write it
        atomically."""
        check_summary_fields(fields)
        if not self.enabled:
            return
        for key, value in fields.items():
            if isinstance(value, dict) and isinstance(self.summary.get(key), dict):
                self.summary[key].update(value)
            else:
                self.summary[key] = value
        if status:
            self.summary["status"] = status
        self.summary["wall_time_s"] = round(self._wall_before + time.time() - self.t0, 2)
        atomic_write_text(self.run_dir / SUMMARY_FILE, json.dumps(self.summary, indent=2))
        if self.wandb is not None and status in ("finished", "failed"):
            final = dict(self.summary.get("final", {}))
            final.update({f"baselines/{name}/{k}": v  # the trivial predictors (wetok.baselines)
                          for name, vals in self.summary.get("baselines", {}).items()
                          for k, v in vals.items()})
            self._wandb_call(lambda: self.wandb.summary.update(final))
            self._wandb_call(lambda: self.wandb.finish(exit_code=0 if status == "finished" else 1))
            self.wandb = None

    def _wandb_call(self, fn) -> None:
        try:
            fn()
        except Exception as exc:  # W&B must never stop training
            log.warning("W&B call failed (%s); continuing with local records only", exc)
            self.wandb = None


def log_table(cfg: DictConfig, key: str, rows: list[dict]) -> None:
    """One W&B table (e.g. the memory table) in a run of its own; never raises."""
    run = start_wandb(cfg, flat_params(cfg), {})
    if run is None:
        return
    try:
        import wandb

        run.log({key: wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        run.finish()
    except Exception as exc:
        log.warning("W&B table upload failed (%s); the local CSV is the record", exc)


def start_wandb(cfg: DictConfig, params: dict, choices: dict):
    """wandb.init on rank 0: online when possible, offline otherwise, None if even that fails."""
    try:
        import wandb
    except ImportError:
        log.warning("logger.wandb=true but wandb is not installed; local records only")
        return None
    mode = cfg.logger.mode
    if mode == "auto":
        has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
        mode = "online" if has_key else "offline"
    kwargs = dict(
        project=cfg.logger.project, entity=cfg.logger.entity, dir=str(cfg.run_dir),
        group=cfg.sweep or cfg.name, job_type=f"stage{cfg.stage}",
        tags=list(cfg.logger.tags) + [f"{k}:{v}" for k, v in choices.items()],
        name=Path(cfg.run_dir).name, id=_wandb_id(cfg), resume="allow",
        config=params,
    )
    for attempt in ([mode, "offline"] if mode == "online" else [mode]):
        try:
            settings = wandb.Settings(init_timeout=cfg.logger.get("init_timeout", 60))
            run = wandb.init(mode=attempt, settings=settings, **kwargs)
            run.define_metric("peak_mem_gib", summary="max")
            return run
        except Exception as exc:
            log.warning("wandb.init(mode=%s) failed: %s", attempt, exc)
    return None


def _wandb_id(cfg: DictConfig) -> str:
    """Stable W&B run id per run folder, so a requeued job continues the same W&B run."""
    return hashlib.sha1(str(Path(cfg.run_dir).resolve()).encode()).hexdigest()[:16]
