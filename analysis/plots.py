"""Generic plots of run records, one panel per metric: metric vs step (curves), final values
per setting (bars, mean with min-max over seeds), final values vs a numeric parameter, heatmaps
over a row x column grid, and peak memory vs d. PSNR/SSIM panels carry the trivial baselines.

Each plot function returns the PNG path (None when no metric has data) and, for metric panels,
the (present, missing) metrics.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import spread
from analysis.tables import (LOWER_IS_BETTER, display_name, fmt, metric_title, present_final,
                             present_history, setting_labels)

def _colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _grid(n: int, ncols: int | None = None):
    ncols = ncols or min(n, 5)
    nrows = math.ceil(n / ncols)
    return nrows, ncols


def _panels(n: int, panel_w: float = 3.4, panel_h: float = 2.6, bottom: float = 0.6,
            top: float = 0.6, left: float = 0.75, right: float = 0.2, wspace: float = 0.75,
            hspace: float = 0.9):
    """A figure with n panels laid out by fixed margins in inches (no layout engine: constrained
    layout triples the drawing time). Returns (fig, axes of length >= n, unused hidden)."""
    nrows, ncols = _grid(n)
    width = left + right + ncols * panel_w + (ncols - 1) * wspace
    height = bottom + top + nrows * panel_h + (nrows - 1) * hspace
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height,
                        top=1 - top / height, wspace=wspace / panel_w, hspace=hspace / panel_h)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path, title: str | None = None) -> Path:
    if title:
        fig.suptitle(title, y=1 - 0.12 / fig.get_figheight())
        fig.texts[-1].set_verticalalignment("top")
    fig.savefig(path, dpi=100)
    return Path(path)


def plot_curves(runs: pd.DataFrame, history: pd.DataFrame, metrics, path, labels=None,
                split: str = "val", title: str | None = None):
    """One panel per metric, one line per run: metric vs step; the seeds of a setting (same
    label) share a colour and a legend entry; PSNR/SSIM panels carry the baselines (dashed).
    Returns (path|None, present, missing); no file when no metric has data."""
    present, missing = present_history(history, metrics, split)
    if not present or runs.empty:
        return None, present, missing
    labels = list(setting_labels(runs) if labels is None else labels)
    names = list(dict.fromkeys(labels))
    color_of = dict(zip(names, _colors(len(names))))
    rows = history[history["split"] == split]
    legend_rows = math.ceil((len(names) + 2) / 4)
    fig, axes = _panels(len(present), bottom=0.65 + 0.24 * legend_rows)
    for ax, m in zip(axes, present):
        seen = set()
        for run, label in zip(runs["run"], labels):
            data = rows[rows["run"] == run][["step", m]].dropna()
            if data.empty:
                continue
            ax.plot(data["step"], data[m], color=color_of[label],
                    label=None if label in seen else label,
                    marker="o" if len(data) <= 20 else None, markersize=3, linewidth=1.5)
            seen.add(label)
        if split == "val":
            spread.draw_baselines(ax, runs, m)
        ax.set_title(metric_title(m))
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    _legend(fig, axes[:len(present)])
    return _save(fig, path, title), present, missing


def _legend(fig, axes) -> None:
    """One legend under the panels: every distinct entry of any panel (baselines included)."""
    entries = {}
    for ax in axes:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(name, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="lower center",
                   bbox_to_anchor=(0.5, 0.0), ncols=min(len(entries), 4), fontsize="small",
                   frameon=False)


def plot_final_bars(runs: pd.DataFrame, metrics, path, labels=None, title: str | None = None):
    """One panel per metric, one bar per setting (labels: per run; runs of one label are the
    seeds of a setting): the mean, min-max error bars and each seed as a dot; PSNR/SSIM
    panels carry the baselines as dashed lines. Returns (path|None, present, missing)."""
    present, missing = present_final(runs, metrics)
    if not present or runs.empty:
        return None, present, missing
    labels = list(setting_labels(runs) if labels is None else labels)
    per_setting = spread.settings(runs, present, labels)
    names = list(per_setting["label"])
    longest = max(len(str(label)) for label in names)
    rotate = len(names) > 3 or longest > 12
    bottom = min(2.2, 0.35 + 0.065 * longest) + 0.3 if rotate else 0.8
    fig, axes = _panels(len(present), panel_w=max(2.6, 0.4 * len(names) + 1.0), bottom=bottom)
    colors = _colors(len(names))
    x = list(range(len(names)))
    for ax, m in zip(axes, present):
        mean = per_setting[f"{m}.mean"]
        err = [(mean - per_setting[f"{m}.min"]).fillna(0),
               (per_setting[f"{m}.max"] - mean).fillna(0)]
        ax.bar(x, mean.fillna(0.0), color=colors, yerr=err, capsize=3, ecolor="0.2")
        for xi, (_, row) in zip(x, per_setting.iterrows()):
            seeds = pd.to_numeric(runs.loc[runs["run"].isin(row["runs"]), f"final.{m}"],
                                  errors="coerce").dropna()
            if len(seeds) > 1:
                ax.scatter([xi] * len(seeds), seeds, s=8, color="k", zorder=3)
        spread.draw_baselines(ax, per_setting, m, x)
        ax.set_xticks(x, names, rotation=45 if rotate else 0,
                      ha="right" if rotate else "center", fontsize="small")
        ax.set_title(metric_title(m))
        ax.grid(alpha=0.3, axis="y")
        lo = per_setting[f"{m}.min"].dropna()
        hi = per_setting[f"{m}.max"].dropna()
        if not lo.empty and lo.min() > 0:
            low, high = _with_baselines(per_setting, m, lo.min(), hi.max())
            if high > low and low > 0.5 * high:  # zoom in on close values, as the paper does
                ax.set_ylim(low - 0.2 * (high - low) - 0.02 * high, high + 0.2 * (high - low))
    _legend(fig, axes[:len(present)])
    return _save(fig, path, title), present, missing


def _with_baselines(per_setting, metric, low, high):
    """(low, high) widened to the baselines of `metric`, so their lines stay in view."""
    for b in spread.BASELINES:
        col = f"{spread.baseline_col(b, metric)}.mean"
        if col in per_setting.columns and per_setting[col].notna().any():
            low, high = min(low, per_setting[col].min()), max(high, per_setting[col].max())
    return low, high


def plot_final_vs(runs: pd.DataFrame, x: str, metrics, path, xlabel: str | None = None,
                  logx: bool = False, series: str | None = None, title: str | None = None):
    """Final metric vs a numeric parameter (e.g. quantizer.groups), one line per `series`:
    the mean over seeds with min-max error bars; PSNR/SSIM panels carry the baselines."""
    present, missing = present_final(runs, metrics)
    if x not in runs.columns or not present:
        return None, present, list(metrics) if x not in runs.columns else missing
    xs = pd.to_numeric(runs[x], errors="coerce")
    if xs.isna().all():
        return None, present, missing
    fig, axes = _panels(len(present), bottom=0.95)
    groups = [(None, runs)] if not series or series not in runs.columns else \
        list(runs.groupby(series, sort=True))
    colors = _colors(len(groups))
    for ax, m in zip(axes, present):
        for color, (key, part) in zip(colors, groups):
            # one point per x: the mean over its seeds, min-max error bars
            per_x = spread.settings(part, [m], [str(v) for v in part[x]])
            per_x["x"] = pd.to_numeric(per_x["label"], errors="coerce")
            per_x = per_x.dropna(subset=["x", f"{m}.mean"]).sort_values("x")
            mean = per_x[f"{m}.mean"]
            ax.errorbar(per_x["x"], mean, yerr=[mean - per_x[f"{m}.min"],
                                                per_x[f"{m}.max"] - mean],
                        marker="o", color=color, capsize=3,
                        label=None if key is None else display_name(key))
            if color == colors[0]:
                spread.draw_baselines(ax, per_x, m, per_x["x"])
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel or x)
        ax.set_title(metric_title(m))
        ax.grid(alpha=0.3)
    _legend(fig, axes[:len(present)])
    return _save(fig, path, title), present, missing


def plot_grid_heatmaps(runs: pd.DataFrame, row: str, col: str, metrics, path,
                       row_label: str = "", col_label: str = "", title: str | None = None):
    """One heatmap per metric of final values (mean over seeds) over row x col (Fig 5: C x B);
    PSNR/SSIM panels name the baselines in their title."""
    if row not in runs.columns or col not in runs.columns:
        return None, [], list(metrics)
    present, missing = present_final(runs, metrics)
    if not present:
        return None, present, missing
    fig, axes = _panels(len(present), panel_w=3.0, wspace=1.1)
    for ax, m in zip(axes, present):
        data = runs[[row, col]].copy()
        data["v"] = pd.to_numeric(runs[f"final.{m}"], errors="coerce")
        pivot = data.pivot_table(index=row, columns=col, values="v", aggfunc="mean")
        image = ax.imshow(pivot.values, cmap="viridis_r" if m in LOWER_IS_BETTER else "viridis",
                          aspect="auto")
        ax.set_xticks(range(len(pivot.columns)), [display_name(c) for c in pivot.columns])
        ax.set_yticks(range(len(pivot.index)), [display_name(i) for i in pivot.index])
        ax.set_xlabel(col_label or col)
        ax.set_ylabel(row_label or row)
        note = spread.baseline_note(runs, m, fmt)
        ax.set_title(metric_title(m) + (f"\nbaselines: {note}" if note else ""),
                     fontsize="small" if note else None)
        for (i, j), v in pd.DataFrame(pivot.values).stack().items():
            r, g, b, _ = image.cmap(image.norm(v))
            ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            ax.text(j, i, fmt(m, v), ha="center", va="center", fontsize="x-small", color=ink)
        fig.colorbar(image, ax=ax, shrink=0.8)
    return _save(fig, path, title), present, missing


def plot_memory(mem: pd.DataFrame, path, title: str | None = None):
    """Peak memory vs d per method; OOM drawn as a cross on the top edge."""
    if mem.empty:
        return None
    fig, axes = _panels(1, panel_w=4.6, panel_h=3.0, bottom=0.65, top=0.45)
    ax = axes[0]
    mem = mem.assign(method=mem["method"].map(display_name))
    methods = list(dict.fromkeys(mem["method"]))
    peaks = mem["peak_gib"].dropna()
    top = (peaks.max() if not peaks.empty else 1.0) * 1.15 or 1.0
    for color, method in zip(_colors(len(methods)), methods):
        part = mem[mem["method"] == method].sort_values("d")
        ok = part[part["status"].str.lower() == "ok"].dropna(subset=["peak_gib"])
        ax.plot(ok["d"].astype(float), ok["peak_gib"], marker="o", color=color, label=method)
        oom = part[part["status"].str.upper() == "OOM"]
        if not oom.empty:
            ax.scatter(oom["d"].astype(float), [top] * len(oom), marker="x", s=60, color=color,
                       label=f"{method} OOM")
    ax.set_xlabel("d = g·d'")
    ax.set_ylabel("peak GPU memory (GiB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return _save(fig, path)
