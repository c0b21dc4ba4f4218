"""Seeds and trivial baselines: what makes an ablation table mean something.

- Settings: runs that differ only in their seed (records' `setting` column) are one setting;
  `settings()` gives one row per setting with the mean, std, min and max of each metric over
  its seeds.
- Orderings: setting A is better than B on a metric only when their seed ranges [min, max] do
  not overlap and both have at least MIN_SEEDS seeds ("resolved"); otherwise the ordering is
  unresolved (noise cannot be told apart from a difference).
- Baselines: every evaluation also scores two trivial predictors on the same validation
  images (records' `baseline.<name>.<metric>`): each image's mean colour, and average pooling
  by the model's downsampling factor upsampled bilinearly. A run whose PSNR is below the
  mean-colour baseline is flagged "below baseline".
"""
from __future__ import annotations

import itertools
import math

import pandas as pd

BASELINES = {"mean_colour": "mean colour", "avg_pool": "avg pool"}
BASELINE_METRICS = ("psnr", "ssim")
MIN_SEEDS = 2
MISSING = "—"
NO_BASELINES = ("_No baselines in these records (runs written before evaluations scored the "
                "trivial predictors): baseline columns show —._")


def baseline_col(name: str, metric: str) -> str:
    return f"baseline.{name}.{metric}"


def has_baselines(runs: pd.DataFrame) -> bool:
    return any(baseline_col(b, m) in runs.columns and runs[baseline_col(b, m)].notna().any()
               for b in BASELINES for m in BASELINE_METRICS)


def _num(runs: pd.DataFrame, col: str) -> pd.Series:
    if col not in runs.columns:
        return pd.Series(math.nan, index=runs.index, dtype=float)
    return pd.to_numeric(runs[col], errors="coerce")


def setting_keys(runs: pd.DataFrame) -> pd.Series:
    """The setting of each run (records' `setting`; the run itself when not recorded)."""
    if "setting" in runs.columns:
        return runs["setting"].fillna(runs["run"].astype(str)).astype(str)
    return runs["run"].astype(str)


def baseline_flag(psnr: float, mean_colour: float, avg_pool: float) -> str:
    """'below baseline' (PSNR under the mean-colour predictor), 'below avg pool', 'above both',
    or — when the record has no baselines."""
    if math.isnan(psnr) or (math.isnan(mean_colour) and math.isnan(avg_pool)):
        return MISSING
    if not math.isnan(mean_colour) and psnr < mean_colour:
        return "below baseline"
    if not math.isnan(avg_pool) and psnr < avg_pool:
        return "below avg pool"
    return "above both" if not math.isnan(avg_pool) and not math.isnan(mean_colour) else "above"


def run_flags(runs: pd.DataFrame) -> list[str]:
    psnr = _num(runs, "final.psnr")
    mc, ap = _num(runs, baseline_col("mean_colour", "psnr")), _num(runs, baseline_col("avg_pool",
                                                                                     "psnr"))
    return [baseline_flag(*v) for v in zip(psnr, mc, ap)]


def settings(runs: pd.DataFrame, metrics, labels) -> pd.DataFrame:
    """One row per setting (first-seen order): label, runs, seeds, n, and per metric m (and
    per baseline column) m.mean, m.std (NaN for one seed), m.min, m.max, m.n (finite values);
    flag: the worst baseline flag over its seeds, with a count when not all seeds share it."""
    keys = setting_keys(runs)
    labels = pd.Series(list(labels), index=runs.index).astype(str)
    cols = [f"final.{m}" for m in metrics] + [
        baseline_col(b, m) for b in BASELINES for m in BASELINE_METRICS]
    flags = pd.Series(run_flags(runs), index=runs.index)
    rows = []
    for key in dict.fromkeys(keys):
        part = runs[keys == key]
        row = {"setting": key, "label": labels[part.index[0]], "runs": list(part["run"]),
               "seeds": list(part["seed"]) if "seed" in part.columns else [], "n": len(part)}
        for col in cols:
            v = _num(part, col).dropna()
            name = col[len("final."):] if col.startswith("final.") else col
            row.update({f"{name}.mean": v.mean() if len(v) else math.nan,
                        f"{name}.std": v.std(ddof=1) if len(v) > 1 else math.nan,
                        f"{name}.min": v.min() if len(v) else math.nan,
                        f"{name}.max": v.max() if len(v) else math.nan, f"{name}.n": len(v)})
        row["flag"] = _setting_flag(list(flags[part.index]))
        rows.append(row)
    out = pd.DataFrame(rows)
    if not out.empty and out["label"].duplicated(keep=False).any():  # same label, other setting
        dup = out["label"].duplicated(keep=False)
        out.loc[dup, "label"] = out.loc[dup, "label"] + " (" + out.loc[dup, "runs"].map(
            lambda r: r[0]) + ")"
    return out


def _setting_flag(flags: list[str]) -> str:
    for flag in ("below baseline", "below avg pool"):
        k = flags.count(flag)
        if k:
            return flag if k == len(flags) else f"{flag} ({k}/{len(flags)} seeds)"
    known = [f for f in flags if f != MISSING]
    return known[0] if known and len(known) == len(flags) else MISSING


def spread_cell(row, metric: str, fmt) -> str:
    """'21.34 ± 0.12 [21.20, 21.47]' (mean ± std [min, max]); one seed: the value alone."""
    n = row.get(f"{metric}.n", 0)
    if not n:
        return MISSING
    mean = fmt(metric, row[f"{metric}.mean"])
    if n == 1:
        return mean
    return (f"{mean} ± {fmt(metric, row[f'{metric}.std'])} "
            f"[{fmt(metric, row[f'{metric}.min'])}, {fmt(metric, row[f'{metric}.max'])}]")


def baseline_cells(values: pd.DataFrame, fmt) -> dict:
    """Table columns 'mean colour PSNR', ..., 'avg pool SSIM': formatted values of runs, or
    (a settings() frame) the mean over each setting's seeds."""
    out = {}
    for b, label in BASELINES.items():
        for m in BASELINE_METRICS:
            col = baseline_col(b, m)
            if f"{col}.mean" in values.columns:
                cells = [fmt(m, v) for v in values[f"{col}.mean"]]
            else:
                cells = [fmt(m, v) for v in _num(values, col)]
            out[f"{label} {m.upper()}"] = cells
    return out


def baseline_note(runs: pd.DataFrame, metric: str, fmt) -> str:
    """'mean colour 15.80, avg pool 19.62' (means over the runs) for psnr/ssim; '' otherwise."""
    parts = []
    for b, label in BASELINES.items():
        v = _num(runs, baseline_col(b, metric)).dropna()
        if metric in BASELINE_METRICS and len(v):
            spread_ = "" if v.nunique() == 1 else f" ({fmt(metric, v.min())}-{fmt(metric, v.max())})"
            parts.append(f"{label} {fmt(metric, v.mean())}{spread_}")
    return ", ".join(parts)


def orderings(table: pd.DataFrame, metric: str, lower_is_better: bool) -> list[dict]:
    """Every pair of settings of a settings() frame on one metric: {"better", "worse",
    "resolved", "text"}; resolved only when both have >= MIN_SEEDS finite values and their
    [min, max] ranges do not overlap. Pairs without values are left out."""
    out = []
    have = table[table[f"{metric}.n"] > 0] if f"{metric}.n" in table.columns else table.iloc[:0]
    for (_, a), (_, b) in itertools.combinations(have.iterrows(), 2):
        a_better = (a[f"{metric}.mean"] < b[f"{metric}.mean"]) == lower_is_better
        better, worse = (a, b) if a_better else (b, a)
        enough = min(a[f"{metric}.n"], b[f"{metric}.n"]) >= MIN_SEEDS
        apart = (a[f"{metric}.max"] < b[f"{metric}.min"] or b[f"{metric}.max"] < a[f"{metric}.min"])
        resolved = bool(enough and apart)
        text = (f"{better['label']} {'<' if lower_is_better else '>'} {worse['label']}" if resolved
                else f"{a['label']} vs {b['label']}")
        out.append({"better": better["label"], "worse": worse["label"], "resolved": resolved,
                    "text": text})
    return out


def orderings_section(table: pd.DataFrame, metrics, metric_name, lower_is_better) -> str:
    """Markdown: per metric, the resolved and the unresolved orderings between settings."""
    head = (f"## Orderings\n\nAn ordering is *resolved* only when both settings have at least "
            f"{MIN_SEEDS} seeds and their seed ranges [min, max] do not overlap.")
    if table.empty:
        return head + "\n\n_No settings._"
    lines = []
    if table["n"].max() < MIN_SEEDS:
        lines.append(f"_No ordering is resolved: every setting has one seed (repeat the sweep "
                     f"with `+seeds=3`)._")
    for m in metrics:
        pairs = orderings(table, m, m in lower_is_better)
        if not pairs:
            continue
        resolved = [p["text"] for p in pairs if p["resolved"]]
        unresolved = [p["text"] for p in pairs if not p["resolved"]]
        lines.append(f"- {metric_name(m)}: resolved: {'; '.join(resolved) or 'none'}. "
                     f"Unresolved: {'; '.join(unresolved) or 'none'}.")
    return head + "\n\n" + "\n".join(lines)


def draw_baselines(ax, values: pd.DataFrame, metric: str, x=None) -> None:
    """Dashed lines of the baselines on a panel of `metric` (psnr/ssim only): one horizontal
    line at the mean over rows, or, with x (positions of the rows), a dashed segment per row
    (baselines differ between settings when the downsampling does)."""
    if metric not in BASELINE_METRICS:
        return
    for (b, label), style in zip(BASELINES.items(), ("--", ":")):
        col = baseline_col(b, metric)
        v = values[f"{col}.mean"] if f"{col}.mean" in values.columns else _num(values, col)
        v = pd.to_numeric(v, errors="coerce")
        if v.notna().sum() == 0:
            continue
        if x is None or v.nunique() <= 1:
            ax.axhline(v.mean(), color="0.3", linestyle=style, linewidth=1.2,
                       label=f"{label} baseline")
        else:
            ax.plot(list(x), list(v), color="0.3", linestyle=style, linewidth=1.2,
                    drawstyle="steps-mid", label=f"{label} baseline")
