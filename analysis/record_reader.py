"""Reads run records into DataFrames; wetok.record_writer writes them, in the format of
wetok.record_schema (docs/DESIGN.md, "Records").

A run folder is any folder holding summary.json; metrics.jsonl beside it holds the history.
Readers are tolerant of what a live or crashed run leaves behind: status "running", no
`final`, a truncated last line in metrics.jsonl, steps logged twice after a resume, extra keys.
A summary without `schema_version` is version 1 (records written before the field existed);
one newer than this reader's SCHEMA_VERSION is skipped with a warning.

    runs = load_runs("runs/fig3_quantizer")        # one row per run
    hist = load_history("runs/fig3_quantizer")     # one row per (run, split, step)
    mem = load_memory("runs/tab1_memory/memory.csv")
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import pandas as pd

from wetok.config import RENAMED
from wetok.record_schema import (EVAL_FILE, MEMORY_COLUMNS, METRICS_FILE, METRICS_ROW_FIELDS,
                                 SCHEMA_VERSION, SUMMARY_FILE, VAL_KEYS, schema_version)

BASE_COLUMNS = ("run", "path", "name", "sweep", "stage", "status", "steps", "wall_time_s",
                "peak_mem_gib")
MEMORY_GLOB = "memory*.csv"
# Params that do not make a setting: the seed, and what only names, places or logs a run
# (conf/config.yaml's run-folder exclude_keys). Runs equal in all other params are one setting.
NOT_SETTING = ("seed", "seeds", "run_dir", "init_from", "name", "sweep", "eval.cache_dir",
               "train.num_workers", "train.log_every", "logger.", "weights.", "hydra.")


# ----------------------------------------------------------------------------- run folders
def find_run_dirs(sweep_dir) -> list[Path]:
    """Folders under sweep_dir (any depth, sweep_dir itself included) that hold summary.json."""
    root = Path(sweep_dir)
    if not root.exists():
        raise FileNotFoundError(f"no such sweep folder: {root}")
    found = [p.parent for p in root.rglob(SUMMARY_FILE) if p.is_file()]
    return sorted(set(found), key=lambda p: _natural_key(p.as_posix()))


def load_runs(sweep_dir, fill_final_from_history: bool = True) -> pd.DataFrame:
    """One row per run folder under sweep_dir.

    Columns: run (folder relative to sweep_dir), path, name, sweep, stage, status, steps,
    wall_time_s, peak_mem_gib, choice.<group>, every params key (flat dotted, e.g.
    quantizer.groups; lists become tuples), final.<metric>, baseline.<name>.<metric> (the
    trivial predictors scored on the same validation images: mean_colour, avg_pool; absent
    in older records), setting (the params but the seed, as one string: runs that differ only
    in seed share it), skipped (dict metric -> reason), final_from ("summary" | "history" |
    None) and counts.<key>.
    A run without `final` (still running, stopped, or failed) takes its values from eval.json
    (`python -m wetok.evaluate` of its last checkpoint) when there is one, else its last
    validation row from metrics.jsonl, when fill_final_from_history; final_from says which.
    Baselines missing from summary.json are taken from eval.json.
    """
    root = Path(sweep_dir)
    rows = []
    for run_dir in find_run_dirs(root):
        summary = _read_summary(run_dir / SUMMARY_FILE)
        if summary is None:
            continue
        rows.append(_run_row(root, run_dir, summary, fill_final_from_history))
    if not rows:
        return pd.DataFrame(columns=[*BASE_COLUMNS, "skipped", "final_from"])
    df = pd.DataFrame(rows)
    coerce_numeric(df, numeric_columns(df))
    front = [c for c in BASE_COLUMNS if c in df.columns]
    choice = sorted(c for c in df.columns if c.startswith("choice."))
    final = [f"final.{m}" for m in VAL_KEYS if f"final.{m}" in df.columns]
    final += sorted(c for c in df.columns if c.startswith("final.") and c not in final)
    rest = [c for c in df.columns if c not in {*front, *choice, *final}]
    return df[front + choice + final + rest].reset_index(drop=True)


def _run_row(root: Path, run_dir: Path, summary: dict, fill_final: bool) -> dict:
    rel = run_dir.relative_to(root).as_posix()
    row = {
        "run": run_dir.name if rel == "." else rel,
        "path": str(run_dir),
        "name": summary.get("name"),
        "sweep": summary.get("sweep"),
        "stage": summary.get("stage"),
        "status": summary.get("status"),
        "steps": summary.get("steps"),
        "wall_time_s": summary.get("wall_time_s"),
        "peak_mem_gib": summary.get("peak_mem_gib"),
    }
    for group, option in (summary.get("choices") or {}).items():
        row[f"choice.{group}"] = option
    for key, value in (summary.get("params") or {}).items():
        row.setdefault(key, hashable(value))  # summary fields win over same-named params
    final = summary.get("final") or {}
    for metric, value in final.items():
        row[f"final.{metric}"] = _metric(value)
    row.update(baseline_row(summary.get("baselines")))
    row["setting"] = setting_id(summary.get("params") or {}, summary.get("stage"),
                                summary.get("choices"))
    row["final_from"] = "summary" if final else None
    evaluated = _read_json(run_dir / EVAL_FILE) if (run_dir / EVAL_FILE).is_file() else None
    if fill_final and not final and evaluated and isinstance(evaluated.get("values"), dict):
        # a run stopped before its final evaluation, evaluated afterwards (python -m
        # wetok.evaluate): its last checkpoint's metrics
        final = evaluated["values"]
        for metric, value in final.items():
            row[f"final.{metric}"] = _metric(value)
        row["final_from"] = "eval.json"
        row["steps"] = evaluated.get("step", row["steps"])
    if evaluated and not any(k.startswith("baseline.") for k in row):
        row.update(baseline_row(evaluated.get("baselines")))
    if fill_final and not final:
        last = _last_val_row(run_dir / METRICS_FILE)
        if last:
            for metric, value in last.items():
                if metric not in METRICS_ROW_FIELDS:
                    row[f"final.{metric}"] = _metric(value)
            row["final_from"] = "history"
            row["steps"] = last.get("step", row["steps"])  # the step those values belong to
    row["skipped"] = dict(summary.get("skipped") or {})
    for key, value in (summary.get("counts") or {}).items():
        row[f"counts.{key}"] = value
    return row


def load_history(sweep_dir, runs=None) -> pd.DataFrame:
    """All metrics.jsonl rows, wide: one row per (run, split, step), one column per metric.

    A step logged twice (a resumed run repeats steps after its last checkpoint) keeps the last
    row. runs: optional iterable of run names (load_runs' `run`) to keep.
    """
    root = Path(sweep_dir)
    keep = None if runs is None else set(runs)
    frames = []
    for run_dir in find_run_dirs(root):
        rel = run_dir.relative_to(root).as_posix()
        run = run_dir.name if rel == "." else rel
        if keep is not None and run not in keep:
            continue
        rows = list(_read_jsonl(run_dir / METRICS_FILE))
        if rows:
            frame = pd.DataFrame(rows)
            frame.insert(0, "run", run)
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["run", "split", "step", "time_s"])
    df = pd.concat(frames, ignore_index=True)
    if "split" not in df.columns:
        df["split"] = "train"
    df["split"] = df["split"].fillna("train")
    df["step"] = pd.to_numeric(df["step"], errors="coerce")
    df = df.dropna(subset=["step"])
    df["step"] = df["step"].astype(int)
    df = df.drop_duplicates(subset=["run", "split", "step"], keep="last")
    coerce_numeric(df, [c for c in df.columns if c not in ("run", "split")])
    front = ["run", "split", "step"] + (["time_s"] if "time_s" in df.columns else [])
    df = df[front + [c for c in df.columns if c not in front]]
    df = df.sort_values(["run", "split", "step"], key=_sort_key).reset_index(drop=True)
    return df


def select_sweep(runs: pd.DataFrame, sweep: str | None) -> pd.DataFrame:
    """Rows whose summary `sweep` is `sweep`; else those whose sweep starts with it
    (fig5_architecture_tables for fig5_architecture); else all rows (a folder of runs
    launched without a sweep name)."""
    if not sweep or runs.empty or "sweep" not in runs.columns:
        return runs
    names = runs["sweep"].fillna("").astype(str)
    for mask in (names == sweep, names.str.startswith(sweep)):
        if mask.any():
            return runs[mask].reset_index(drop=True)
    return runs


def sweep_names(runs: pd.DataFrame) -> list[str]:
    if runs.empty or "sweep" not in runs.columns:
        return []
    return sorted({str(s) for s in runs["sweep"].dropna()})


def setting_id(params: dict, stage=None, choices=None) -> str:
    """The run's setting: its params (and stage, and config-group choices: two presets may
    hold the same values) without NOT_SETTING keys, as sorted JSON."""
    kept = {k: v for k, v in params.items()
            if not any(k == n or (n.endswith(".") and k.startswith(n)) for n in NOT_SETTING)}
    kept["stage"] = params.get("stage", stage)
    kept.update({f"choice.{k}": v for k, v in (choices or {}).items()})
    return json.dumps(kept, sort_keys=True, default=str)


def baseline_row(baselines) -> dict:
    """{"mean_colour": {"psnr": .., "ssim": ..}, ...} -> {"baseline.mean_colour.psnr": .., ...}"""
    if not isinstance(baselines, dict):
        return {}
    return {f"baseline.{name}.{metric}": _metric(value)
            for name, scores in baselines.items() if isinstance(scores, dict)
            for metric, value in scores.items()}


def numeric_columns(df: pd.DataFrame) -> list:
    return [c for c in df.columns if c.startswith(("final.", "baseline."))
            or c in ("steps", "wall_time_s", "peak_mem_gib", "stage")]


# ----------------------------------------------------------------------------- memory table
def load_memory(path) -> pd.DataFrame:
    """The memory table of `python -m wetok.memory` (paper Table 1).

    path: the CSV, or a folder searched (any depth) for memory*.csv (several are concatenated).
    Columns: method (lfq_naive, lfq_exact, bsq, gq, ...), d, g, d_prime (Int64, NA when
    empty), peak_gib (float, NaN when not measured), status ("ok", "OOM", "n/a", ...), device,
    then any extra columns, and source (the CSV it came from).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(path.rglob(MEMORY_GLOB))
        if not files:
            raise FileNotFoundError(f"no {MEMORY_GLOB} under {path}")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no such memory table: {path}")
    frames = []
    for file in files:
        # keep_default_na=False: the status "n/a" stays a string; numbers are coerced below
        frame = pd.read_csv(file, dtype=str, keep_default_na=False)
        missing = [c for c in MEMORY_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{file}: memory table lacks columns {missing}; "
                             f"expected {list(MEMORY_COLUMNS)}")
        frame["source"] = str(file)
        frames.append(frame)
    df = pd.concat(frames, ignore_index=True)
    for col in ("d", "g", "d_prime"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["peak_gib"] = pd.to_numeric(df["peak_gib"], errors="coerce")
    df["status"] = df["status"].fillna("").astype(str).str.strip()
    df["method"] = df["method"].astype(str).str.strip()
    df["device"] = df["device"].fillna("").astype(str)
    return df


def find_memory_csv(path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path] if path.suffix == ".csv" else []
    return sorted(path.rglob(MEMORY_GLOB)) if path.is_dir() else []


# ----------------------------------------------------------------------------- helpers
def _read_summary(path: Path) -> dict | None:
    """summary.json, or None (with a warning) when unreadable or of a newer format."""
    summary = _read_json(path)
    if summary is not None and schema_version(summary) > SCHEMA_VERSION:
        warnings.warn(f"skipping {path}: record format version {schema_version(summary)} is "
                      f"newer than this reader's ({SCHEMA_VERSION}); update wetok")
        return None
    if summary is not None and isinstance(summary.get("params"), dict):
        summary["params"] = {_current_key(k): v for k, v in summary["params"].items()}
    return summary


def _current_key(key: str) -> str:
    """A params key under its current name (records written before a key was renamed)."""
    group, _, name = key.rpartition(".")
    return f"quantizer.{RENAMED[name]}" if group == "quantizer" and name in RENAMED else key


def _read_json(path: Path):
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        warnings.warn(f"skipping {path}: unreadable ({exc})")
        return None
    if not isinstance(data, dict):
        warnings.warn(f"skipping {path}: not a JSON object")
        return None
    return data


def _read_jsonl(path: Path):
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if n != len(lines):  # a cut last line is normal for a killed run
                warnings.warn(f"{path}:{n}: unreadable line skipped")
            continue
        if isinstance(row, dict) and "step" in row:
            yield row


def _last_val_row(path: Path) -> dict | None:
    last = None
    for row in _read_jsonl(path):
        if row.get("split") == "val":
            if last is None or row["step"] >= last["step"]:
                last = row
    return last


def coerce_numeric(df: pd.DataFrame, cols) -> None:
    """Numbers as floats/ints in place; a column holding lists (usage_per_group) is kept, as
    tuples."""
    for col in cols:
        values = df[col]
        if values.map(lambda v: isinstance(v, (list, tuple))).any():
            df[col] = values.map(lambda v: tuple(v) if isinstance(v, list) else v)
        else:
            df[col] = pd.to_numeric(values, errors="coerce")


def _metric(value):
    return tuple(value) if isinstance(value, list) else number(value)


def number(value):
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def hashable(value):
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return value


def _natural_key(text: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _sort_key(col: pd.Series) -> pd.Series:
    if col.name == "run":
        order = {r: i for i, r in enumerate(sorted(set(col), key=_natural_key))}
        return col.map(order)
    return col
