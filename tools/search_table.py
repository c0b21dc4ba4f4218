"""The table of tools/short_scale_search.sh: one row per candidate run folder, PSNR/SSIM beside
both trivial baselines, steps reached, training speed and peak memory.

    python tools/search_table.py OUT/runs [--title TEXT]     # markdown on stdout
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from analysis import record_reader, tables  # noqa: E402


def search_table(runs_dir) -> str:
    runs = record_reader.load_runs(runs_dir)
    if runs.empty:
        return f"_No runs under {runs_dir}._"
    table, _ = tables.final_table(runs, ("psnr", "ssim", "val_loss", "usage"),
                                  labels=runs["run"], extra=("steps", "peak_mem_gib"))
    history = record_reader.load_history(runs_dir)
    train = history[history["split"] == "train"] if not history.empty else history
    speed = (train.groupby("run")["img_per_s"].median() if "img_per_s" in train.columns
             else {})
    table["img/s per run"] = [f"{speed[r]:.1f}" if r in speed else "—"
                              for r in runs["run"]]
    return tables.md_table(table.drop(columns=["run"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs_dir", type=Path)
    parser.add_argument("--title", default="scale=short candidates")
    args = parser.parse_args(argv)
    print(f"# {args.title}\n\nEach candidate trained alone in its process, all at once on the "
          "same device; PSNR/SSIM on the held-out tiles (EMA weights).\n")
    print(search_table(args.runs_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
