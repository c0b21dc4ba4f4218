"""Generic tables of run records: metric names and formats, setting labels, run order, which
metrics have values, and markdown tables (per run, per setting over seeds, row x column grids).

They take record_reader frames (load_runs, load_history) and never raise on missing data: a
metric that is missing or all-NaN is left out, and omitted_note says so.
"""
from __future__ import annotations

import math

import pandas as pd

from analysis import spread
from wetok.record_schema import VAL_KEYS

# Every validation metric of the records: the paper's five, then codebook usage.
TABLE_METRICS = VAL_KEYS

METRIC_NAMES = {
    "val_loss": "val loss", "rfid": "rFID", "lpips": "LPIPS", "ssim": "SSIM", "psnr": "PSNR",
    "usage": "usage", "joint_codes": "joint codes", "peak_mem_gib": "peak mem (GiB)",
    "wall_time_s": "wall time (s)", "steps": "steps", "loss": "train loss",
    "token_entropy": "token entropy", "codebook_entropy": "codebook entropy",
}
LOWER_IS_BETTER = {"val_loss", "rfid", "lpips", "loss"}
HIGHER_IS_BETTER = {"ssim", "psnr", "usage", "joint_codes"}
FORMATS = {
    "val_loss": "{:.4f}", "rfid": "{:.2f}", "lpips": "{:.4f}", "ssim": "{:.4f}",
    "psnr": "{:.2f}", "usage": "{:.3f}", "joint_codes": "{:.0f}", "peak_mem_gib": "{:.2f}",
    "peak_gib": "{:.2f}", "wall_time_s": "{:.0f}", "steps": "{:.0f}",
}
# How option names of the config groups read in a legend.
DISPLAY = {
    "lfq": "LFQ", "bsq": "BSQ", "gq": "GQ", "imagenet": "ImageNet", "general": "GD",
    "bundled": "bundled photos", "constant": "constant LR", "warmup_cosine": "warm-up + cosine",
    # experiment presets of Fig 6 (at scale=quick both read the bundled photos)
    "table26_imagenet": "ImageNet", "table27_general": "GD", "table28_warmup_cosine": "GD",
    # wetok.memory methods
    "lfq_naive": "LFQ (naive entropy)", "lfq_exact": "LFQ (exact entropy)",
}
# Parameters that may tell settings apart (in this order) when the choices do not.
SETTING_PARAMS = (
    ("quantizer.groups", "g"), ("quantizer.group_dim", "d'"), ("quantizer.dim", "d"),
    ("quantizer.entropy_mode", "entropy"), ("quantizer.entropy_reduction", "H over g"),
    ("model.channels", "C"),
    ("model.num_res_blocks", "B"), ("schedule.name", ""), ("data.name", ""),
    ("optim.lr", "lr"), ("train.steps", "steps"), ("seed", "seed"),
)
MISSING = "—"


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def metric_title(metric: str) -> str:
    """The metric's name with an arrow saying which way is better: "PSNR ↑"."""
    return metric_name(metric) + arrow(metric)


def arrow(metric: str) -> str:
    return " ↓" if metric in LOWER_IS_BETTER else " ↑" if metric in HIGHER_IS_BETTER else ""


def fmt(metric: str, value) -> str:
    """A metric value as the tables print it ("—" for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    try:
        return FORMATS.get(metric, "{:.4g}").format(float(value))
    except (TypeError, ValueError):
        return str(value)


# ----------------------------------------------------------------------------- settings
def display_name(value) -> str:
    """A config value as a legend shows it (DISPLAY names; 4.0 as 4)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return DISPLAY.get(str(value), str(value))


def varies(runs: pd.DataFrame, col: str) -> bool:
    """Whether the runs differ in column col."""
    if col not in runs.columns:
        return False
    return runs[col].astype(str).nunique(dropna=False) > 1


def setting_labels(runs: pd.DataFrame, keys=None, exclude=(), unique: bool = True,
                   fill: bool = True) -> pd.Series:
    """A short legend label per run, e.g. "GQ", "g=4", "C=256, B=4".

    keys: [(column, prefix)] to use; default: the choice.* columns that differ between runs,
    then SETTING_PARAMS that differ, until labels are unique. Unique labels get the run name
    appended where still ambiguous (unique=True); empty labels become the run name (fill=True).
    """
    if runs.empty:
        return pd.Series([], dtype=str, index=runs.index)
    if keys is None:
        keys = [(c, "") for c in runs.columns
                if c.startswith("choice.") and c not in exclude and varies(runs, c)]
        labels = _labels_from(runs, keys)
        for col, prefix in SETTING_PARAMS:
            if labels.nunique() == len(runs):
                break
            if col not in exclude and varies(runs, col):
                keys.append((col, prefix))
                labels = _labels_from(runs, keys)
    else:
        labels = _labels_from(runs, [(c, p) for c, p in keys if c in runs.columns])
    if fill:
        labels = labels.where(labels != "", runs["run"].astype(str))
    if unique and labels.duplicated(keep=False).any():
        dup = labels.duplicated(keep=False)
        labels = labels.where(~dup, labels + " (" + runs["run"].astype(str) + ")")
    return labels


def _labels_from(runs: pd.DataFrame, keys) -> pd.Series:
    def one(row):
        parts = []
        for col, prefix in keys:
            value = row.get(col)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            parts.append(f"{prefix}={display_name(value)}" if prefix else display_name(value))
        return ", ".join(parts)

    return runs.apply(one, axis=1).astype(str) if len(runs) else pd.Series([], dtype=str)


def order_runs(runs: pd.DataFrame, by=()) -> pd.DataFrame:
    """Runs sorted by the given columns (numbers numerically), then by run name."""
    cols = [c for c in by if c in runs.columns]
    if runs.empty or not cols:
        return runs.reset_index(drop=True)
    keyed = runs.copy()
    sort_cols = []
    for i, col in enumerate(cols):
        numeric = pd.to_numeric(keyed[col], errors="coerce")
        keyed[f"__k{i}"] = numeric if numeric.notna().all() else keyed[col].astype(str)
        sort_cols.append(f"__k{i}")
    keyed = keyed.sort_values(sort_cols + ["run"], kind="stable")
    return keyed.drop(columns=sort_cols).reset_index(drop=True)


# ----------------------------------------------------------------------------- availability
def present_final(runs: pd.DataFrame, metrics) -> tuple[list, list]:
    """(metrics with at least one finite final value, the others)."""
    present, missing = [], []
    for m in metrics:
        col = f"final.{m}"
        ok = col in runs.columns and pd.to_numeric(runs[col], errors="coerce").notna().any()
        (present if ok else missing).append(m)
    return present, missing


def present_history(history: pd.DataFrame, metrics, split: str = "val") -> tuple[list, list]:
    rows = history[history["split"] == split] if "split" in history.columns else history.iloc[:0]
    present, missing = [], []
    for m in metrics:
        ok = m in rows.columns and pd.to_numeric(rows[m], errors="coerce").notna().any()
        (present if ok else missing).append(m)
    return present, missing


def omitted_note(runs: pd.DataFrame, missing, where: str = "") -> str:
    """'Omitted (no values): rFID (skipped: no Inception weights).'"""
    if not missing:
        return ""
    parts = []
    for m in missing:
        reasons = set()
        if "skipped" in runs.columns:
            for skipped in runs["skipped"]:
                if isinstance(skipped, dict) and skipped.get(m):
                    reasons.add(str(skipped[m]))
        why = f" (skipped: {'; '.join(sorted(reasons))})" if reasons else ""
        parts.append(f"{metric_name(m)}{why}")
    where = f" {where}" if where else ""
    return f"_Omitted{where} (no values in these records): {', '.join(parts)}._"


# ----------------------------------------------------------------------------- tables
def md_table(df: pd.DataFrame, index: bool = False) -> str:
    """A pipe table (no tabulate dependency)."""
    if index:
        df = df.reset_index()
    if df.empty:
        return "_(no rows)_"
    cells = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    head = "| " + " | ".join(cells(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cells(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def final_table(runs: pd.DataFrame, metrics=TABLE_METRICS, labels=None,
                extra=("steps",), bold_best: bool = True) -> tuple[pd.DataFrame, list]:
    """Final metrics per run as formatted strings; returns (table, omitted metrics).

    Columns: setting, seed (when seeds differ), run, one per present metric (best value in
    bold), the baselines' PSNR and SSIM and the run's place against them (spread.run_flags),
    extra columns, and status when a run has not finished (its values are then its last
    validation row).
    """
    present, missing = present_final(runs, metrics)
    labels = setting_labels(runs) if labels is None else labels
    table = pd.DataFrame({"setting": list(labels), "run": list(runs["run"])})
    if varies(runs, "seed"):
        table.insert(1, "seed", [display_name(s) for s in runs["seed"]])
    add_final_columns(table, runs, present, bold_best)
    for col in extra:
        if col in runs.columns and pd.to_numeric(runs[col], errors="coerce").notna().any():
            table[metric_name(col)] = [fmt(col, v) for v in runs[col]]
    if "status" in runs.columns and (runs["status"].fillna("") != "finished").any():
        table["status"] = [
            f"{s} (last val row)" if f == "history"
            else f"{s} (eval.json of its last checkpoint)" if f == "eval.json" else str(s)
            for s, f in zip(runs["status"].fillna("?"),
                            runs.get("final_from", pd.Series([None] * len(runs))))]
    return table, missing


def add_final_columns(table: pd.DataFrame, runs: pd.DataFrame, metrics,
                      bold_best: bool = True) -> None:
    """Add to a per-run table one column per metric (final values, the best in bold), the
    baselines' PSNR and SSIM, and the run's place against them (spread.run_flags)."""
    for m in metrics:
        values = pd.to_numeric(runs[f"final.{m}"], errors="coerce")
        best = best_value(values, m) if bold_best and len(runs) > 1 else None
        table[metric_title(m)] = [
            (f"**{fmt(m, v)}**" if best is not None and v == best else fmt(m, v))
            for v in values]
    for col, cells in spread.baseline_cells(runs, fmt).items():
        table[col] = cells
    table["vs baselines"] = spread.run_flags(runs)


def settings_table(per_setting: pd.DataFrame, metrics=TABLE_METRICS) -> pd.DataFrame:
    """spread.settings() formatted: setting, seeds, mean ± std [min, max] per metric (best
    mean in bold), the baselines (mean over seeds) and the worst place against them."""
    table = pd.DataFrame({"setting": list(per_setting["label"]), "seeds": list(per_setting["n"])})
    for m in metrics:
        if f"{m}.n" not in per_setting.columns or not per_setting[f"{m}.n"].any():
            continue
        best = best_value(per_setting[f"{m}.mean"], m) if len(per_setting) > 1 else None
        table[metric_title(m)] = [
            (f"**{cell}**" if best is not None and row[f"{m}.mean"] == best else cell)
            for cell, (_, row) in zip(
                [spread.spread_cell(r, m, fmt) for _, r in per_setting.iterrows()],
                per_setting.iterrows())]
    for col, cells in spread.baseline_cells(per_setting, fmt).items():
        table[col] = cells
    table["vs baselines"] = list(per_setting["flag"])
    return table


def best_value(values: pd.Series, metric: str):
    """The best of values for metric (None when it has no direction or nothing to choose)."""
    finite = values.dropna()
    if finite.empty or finite.nunique() < 2:
        return None
    if metric in LOWER_IS_BETTER:
        return finite.min()
    if metric in HIGHER_IS_BETTER:
        return finite.max()
    return None


def grid_table(runs: pd.DataFrame, row: str, col: str, metric: str,
               row_prefix: str = "", col_prefix: str = "") -> pd.DataFrame | None:
    """final.<metric> (mean over seeds) pivoted row x col (e.g. C x B for Fig 5); None when
    not available."""
    value = f"final.{metric}"
    if any(c not in runs.columns for c in (row, col, value)):
        return None
    data = runs[[row, col, value]].copy()
    data[value] = pd.to_numeric(data[value], errors="coerce")
    if data[value].isna().all():
        return None
    pivot = data.pivot_table(index=row, columns=col, values=value, aggfunc="mean")
    out = pivot.apply(lambda s: s.map(lambda v: fmt(metric, v)))
    out.index = [f"{row_prefix}={display_name(i)}" if row_prefix else display_name(i)
                 for i in out.index]
    out.columns = [f"{col_prefix}={display_name(c)}" if col_prefix else display_name(c)
                   for c in out.columns]
    out.index.name = metric_name(metric)
    return out
