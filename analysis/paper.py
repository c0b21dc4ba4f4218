"""The paper's reports, one per analysis.registry.FIGURES entry, built from its declaration.

    report = paper.report("fig4_groups", "runs/fig4_groups")          # load records, write
    report = paper.REPORTS["fig4_groups"](runs, history, out_dir)      # from loaded frames
    report = paper.REPORTS["tab1_memory"](mem, out_dir)

A report writes OUT_DIR/<name>*.png and OUT_DIR/<name>.md and returns a Report. Layouts:
ablation (settings over seeds, orderings, per-run table, curves, bars; the figure's `versus`
plot and `grid` tables when declared), stages (Table 2) and memory (Table 1). A metric that is
missing or all-NaN is left out of plots and tables, and the markdown says so (with the runs'
`skipped` reasons when they give one); nothing here raises on missing data.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pandas as pd

from analysis import plots, record_reader, spread
from analysis.registry import FIGURES, TAB2_METRICS, Figure
from analysis.tables import (LOWER_IS_BETTER, MISSING, add_final_columns, display_name,
                             final_table, fmt, grid_table, md_table, metric_title, omitted_note,
                             order_runs, present_final, setting_labels, settings_table, varies)

# What does not tell the stages of Table 2 apart as settings.
NOT_STAGE_SETTING = ("stage", "init_from", "seed")


@dataclass
class Report:
    """What a report wrote: files, markdown (as in <name>.md) and tables."""
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

    @classmethod
    def start(cls, figure: Figure, out_dir) -> "Report":
        """A report on figure headed by its title and what the paper reports."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        report = cls(figure.name, out)
        report.add(f"# {figure.title}")
        report.add(figure.paper)
        return report

    def __repr__(self) -> str:
        return f"Report({self.name!r}, files={[str(f) for f in self.files]})"


@dataclass
class RenderResult:
    """What rendering one figure gave (analysis.render, analysis.notebook_view)."""
    name: str
    files: list = field(default_factory=list)   # everything written to OUT for it
    markdown: str = ""
    error: str | None = None
    notebook: Path | None = None                # the executed notebook, when one ran


# ----------------------------------------------------------------------------- tables
def memory_table(mem: pd.DataFrame) -> pd.DataFrame:
    """Paper Table 1: method x d, peak GiB, or "OOM"."""
    if mem.empty:
        return pd.DataFrame()
    data = mem.copy()
    data["cell"] = [_memory_cell(s, p) for s, p in zip(data["status"], data["peak_gib"])]
    data["method"] = data["method"].map(display_name)
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
        labels = setting_labels(runs, exclude=NOT_STAGE_SETTING, unique=False, fill=False)
    table = pd.DataFrame()
    if labels.nunique() > 1:
        table["setting"] = list(labels)
    if varies(runs, "seed"):
        table["seed"] = [display_name(s) for s in runs["seed"]]
    table["run"] = list(runs["run"])
    stage = pd.to_numeric(runs["stage"], errors="coerce").fillna(1)
    table["Stage1"] = "✓"
    table["Stage2"] = ["✓" if s >= 2 else "✗" for s in stage]
    add_final_columns(table, runs, present)
    if (runs["status"].fillna("") != "finished").any():
        table["status"] = list(runs["status"].fillna("?"))
    return table, missing


# ----------------------------------------------------------------------------- layouts
def ablation(figure: Figure, runs: pd.DataFrame, history: pd.DataFrame, out_dir) -> Report:
    """The tables (per setting: mean ± spread over seeds; per run), the orderings that the
    seeds resolve, curves (val metrics vs step, training metrics when declared) and bars
    (final values), all with the two trivial baselines; then the figure's versus plot and
    grid when it declares them."""
    report = Report.start(figure, out_dir)
    if runs.empty:
        report.add("_No runs found._")
        return report.write()
    runs = order_runs(runs, [axis.column for axis in figure.group_by])
    keys = [(axis.column, axis.short) for axis in figure.group_by
            if not figure.varying_only or varies(runs, axis.column)]
    labels = setting_labels(runs, keys=keys or None, exclude=("seed",), unique=False)
    _settings_section(report, spread.settings(runs, figure.table_metrics, labels),
                      figure.table_metrics, figure.metrics,
                      note="" if spread.has_baselines(runs) else spread.NO_BASELINES)
    table, missing_table = final_table(runs, figure.table_metrics, labels,
                                       extra=figure.table_extra)
    report.tables["final"] = table
    report.add("## Per run\n\n" + md_table(table))
    report.add(omitted_note(runs, missing_table, "from the tables"))
    _curves(report, runs, history, labels, figure.metrics, figure.title)
    if figure.train_metrics:
        png, _, _ = plots.plot_curves(runs, history, figure.train_metrics,
                                      report.out_dir / f"{figure.name}_train.png", labels,
                                      split="train", title=f"{figure.title}: training")
        report.add_image("training metrics vs step", png)
    png, _, _ = plots.plot_final_bars(runs, figure.metrics,
                                      report.out_dir / f"{figure.name}_final.png", labels,
                                      title=f"{figure.title}: final")
    report.add_image("final validation metrics", png)
    if figure.versus is not None:
        axis = figure.versus
        png, _, _ = plots.plot_final_vs(
            runs, axis.column, figure.metrics,
            report.out_dir / f"{figure.name}_vs_{axis.short.lower()}.png", xlabel=axis.label,
            logx=axis.log2, title=f"final metrics vs {axis.short}")
        report.add_image(f"final metrics vs {axis.short}", png)
    if figure.grid is not None:
        _grid_section(report, figure, runs)
    return report.write()


def stages(figure: Figure, runs: pd.DataFrame, history: pd.DataFrame, out_dir) -> Report:
    """Paper Table 2: the stage table; with seeds, each stage's mean ± spread and the
    resolved orderings; validation curves."""
    report = Report.start(figure, out_dir)
    if runs.empty:
        report.add("_No runs found._")
        return report.write()
    runs = order_runs(runs, ["stage"])
    table, missing = stage_table(runs, figure.table_metrics)
    report.tables["stages"] = table
    report.add(md_table(table))
    report.add(omitted_note(runs, missing, "from the table"))
    settings = setting_labels(runs, exclude=NOT_STAGE_SETTING, unique=False, fill=False)
    stage = pd.to_numeric(runs["stage"], errors="coerce").fillna(1).astype(int)
    labels = "stage " + stage.astype(str)
    if settings.nunique() > 1:
        labels = labels + ", " + settings
    per_setting = spread.settings(runs, figure.table_metrics, labels)
    if per_setting["n"].max() > 1:  # seeds: each stage's mean ± spread, resolved orderings
        _settings_section(report, per_setting, figure.table_metrics, figure.table_metrics)
    _curves(report, runs, history, labels, figure.metrics, figure.title)
    return report.write()


def memory(figure: Figure, mem: pd.DataFrame, out_dir) -> Report:
    """Paper Table 1: the memory table and peak memory vs d."""
    report = Report.start(figure, out_dir)
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
    report.add_image("peak memory vs d",
                     plots.plot_memory(mem, report.out_dir / f"{figure.name}.png",
                                       title="Peak memory vs d"))
    return report.write()


def _settings_section(report: Report, per_setting, table_metrics, order_metrics,
                      note: str = "") -> None:
    report.tables["settings"] = settings_table(per_setting, table_metrics)
    report.add("## Per setting (mean ± std [min, max] over seeds)\n\n"
               + md_table(report.tables["settings"]))
    report.add(note)
    report.add(spread.orderings_section(per_setting, order_metrics, metric_title,
                                        LOWER_IS_BETTER))


def _curves(report: Report, runs, history, labels, metrics, title: str) -> None:
    png, _, missing = plots.plot_curves(runs, history, metrics,
                                        report.out_dir / f"{report.name}_curves.png", labels,
                                        title=title)
    report.add_image("validation metrics vs step", png)
    report.add(omitted_note(runs, missing, "from the curves"))


def _grid_section(report: Report, figure: Figure, runs) -> None:
    """Row x column tables of each final metric (Fig 5: C x B) and their heatmaps."""
    row, col = figure.grid
    present, _ = present_final(runs, figure.metrics)
    grids = []
    for m in present:
        grid = grid_table(runs, row.column, col.column, m, row.short, col.short)
        if grid is not None:
            report.tables[f"grid.{m}"] = grid
            note = spread.baseline_note(runs, m, fmt)
            grids.append(f"### {metric_title(m)}\n\n" + md_table(grid, index=True)
                         + (f"\n\nBaselines: {note}." if note else ""))
    if grids:
        report.add(f"## {row.short} x {col.short} grids\n\n" + "\n\n".join(grids))
    png, _, _ = plots.plot_grid_heatmaps(runs, row.column, col.column, figure.metrics,
                                         report.out_dir / f"{figure.name}_grid.png",
                                         row_label=row.label, col_label=col.label)
    report.add_image(f"final metrics over {row.short} x {col.short}", png)


LAYOUTS = {"ablation": ablation, "stages": stages, "memory": memory}
# name -> report function: (runs, history, out_dir), or (mem, out_dir) for the memory layout
REPORTS = {name: partial(LAYOUTS[figure.layout], figure) for name, figure in FIGURES.items()}


def default_out_dir(source) -> Path:
    """Where a report on source goes unless told: <source folder>/analysis."""
    source = Path(source)
    return (source if source.is_dir() else source.parent) / "analysis"


def report(name: str, source, out_dir=None, sweep: str | None = None) -> Report:
    """Load the records of FIGURES[name] from source (a sweep folder; for the memory layout a
    memory*.csv or a folder holding one) and write its report to out_dir (default
    default_out_dir(source)). sweep: keep the runs of this sweep name (default: name; all
    runs when none match)."""
    figure = FIGURES[name]
    out_dir = default_out_dir(source) if out_dir is None else out_dir
    if figure.reads == "memory":
        return REPORTS[name](record_reader.load_memory(source), out_dir)
    runs = record_reader.select_sweep(record_reader.load_runs(source), sweep or name)
    history = record_reader.load_history(source, runs=runs["run"])
    return REPORTS[name](runs, history, out_dir)
