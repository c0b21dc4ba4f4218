"""The run-record format, versioned: what wetok.record_writer writes and analysis.record_reader
reads (docs/DESIGN.md, "Records").

A run folder holds CONFIG_FILE (the resolved config), METRICS_FILE (one JSON object per logged
step: METRICS_ROW_FIELDS, then the TRAIN_KEYS or VAL_KEYS logged at that step), SUMMARY_FILE
(SUMMARY_FIELDS) and, after `python -m wetok.evaluate`, EVAL_FILE (EVAL_FIELDS). A memory table
of `python -m wetok.memory` is MEMORY_FILE with MEMORY_COLUMNS.

summary.json carries "schema_version" = SCHEMA_VERSION. Version 1 is the format of records
written before the field existed (a summary without it is version 1); a change to a file or
field below that a reader must know about raises SCHEMA_VERSION.
"""
from __future__ import annotations

SCHEMA_VERSION = 1

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
EVAL_FILE = "eval.json"
MEMORY_FILE = "memory.csv"

STATUSES = ("running", "finished", "failed")
SPLITS = ("train", "val")
METRICS_ROW_FIELDS = ("step", "time_s", "split")
TRAIN_KEYS = ("loss", "loss_rec", "loss_lpips", "loss_gan", "loss_commit", "token_entropy",
              "codebook_entropy", "loss_disc", "lr", "img_per_s")
# the paper's five metrics first, then codebook usage (also the keys of summary "final")
VAL_KEYS = ("val_loss", "rfid", "lpips", "ssim", "psnr", "usage", "joint_codes")

SUMMARY_FIELDS = {
    "schema_version": "SCHEMA_VERSION of the writer",
    "name": "run name (config `name`)",
    "sweep": "sweep name (config `sweep`; null outside a sweep)",
    "stage": "1 (reconstruction) or 2 (generative decoder)",
    "status": "one of STATUSES",
    "steps": "optimizer steps done",
    "wall_time_s": "training wall time over all attempts (resumes add up)",
    "peak_mem_gib": "peak GPU memory (CUDA runs only)",
    "choices": "{config group: option} that built the run",
    "params": "the resolved config, flat dotted keys",
    "final": "{metric: value} of the final evaluation (VAL_KEYS, usage_per_group)",
    "skipped": "{metric: reason} not computed",
    "baselines": "{mean_colour|avg_pool: {psnr, ssim}} of the last evaluation",
    "counts": "{bad_images, bad_images_distinct}: unreadable images skipped",
    "bad_image_examples": "the first unreadable image keys",
    "error": "why a failed run stopped",
}
EVAL_FIELDS = ("checkpoint", "step", "weights", "values", "skipped", "baselines", "timings")
MEMORY_COLUMNS = ("method", "d", "g", "d_prime", "peak_gib", "status", "device")


def schema_version(summary: dict) -> int:
    """The format version a summary.json was written in (1 when it does not say)."""
    return int(summary.get("schema_version", 1))


def check_summary_fields(fields) -> None:
    """Raise ValueError naming any field that SUMMARY_FIELDS does not declare."""
    unknown = sorted(set(fields) - set(SUMMARY_FIELDS))
    if unknown:
        raise ValueError(f"summary.json fields {unknown} are not in wetok.record_schema."
                         "SUMMARY_FIELDS: declare them there (and raise SCHEMA_VERSION if a "
                         "reader must know)")
