"""Plots and markdown tables of the paper's ablations (Sec 4.2: Fig 3-6, Tables 1-2).

Generic helpers take load_runs / load_history / load_memory frames; one report function per
figure or table (fig3_quantizer, ..., tab2_generative_decoder, lfq_exact_d24) writes
OUT_DIR/<name>*.png and OUT_DIR/<name>.md and returns a Report. A metric that is missing or
all-NaN is left out of plots and tables, and the markdown says so (with the runs' `skipped`
reasons when they give one); nothing here raises on missing data.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import spread

# The paper's five ablation metrics, then codebook usage.
PAPER_METRICS = ("val_loss", "rfid", "lpips", "ssim", "psnr")
USAGE_METRICS = ("usage", "joint_codes")
TABLE_METRICS = PAPER_METRICS + USAGE_METRICS
TAB2_METRICS = ("rfid", "lpips", "ssim", "psnr")

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
    ("quantizer.codebook_entropy", "entropy"), ("quantizer.entropy_reduction", "H over g"),
    ("model.channels", "C"),
    ("model.num_res_blocks", "B"), ("schedule.name", ""), ("data.name", ""),
    ("optim.lr", "lr"), ("train.steps", "steps"), ("seed", "seed"),
)
MISSING = "—"


def metric_name(metric: str) -> str:
    return METRIC_NAMES.get(metric, metric)


def fmt(metric: str, value) -> str:
    """A metric value as the tables print it ("—" for missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    try:
        return FORMATS.get(metric, "{:.4g}").format(float(value))
    except (TypeError, ValueError):
        return str(value)


# ----------------------------------------------------------------------------- report
@dataclass
class Report:
    """What a report function wrote: files, markdown (as in <name>.md) and tables."""
    name: str
    out_dir: Path
    files: list = field(default_factory=list)
    sections: list = field(default_factory=list)   # markdown blocks, images excluded
    images: list = field(default_factory=list)     # (caption, path)
    tables: dict = field(default_factory=dict)

    @property
    def markdown(self) -> str:
        blocks = list(self.sections)
        blocks += [f"![{caption}]({Path(p).name})" for caption, p in self.images]
        return "\n\n".join(blocks) + "\n"

    def add(self, block: str) -> None:
        if block:
            self.sections.append(block.strip())

    def add_image(self, caption: str, path) -> None:
        if path is not None:
            self.images.append((caption, Path(path)))
            self.files.append(Path(path))

    def write(self) -> "Report":
        path = self.out_dir / f"{self.name}.md"
        path.write_text(self.markdown)
        self.files.append(path)
        return self

    def show(self) -> None:
        """Display in a notebook: the markdown (tables, notes), then the PNGs."""
        from IPython.display import Image, Markdown, display

        display(Markdown("\n\n".join(self.sections)))
        for caption, path in self.images:
            display(Markdown(f"*{caption}* (`{path.name}`)"))
            display(Image(filename=str(path)))

    def __repr__(self) -> str:
        return f"Report({self.name!r}, files={[str(f) for f in self.files]})"


def _start(name: str, out_dir, title: str, caption: str) -> Report:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = Report(name, out)
    report.add(f"# {title}")
    report.add(caption)
    return report


# ----------------------------------------------------------------------------- settings
def _display(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return DISPLAY.get(str(value), str(value))


def _varies(runs: pd.DataFrame, col: str) -> bool:
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
                if c.startswith("choice.") and c not in exclude and _varies(runs, c)]
        labels = _labels_from(runs, keys)
        for col, prefix in SETTING_PARAMS:
            if labels.nunique() == len(runs):
                break
            if col not in exclude and _varies(runs, col):
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
            parts.append(f"{prefix}={_display(value)}" if prefix else _display(value))
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
    if _varies(runs, "seed"):
        table.insert(1, "seed", [_display(s) for s in runs["seed"]])
    for m in present:
        values = pd.to_numeric(runs[f"final.{m}"], errors="coerce")
        best = _best(values, m) if bold_best and len(runs) > 1 else None
        table[metric_name(m) + _arrow(m)] = [
            (f"**{fmt(m, v)}**" if best is not None and v == best else fmt(m, v))
            for v in values]
    for col, cells in spread.baseline_cells(runs, fmt).items():
        table[col] = cells
    table["vs baselines"] = spread.run_flags(runs)
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


def settings_table(per_setting: pd.DataFrame, metrics=TABLE_METRICS) -> pd.DataFrame:
    """spread.settings() formatted: setting, seeds, mean ± std [min, max] per metric (best
    mean in bold), the baselines (mean over seeds) and the worst place against them."""
    table = pd.DataFrame({"setting": list(per_setting["label"]), "seeds": list(per_setting["n"])})
    for m in metrics:
        if f"{m}.n" not in per_setting.columns or not per_setting[f"{m}.n"].any():
            continue
        best = _best(per_setting[f"{m}.mean"], m) if len(per_setting) > 1 else None
        table[metric_name(m) + _arrow(m)] = [
            (f"**{cell}**" if best is not None and row[f"{m}.mean"] == best else cell)
            for cell, (_, row) in zip(
                [spread.spread_cell(r, m, fmt) for _, r in per_setting.iterrows()],
                per_setting.iterrows())]
    for col, cells in spread.baseline_cells(per_setting, fmt).items():
        table[col] = cells
    table["vs baselines"] = list(per_setting["flag"])
    return table


def _best(values: pd.Series, metric: str):
    finite = values.dropna()
    if finite.empty or finite.nunique() < 2:
        return None
    if metric in LOWER_IS_BETTER:
        return finite.min()
    if metric in HIGHER_IS_BETTER:
        return finite.max()
    return None


def _arrow(metric: str) -> str:
    return " ↓" if metric in LOWER_IS_BETTER else " ↑" if metric in HIGHER_IS_BETTER else ""


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
    out.index = [f"{row_prefix}={_display(i)}" if row_prefix else _display(i) for i in out.index]
    out.columns = [f"{col_prefix}={_display(c)}" if col_prefix else _display(c)
                   for c in out.columns]
    out.index.name = metric_name(metric)
    return out


def memory_table(mem: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 1: method x d, peak GiB, or "OOM"."""
    if mem.empty:
        return pd.DataFrame()
    data = mem.copy()
    data["cell"] = [_memory_cell(s, p) for s, p in zip(data["status"], data["peak_gib"])]
    data["method"] = data["method"].map(_display)
    if data["device"].nunique() > 1:  # several measurements: one row per method and device
        data["method"] = data["method"] + " [" + data["device"] + "]"
    methods = list(dict.fromkeys(data["method"]))
    dims = sorted(int(d) for d in data["d"].dropna().unique())
    table = data.pivot_table(index="method", columns="d", values="cell", aggfunc="last")
    table = table.reindex(index=methods, columns=dims).fillna(MISSING)
    table.columns = [f"d = {d}" for d in dims]
    table.index.name = "Method"
    return table


def _memory_cell(status, peak) -> str:
    status = str(status or "").strip()
    if status.upper() == "OOM":
        return "OOM"
    if status.lower() == "ok" and peak is not None and not pd.isna(peak):
        return f"{peak:.2f} GiB"
    return status or MISSING


def stage_table(runs: pd.DataFrame, metrics=TAB2_METRICS, labels=None) -> tuple[pd.DataFrame, list]:
    """Paper Table 2: Stage1 / Stage2 marks and final metrics, stage 1 rows first."""
    present, missing = present_final(runs, metrics)
    runs = order_runs(runs, ["stage"])
    if labels is None:
        labels = setting_labels(runs, exclude=("stage", "init_from", "seed"), unique=False,
                                fill=False)
    table = pd.DataFrame()
    if labels.nunique() > 1:
        table["setting"] = list(labels)
    if _varies(runs, "seed"):
        table["seed"] = [_display(s) for s in runs["seed"]]
    table["run"] = list(runs["run"])
    stage = pd.to_numeric(runs["stage"], errors="coerce").fillna(1)
    table["Stage1"] = "✓"
    table["Stage2"] = ["✓" if s >= 2 else "✗" for s in stage]
    for m in present:
        values = pd.to_numeric(runs[f"final.{m}"], errors="coerce")
        best = _best(values, m) if len(runs) > 1 else None
        table[metric_name(m) + _arrow(m)] = [
            (f"**{fmt(m, v)}**" if best is not None and v == best else fmt(m, v))
            for v in values]
    for col, cells in spread.baseline_cells(runs, fmt).items():
        table[col] = cells
    table["vs baselines"] = spread.run_flags(runs)
    if (runs["status"].fillna("") != "finished").any():
        table["status"] = list(runs["status"].fillna("?"))
    return table, missing


# ----------------------------------------------------------------------------- plots
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
        ax.set_title(metric_name(m) + _arrow(m))
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
        err = [(mean - per_setting[f"{m}.min"]).fillna(0), (per_setting[f"{m}.max"] - mean).fillna(0)]
        ax.bar(x, mean.fillna(0.0), color=colors, yerr=err, capsize=3, ecolor="0.2")
        for xi, (_, row) in zip(x, per_setting.iterrows()):
            seeds = pd.to_numeric(runs.loc[runs["run"].isin(row["runs"]), f"final.{m}"],
                                  errors="coerce").dropna()
            if len(seeds) > 1:
                ax.scatter([xi] * len(seeds), seeds, s=8, color="k", zorder=3)
        spread.draw_baselines(ax, per_setting, m, x)
        ax.set_xticks(x, names, rotation=45 if rotate else 0,
                      ha="right" if rotate else "center", fontsize="small")
        ax.set_title(metric_name(m) + _arrow(m))
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
                        label=None if key is None else _display(key))
            if color == colors[0]:
                spread.draw_baselines(ax, per_x, m, per_x["x"])
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel or x)
        ax.set_title(metric_name(m) + _arrow(m))
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
        ax.set_xticks(range(len(pivot.columns)), [_display(c) for c in pivot.columns])
        ax.set_yticks(range(len(pivot.index)), [_display(i) for i in pivot.index])
        ax.set_xlabel(col_label or col)
        ax.set_ylabel(row_label or row)
        note = spread.baseline_note(runs, m, fmt)
        ax.set_title(metric_name(m) + _arrow(m) + (f"\nbaselines: {note}" if note else ""),
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
    mem = mem.assign(method=mem["method"].map(_display))
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


# ----------------------------------------------------------------------------- reports
def ablation_report(name: str, runs: pd.DataFrame, history: pd.DataFrame, out_dir,
                    title: str, caption: str, label_keys=None, order_by=(),
                    metrics=PAPER_METRICS, table_metrics=TABLE_METRICS,
                    table_extra=("steps",), train_metrics=()) -> Report:
    """The tables (per setting: mean ± spread over seeds; per run), the orderings that the
    seeds resolve, curves (val metrics vs step) and bars (final values), all with the two
    trivial baselines."""
    report = _start(name, out_dir, title, caption)
    if runs.empty:
        report.add("_No runs found._")
        return report.write()
    runs = order_runs(runs, order_by)
    labels = setting_labels(runs, keys=label_keys, exclude=("seed",), unique=False)
    per_setting = spread.settings(runs, table_metrics, labels)
    report.tables["settings"] = settings_table(per_setting, table_metrics)
    report.add("## Per setting (mean ± std [min, max] over seeds)\n\n"
               + md_table(report.tables["settings"]))
    if not spread.has_baselines(runs):
        report.add(spread.NO_BASELINES)
    report.add(spread.orderings_section(per_setting, metrics,
                                        lambda m: metric_name(m) + _arrow(m), LOWER_IS_BETTER))
    table, missing_table = final_table(runs, table_metrics, labels, extra=table_extra)
    report.tables["final"] = table
    report.add("## Per run\n\n" + md_table(table))
    report.add(omitted_note(runs, missing_table, "from the tables"))

    png, _, missing = plot_curves(runs, history, metrics, report.out_dir / f"{name}_curves.png",
                                  labels, title=title)
    report.add_image("validation metrics vs step", png)
    report.add(omitted_note(runs, missing, "from the curves"))
    if train_metrics:
        png, _, _ = plot_curves(runs, history, train_metrics,
                                report.out_dir / f"{name}_train.png", labels, split="train",
                                title=f"{title}: training")
        report.add_image("training metrics vs step", png)
    png, _, _ = plot_final_bars(runs, metrics, report.out_dir / f"{name}_final.png", labels,
                                title=f"{title}: final")
    report.add_image("final validation metrics", png)
    return report


def fig3_quantizer(runs, history, out_dir) -> Report:
    report = ablation_report(
        "fig3_quantizer", runs, history, out_dir,
        title="Fig. 3: quantization method (d = g·d' = 16)",
        caption=("Paper: LFQ (g=1, d'=16), BSQ (g=16, d'=1) and GQ (g=2, d'=8) at the same "
                 "compression ratio; GQ and LFQ are significantly better than BSQ."),
        label_keys=[("choice.quantizer", ""), ("quantizer.groups", "g"),
                    ("quantizer.group_dim", "d'")],
        order_by=["choice.quantizer", "quantizer.groups"])
    return report.write()


def fig4_groups(runs, history, out_dir) -> Report:
    report = ablation_report(
        "fig4_groups", runs, history, out_dir,
        title="Fig. 4: number of groups G in GQ",
        caption="Paper: reconstruction improves significantly as G grows (d' = 8, d = 8G).",
        label_keys=[("quantizer.groups", "G")], order_by=["quantizer.groups"])
    runs = order_runs(runs, ["quantizer.groups"])
    png, _, _ = plot_final_vs(runs, "quantizer.groups", PAPER_METRICS,
                              report.out_dir / "fig4_groups_vs_g.png", xlabel="G (groups)",
                              logx=True, title="final metrics vs G")
    report.add_image("final metrics vs G", png)
    return report.write()


def fig5_architecture(runs, history, out_dir) -> Report:
    keys = [("model.channels", "C"), ("model.num_res_blocks", "B")]
    report = ablation_report(
        "fig5_architecture", runs, history, out_dir,
        title="Fig. 5: model architecture (C base channels x B residual blocks)",
        caption="Paper: across 9 settings, C = 256 and B = 4 reconstruct best.",
        label_keys=keys, order_by=["model.channels", "model.num_res_blocks"])
    present, _ = present_final(runs, PAPER_METRICS)
    grids = []
    for m in present:
        grid = grid_table(runs, "model.channels", "model.num_res_blocks", m, "C", "B")
        if grid is not None:
            report.tables[f"grid.{m}"] = grid
            note = spread.baseline_note(runs, m, fmt)
            grids.append(f"### {metric_name(m)}{_arrow(m)}\n\n" + md_table(grid, index=True)
                         + (f"\n\nBaselines: {note}." if note else ""))
    if grids:
        report.add("## C x B grids\n\n" + "\n\n".join(grids))
    png, _, _ = plot_grid_heatmaps(runs, "model.channels", "model.num_res_blocks", PAPER_METRICS,
                                   report.out_dir / "fig5_architecture_grid.png",
                                   row_label="C (base channels)", col_label="B (res blocks)")
    report.add_image("final metrics over C x B", png)
    return report.write()


def fig6_data_schedule(runs, history, out_dir) -> Report:
    report = ablation_report(
        "fig6_data_schedule", runs, history, out_dir,
        title="Fig. 6: training data and learning-rate schedule",
        caption=("Paper: general-domain data (GD) gives better val loss, SSIM and PSNR but worse "
                 "rFID and LPIPS than ImageNet; a constant LR beats warm-up + cosine decay."),
        label_keys=[(c, "") for c in ("choice.experiment", "choice.data", "choice.schedule")
                    if _varies(runs, c)] or None,
        order_by=["choice.experiment", "choice.data", "choice.schedule"])
    return report.write()


def lfq_exact_d24(runs, history, out_dir) -> Report:
    report = ablation_report(
        "lfq_exact_d24", runs, history, out_dir,
        title="LFQ with exact codebook entropy at d = 24",
        caption=("Paper Table 1 has LFQ out of memory from d = 24 (naive entropy over 2^d codes). "
                 "The exact factorised entropy trains LFQ at d = 24; compared here with GQ at "
                 "the same d, with peak memory and wall time."),
        label_keys=[("choice.quantizer", ""), ("quantizer.groups", "g"),
                    ("quantizer.group_dim", "d'"), ("quantizer.codebook_entropy", "entropy")],
        order_by=["choice.quantizer", "quantizer.groups"],
        table_extra=("steps", "peak_mem_gib", "wall_time_s"),
        train_metrics=("loss", "token_entropy", "codebook_entropy"))
    return report.write()


def tab1_memory(mem: pd.DataFrame, out_dir) -> Report:
    report = _start("tab1_memory", out_dir, "Table 1: memory usage of the quantizer",
                    "Paper: d' = 8 in GQ (GFQ); LFQ is out of memory (OOM) from d = 24 while "
                    "BSQ and GQ stay flat.")
    if mem.empty:
        report.add("_No memory measurements found._")
        return report.write()
    table = memory_table(mem)
    report.tables["memory"] = table
    report.add(md_table(table, index=True))
    devices = sorted({d for d in mem["device"] if d})
    if devices:
        report.add(f"Device: {', '.join(devices)}.")
    if "cpu" in devices:
        report.add("_On a CPU, wetok.memory reports the quantizer's own tensor memory at a "
                   "smaller batch, not the peak GPU memory of a training step._")
    other = mem[~mem["status"].str.lower().isin(["ok", "oom"])]
    if not other.empty:
        report.add("Other statuses: " + ", ".join(
            f"{m} d={d}: {s}" for m, d, s in zip(other["method"], other["d"], other["status"])))
    report.add_image("peak memory vs d", plot_memory(mem, report.out_dir / "tab1_memory.png",
                                                     title="Peak memory vs d"))
    return report.write()


def tab2_generative_decoder(runs, history, out_dir) -> Report:
    report = _start("tab2_generative_decoder", out_dir,
                    "Table 2: generative decoder (stage 2)",
                    "Paper: stage-2 generative decoder training improves reconstruction, "
                    "especially rFID (5.37 -> 3.90).")
    if runs.empty:
        report.add("_No runs found._")
        return report.write()
    runs = order_runs(runs, ["stage"])
    table, missing = stage_table(runs)
    report.tables["stages"] = table
    report.add(md_table(table))
    report.add(omitted_note(runs, missing, "from the table"))
    settings = setting_labels(runs, exclude=("stage", "init_from", "seed"), unique=False,
                              fill=False)
    stage = pd.to_numeric(runs["stage"], errors="coerce").fillna(1).astype(int)
    labels = "stage " + stage.astype(str)
    if settings.nunique() > 1:
        labels = labels + ", " + settings
    per_setting = spread.settings(runs, TAB2_METRICS, labels)
    if per_setting["n"].max() > 1:  # seeds: each stage's mean ± spread, resolved orderings
        report.tables["settings"] = settings_table(per_setting, TAB2_METRICS)
        report.add("## Per setting (mean ± std [min, max] over seeds)\n\n"
                   + md_table(report.tables["settings"]))
        report.add(spread.orderings_section(per_setting, TAB2_METRICS,
                                            lambda m: metric_name(m) + _arrow(m),
                                            LOWER_IS_BETTER))
    png, _, missing = plot_curves(runs, history, PAPER_METRICS,
                                  report.out_dir / "tab2_generative_decoder_curves.png", labels,
                                  title="Stage 1 vs stage 2")
    report.add_image("validation metrics vs step", png)
    report.add(omitted_note(runs, missing, "from the curves"))
    return report.write()


REPORTS = {
    "fig3_quantizer": fig3_quantizer,
    "fig4_groups": fig4_groups,
    "fig5_architecture": fig5_architecture,
    "fig6_data_schedule": fig6_data_schedule,
    "tab1_memory": tab1_memory,
    "tab2_generative_decoder": tab2_generative_decoder,
    "lfq_exact_d24": lfq_exact_d24,
}
