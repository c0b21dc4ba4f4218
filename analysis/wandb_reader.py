"""Reads the W&B mirror of run records (wetok.record_writer logs it) into load_runs' columns.

Needs a W&B API key and network; the local run folders (analysis.record_reader) are the source
of truth, this is for runs whose folders are elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from analysis.record_reader import (BASE_COLUMNS, baseline_row, coerce_numeric, hashable, number,
                                    numeric_columns, setting_id)
from wetok.record_schema import VAL_KEYS


def load_wandb(entity: str | None, project: str, group: str | None = None,
               api=None, timeout: int = 30) -> pd.DataFrame:
    """Runs of a W&B project (optionally one group = sweep name) with load_runs' columns.

    Mapping (wetok/record_writer.py writes it): config = summary params (flat dotted keys);
    group = sweep; job_type "stageN" = stage; tags "group:option" = choices; W&B summary
    holds the final val metrics (plain names, or val/<metric> from the history).
    Needs a W&B API key (WANDB_API_KEY or ~/.netrc) and network; raises RuntimeError otherwise.
    """
    if api is None:
        try:
            import wandb
        except ImportError as exc:
            raise RuntimeError("load_wandb needs the wandb package (pip install wandb)") from exc
        if not (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()):
            raise RuntimeError(
                "load_wandb: no W&B API key (set WANDB_API_KEY or run `wandb login`); "
                "use load_runs(<sweep folder>) on the local records instead")
        try:
            api = wandb.Api(timeout=timeout)
        except Exception as exc:
            raise RuntimeError(f"load_wandb: could not reach W&B ({exc}); use load_runs on the "
                               "local records instead") from exc
    path = f"{entity}/{project}" if entity else project
    try:
        wb_runs = list(api.runs(path, filters={"group": group} if group else None))
    except Exception as exc:
        raise RuntimeError(f"load_wandb: listing runs of {path!r} failed: {exc}") from exc
    rows = [_wandb_row(r) for r in wb_runs]
    if not rows:
        return pd.DataFrame(columns=[*BASE_COLUMNS, "skipped", "final_from"])
    df = pd.DataFrame(rows)
    coerce_numeric(df, numeric_columns(df))
    return df


def _wandb_row(run) -> dict:
    config = {k: v for k, v in dict(run.config or {}).items() if not k.startswith("_")}
    summary = _summary_dict(run.summary)
    stage = config.get("stage")
    job_type = getattr(run, "job_type", None) or ""
    if stage is None and job_type.startswith("stage"):
        stage = job_type[len("stage"):]
    row = {
        "run": run.name,
        "path": getattr(run, "url", None) or "/".join(getattr(run, "path", []) or []),
        "name": config.get("name", run.name),
        "sweep": getattr(run, "group", None) or config.get("sweep"),
        "stage": stage,
        "status": getattr(run, "state", None),
        "steps": summary.get("_step", config.get("train.steps")),
        "wall_time_s": summary.get("_runtime"),
        "peak_mem_gib": number(_max_summary(summary.get("peak_mem_gib"))),
    }
    for tag in getattr(run, "tags", None) or []:
        if ":" in tag:
            group, option = tag.split(":", 1)
            row[f"choice.{group}"] = option
    for key, value in config.items():
        row.setdefault(key, hashable(value))
    for metric in VAL_KEYS:
        value = summary.get(metric, summary.get(f"val/{metric}"))
        if value is not None:
            row[f"final.{metric}"] = number(value)
    nested = {}  # wetok/record_writer.py logs them as baselines/<name>/<metric>
    for key, value in summary.items():
        if key.startswith("baselines/") and key.count("/") == 2:
            _, name, metric = key.split("/")
            nested.setdefault(name, {})[metric] = value
    row.update(baseline_row(summary.get("baselines") or nested))
    row["setting"] = setting_id(config, stage, {k[len("choice."):]: v for k, v in row.items()
                                                if k.startswith("choice.")})
    row["final_from"] = "wandb"
    row["skipped"] = {}
    return row


def _summary_dict(summary) -> dict:
    if summary is None:
        return {}
    raw = getattr(summary, "_json_dict", None)
    if isinstance(raw, dict):
        return raw
    try:
        return dict(summary)
    except Exception:
        return {}


def _max_summary(value):
    return value.get("max") if isinstance(value, dict) else value


def _netrc_has_wandb() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "wandb" in netrc.read_text()
    except OSError:
        return False
