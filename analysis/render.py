"""Render the paper's figures and tables from run records (CLI `wetok-analyze`), as declared in
analysis/registry.py; no Jupyter involved.

    python -m analysis.render runs/fig3_quantizer            # the figure(s) its sweep names pick
    python -m analysis.render runs --all --out reports/      # every figure that has data
    python -m analysis.render runs/x --figure fig4_groups    # force one (alias: --notebook)
    python -m analysis.render --list runs                    # which figures fit, no rendering
    python -m analysis.render runs/x --notebooks             # execute the notebooks instead
    python -m analysis.render --write-notebooks              # regenerate analysis/notebooks/*.ipynb

Outputs go to OUT (default SWEEP_DIR/analysis): <name>*.png and <name>.md, and with
--notebooks the executed <name>.ipynb (analysis.notebook_view runs them in one ipykernel).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from analysis import paper, record_reader
from analysis.registry import FIGURES
from wetok.record_schema import SUMMARY_FILE

def detect_figures(sweep_dir) -> list[str]:
    """Figures whose data is under sweep_dir: by the `sweep` names in the summaries (equal to,
    or starting with, the figure name), the folder's own name, and for a memory figure a
    memory*.csv file."""
    path = Path(sweep_dir)
    found = []
    if record_reader.find_memory_csv(path):
        found += [name for name, f in FIGURES.items() if f.reads == "memory"]
    if path.is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = record_reader.sweep_names(
                record_reader.load_runs(path, fill_final_from_history=False))
        if not names and any(path.rglob(SUMMARY_FILE)):
            names = [path.name]
        found += [name for name, f in FIGURES.items()
                  if f.reads == "runs" and any(n == name or n.startswith(name) for n in names)]
    return [name for name in FIGURES if name in found]


def render_figures(names, sweep_dir, out_dir=None, sweep: str | None = None
                   ) -> list[paper.RenderResult]:
    """paper.report for each name on sweep_dir, writing to out_dir (default
    sweep_dir/analysis); a failing figure is reported in .error and the next one runs."""
    sweep_dir = Path(sweep_dir).resolve()
    out_dir = Path(paper.default_out_dir(sweep_dir) if out_dir is None else out_dir).resolve()
    results = []
    for name in names:
        result = paper.RenderResult(name)
        try:
            report = paper.report(name, sweep_dir, out_dir, sweep=sweep)
            result.files, result.markdown = list(report.files), report.markdown
        except Exception as exc:
            result.error = f"{name}: {type(exc).__name__}: {exc}"
        results.append(result)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="wetok-analyze", description="Render the paper's figures/tables from run records.")
    parser.add_argument("sweep_dir", nargs="?", help="sweep folder of run folders (or, for "
                        "tab1_memory, a memory*.csv / a folder holding one)")
    parser.add_argument("--out", help="output folder (default SWEEP_DIR/analysis)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--figure", "--notebook", dest="figure", action="append",
                       choices=list(FIGURES),
                       help="render this figure (repeatable); default: those the sweep fits")
    which.add_argument("--all", action="store_true", help="render every figure with data")
    parser.add_argument("--sweep", help="keep runs of this sweep name (default: figure name; "
                        "all runs when none match)")
    parser.add_argument("--notebooks", action="store_true",
                        help="execute the notebooks (writes the executed <name>.ipynb too)")
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds per notebook cell (--notebooks)")
    parser.add_argument("--list", action="store_true", help="print the fitting figures only")
    parser.add_argument("--write-notebooks", action="store_true",
                        help="regenerate the notebooks in analysis/notebooks and exit")
    args = parser.parse_args(argv)

    if args.write_notebooks:
        from analysis import notebook_view

        for path in notebook_view.write_notebooks():
            print(f"wrote {path}")
        return 0
    if not args.sweep_dir:
        parser.error("SWEEP_DIR is required (or --write-notebooks)")
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.exists():
        print(f"error: no such folder or file: {sweep_dir}", file=sys.stderr)
        return 2
    detected = detect_figures(sweep_dir)
    if args.list:
        print("\n".join(detected) if detected else "(no notebook fits)")
        return 0
    names = args.figure or detected
    if not names:
        if args.all:
            print(f"no notebook has data under {sweep_dir}")
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = (record_reader.sweep_names(record_reader.load_runs(sweep_dir))
                     if sweep_dir.is_dir() else [])
        print(f"error: no notebook fits {sweep_dir} (sweep names found: {found or 'none'}); "
              f"pass --figure one of {list(FIGURES)}", file=sys.stderr)
        return 2
    if args.notebooks:
        from analysis import notebook_view

        results = notebook_view.render_notebooks(names, sweep_dir, args.out,
                                                 timeout=args.timeout, sweep=args.sweep)
    else:
        results = render_figures(names, sweep_dir, args.out, sweep=args.sweep)
    failed = 0
    for res in results:
        print(f"== {res.name}")
        for path in res.files:
            print(f"wrote {path}")
        if res.markdown:
            print()
            print(res.markdown)
        if res.error:
            failed += 1
            see = f" (see {res.notebook})" if res.notebook else ""
            print(f"error: {res.error}{see}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
