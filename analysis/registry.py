"""The paper's figures and tables, each declared once: FIGURES[name].

A Figure names its sweep (sweeps/<name>.yaml, the `sweep` of its runs' summaries), its title,
what the paper reports and what the report shows, how runs are grouped into settings, its axes
and its metrics. analysis.paper builds the report from it, `python -m analysis.render` renders
it, and the notebook analysis/notebooks/<name>.ipynb is a view that calls it by name.
"""
from __future__ import annotations

from dataclasses import dataclass

from wetok.record_schema import VAL_KEYS

PAPER_METRICS = ("val_loss", "rfid", "lpips", "ssim", "psnr")  # the paper's five ablation metrics
TAB2_METRICS = ("rfid", "lpips", "ssim", "psnr")
LAYOUTS = ("ablation", "stages", "memory")


@dataclass(frozen=True)
class Axis:
    """A records column that runs are grouped by or plotted against."""
    column: str        # e.g. "quantizer.groups", "choice.quantizer"
    short: str = ""    # legend prefix: "g" gives "g=4"; "" gives the value alone ("GQ")
    label: str = ""    # axis title on plots
    log2: bool = False


@dataclass(frozen=True)
class Figure:
    """One paper figure or table.

    name: the sweep (sweeps/<name>.yaml; runs of a sweep whose name starts with it count too,
    e.g. fig5_architecture_tables), the notebook and the stem of the output files.
    layout: "ablation" (settings over seeds, curves, bars), "stages" (Table 2: stage 1 vs 2) or
    "memory" (Table 1, from a memory CSV instead of runs).
    group_by: the columns whose values label a setting and order the runs; () labels by the
    config choices that differ; varying_only keeps only group_by columns that differ.
    versus: also plot final metrics against this numeric axis; grid: (row, column) axes of
    grid tables and heatmaps of final metrics.
    """
    name: str
    title: str
    paper: str
    shows: str
    layout: str = "ablation"
    group_by: tuple[Axis, ...] = ()
    varying_only: bool = False
    metrics: tuple[str, ...] = PAPER_METRICS         # curves and bars
    table_metrics: tuple[str, ...] = VAL_KEYS
    table_extra: tuple[str, ...] = ("steps",)        # run columns added to the per-run table
    train_metrics: tuple[str, ...] = ()              # training curves, when any
    versus: Axis | None = None
    grid: tuple[Axis, Axis] | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"{self.name}: layout must be one of {LAYOUTS}, got {self.layout!r}")

    @property
    def reads(self) -> str:
        """What it is made from: "runs" (run folders) or "memory" (a memory*.csv)."""
        return "memory" if self.layout == "memory" else "runs"


QUANTIZER = (Axis("choice.quantizer"), Axis("quantizer.groups", "g"),
             Axis("quantizer.group_dim", "d'"))
G = Axis("quantizer.groups", "g", "g (groups)", log2=True)
C = Axis("model.channels", "C", "C (base channels)")
B = Axis("model.num_res_blocks", "B", "B (res blocks)")

FIGURES = {f.name: f for f in (
    Figure(
        "fig3_quantizer", "Fig. 3: quantization method (d = g·d' = 16)",
        paper=("Paper: LFQ (g=1, d'=16), BSQ (g=16, d'=1) and GQ (g=2, d'=8) at the same "
               "compression ratio; GQ and LFQ are significantly better than BSQ."),
        shows=("LFQ (g=1, d'=16), BSQ (g=16, d'=1) and GQ (g=2, d'=8) at d = 16. Validation "
               "loss, rFID, LPIPS, SSIM and PSNR vs step, and their final values."),
        group_by=QUANTIZER),
    Figure(
        "fig4_groups", "Fig. 4: number of groups g in GQ",
        paper="Paper: reconstruction improves significantly as g grows (d' = 8, d = 8g).",
        shows="GQ with d' = 8 and g = 1, 2, 4, ... groups: metrics vs step, and final metrics "
              "vs g.",
        group_by=(G,), versus=G),
    Figure(
        "fig5_architecture", "Fig. 5: model architecture (C base channels x B residual blocks)",
        paper="Paper: across 9 settings, C = 256 and B = 4 reconstruct best.",
        shows="Base channels C x residual blocks B (3 x 3 grid): curves, final values and "
              "C x B grids.",
        group_by=(C, B), grid=(C, B)),
    Figure(
        "fig6_data_schedule", "Fig. 6: training data and learning-rate schedule",
        paper=("Paper: general-domain data (GD) gives better val loss, SSIM and PSNR but worse "
               "rFID and LPIPS than ImageNet; a constant LR beats warm-up + cosine decay."),
        shows="ImageNet vs general-domain data (GD); constant LR vs warm-up + cosine decay.",
        group_by=(Axis("choice.experiment"), Axis("choice.data"), Axis("choice.schedule")),
        varying_only=True),
    Figure(
        "tab1_memory", "Table 1: memory usage of the quantizer",
        paper=("Paper: d' = 8 in GQ (GFQ); LFQ is out of memory (OOM) from d = 24 while BSQ "
               "and GQ stay flat."),
        shows=("Peak GPU memory of LFQ / BSQ / GQ for d = 8 ... 40 from `python -m "
               "wetok.memory` (a memory*.csv file, or a folder holding one); OOM where it ran "
               "out of memory."),
        layout="memory"),
    Figure(
        "tab2_generative_decoder", "Table 2: generative decoder (stage 2)",
        paper=("Paper: stage-2 generative decoder training improves reconstruction, "
               "especially rFID (5.37 -> 3.90)."),
        shows="Stage 1 (reconstruction) vs stage 2 (generative decoder): rFID, LPIPS, SSIM, "
              "PSNR.",
        layout="stages", table_metrics=TAB2_METRICS),
    Figure(
        "lfq_exact_d24", "LFQ with exact codebook entropy at d = 24",
        paper=("Paper Table 1 has LFQ out of memory from d = 24 (naive entropy over 2^d codes). "
               "The exact factorised entropy trains LFQ at d = 24; compared here with GQ at "
               "the same d, with peak memory and wall time."),
        shows=("Where the paper's LFQ runs out of memory: LFQ with the exact factorised entropy "
               "vs GQ at d = 24; curves, training entropies, final metrics, peak memory."),
        group_by=(*QUANTIZER, Axis("quantizer.entropy_mode", "entropy")),
        table_extra=("steps", "peak_mem_gib", "wall_time_s"),
        train_metrics=("loss", "token_entropy", "codebook_entropy")),
)}
