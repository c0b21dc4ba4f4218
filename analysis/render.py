"""Execute the analysis notebooks on a sweep folder, without Jupyter (CLI `wetok-analyze`).

    python -m analysis.render runs/fig3_quantizer            # the notebook(s) its sweep names pick
    python -m analysis.render runs --all --out reports/      # every notebook that has data
    python -m analysis.render runs/x --notebook fig4_groups  # force one
    python -m analysis.render --list runs                    # which notebooks fit, no execution
    python -m analysis.render --write-notebooks              # regenerate analysis/notebooks/*.ipynb

Each notebook reads SWEEP_DIR / OUT_DIR / SWEEP from its parameter cell (defaults there are
overridable with the env vars WETOK_SWEEP_DIR / WETOK_OUT_DIR / WETOK_SWEEP); this module
injects the values after that cell, papermill-style, and runs the notebooks one after another
in one ipykernel of the running interpreter. Outputs go to OUT (default SWEEP_DIR/analysis):
<name>*.png, <name>.md and the executed <name>.ipynb.
The notebooks are thin: the logic lives in analysis/records.py and analysis/figures.py.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from analysis import records

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"

# name -> (title, what it shows, input kind: "runs" | "memory")
NOTEBOOKS = {
    "fig3_quantizer": (
        "Fig. 3: quantization method ablation",
        "LFQ (g=1, d'=16), BSQ (g=16, d'=1) and GQ (g=2, d'=8) at d = 16. Validation loss, "
        "rFID, LPIPS, SSIM and PSNR vs step, and their final values.", "runs"),
    "fig4_groups": (
        "Fig. 4: number of groups in GQ",
        "GQ with d' = 8 and G = 1, 2, 4, ... groups: metrics vs step, and final metrics vs G.",
        "runs"),
    "fig5_architecture": (
        "Fig. 5: model architecture",
        "Base channels C x residual blocks B (3 x 3 grid): curves, final values and C x B grids.",
        "runs"),
    "fig6_data_schedule": (
        "Fig. 6: training data and learning-rate schedule",
        "ImageNet vs general-domain data (GD); constant LR vs warm-up + cosine decay.", "runs"),
    "tab1_memory": (
        "Table 1: quantizer memory usage",
        "Peak GPU memory of LFQ / BSQ / GQ for d = 8 ... 40 from `python -m wetok.memory` "
        "(a memory*.csv file, or a folder holding one); OOM where it ran out of memory.",
        "memory"),
    "tab2_generative_decoder": (
        "Table 2: generative decoder",
        "Stage 1 (reconstruction) vs stage 2 (generative decoder): rFID, LPIPS, SSIM, PSNR.",
        "runs"),
    "lfq_exact_d24": (
        "LFQ with exact codebook entropy at d = 24",
        "Where the paper's LFQ runs out of memory: LFQ with the exact factorised entropy vs GQ "
        "at d = 24; curves, training entropies, final metrics, peak memory.", "runs"),
}


# ----------------------------------------------------------------------------- notebooks
def build_notebook(name: str) -> nbformat.NotebookNode:
    """The notebook for one figure/table (deterministic: fixed cell ids)."""
    title, what, kind = NOTEBOOKS[name]
    v4 = nbformat.v4
    header = (f"# {title}\n\n{what}\n\nRender without Jupyter: "
              f"`python -m analysis.render <sweep dir> --notebook {name}`. "
              "The parameters below are overridden by the env vars WETOK_SWEEP_DIR, "
              "WETOK_OUT_DIR and WETOK_SWEEP.")
    if kind == "memory":
        params = (
            "import os\n\n"
            "# The memory table CSV, or a folder holding memory*.csv\n"
            f'SWEEP_DIR = os.environ.get("WETOK_SWEEP_DIR", "runs/{name}")\n'
            'OUT_DIR = os.environ.get("WETOK_OUT_DIR") or os.path.join(\n'
            "    SWEEP_DIR if os.path.isdir(SWEEP_DIR) else os.path.dirname(SWEEP_DIR), "
            '"analysis")')
        load = ("from analysis import figures, records\n\n"
                "mem = records.load_memory(SWEEP_DIR)\n"
                "mem")
        make = (f"report = figures.{name}(mem, OUT_DIR)\n"
                "report.show()")
    else:
        params = (
            "import os\n\n"
            f'SWEEP_DIR = os.environ.get("WETOK_SWEEP_DIR", "runs/{name}")\n'
            'OUT_DIR = os.environ.get("WETOK_OUT_DIR") or os.path.join(SWEEP_DIR, "analysis")\n'
            f'SWEEP = os.environ.get("WETOK_SWEEP", "{name}")  # keep the runs of this sweep')
        load = ("from analysis import figures, records\n\n"
                "runs = records.select_sweep(records.load_runs(SWEEP_DIR), SWEEP)\n"
                'history = records.load_history(SWEEP_DIR, runs=runs["run"])\n'
                r'runs.filter(regex=r"^(run|stage|status|steps|choice\.|final\.)")')
        make = (f"report = figures.{name}(runs, history, OUT_DIR)\n"
                "report.show()")
    cells = [
        v4.new_markdown_cell(header),
        v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        v4.new_code_cell(load),
        v4.new_code_cell(make),
        v4.new_code_cell("[str(f) for f in report.files]"),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i}"
    nb = v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
    return nb


def write_notebooks(directory=NOTEBOOK_DIR) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in NOTEBOOKS:
        path = directory / f"{name}.ipynb"
        nbformat.write(build_notebook(name), path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- which notebook
def detect_notebooks(sweep_dir) -> list[str]:
    """Notebooks whose data is under sweep_dir: by the `sweep` names in the summaries
    (equal to, or starting with, the notebook name), the folder's own name, and for
    tab1_memory a memory*.csv file."""
    path = Path(sweep_dir)
    found = []
    if records.find_memory_csv(path):
        found.append("tab1_memory")
    if path.is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = records.sweep_names(records.load_runs(path, fill_final_from_history=False))
        if not names and any(path.rglob("summary.json")):
            names = [path.name]
        for nb in NOTEBOOKS:
            if NOTEBOOKS[nb][2] == "runs" and any(n == nb or n.startswith(nb) for n in names):
                found.append(nb)
    return [nb for nb in NOTEBOOKS if nb in found]


# ----------------------------------------------------------------------------- execution
@dataclass
class RenderResult:
    name: str
    notebook: Path                      # the executed notebook written to OUT
    files: list = field(default_factory=list)   # everything written to OUT for it
    markdown: str = ""
    error: str | None = None


def _fix_kernel_spec(km) -> None:
    """Make km start ipykernel in *this* interpreter (the running venv).

    jupyter_client maps a spec's "python" to sys.executable; a spec naming another
    interpreter, or no python3 spec at all, is replaced by this interpreter's ipykernel."""
    from jupyter_client.kernelspec import KernelSpec, NoSuchKernel

    native = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    try:
        spec = km.kernel_spec
    except NoSuchKernel:
        spec = None
    python_names = {"python", f"python{sys.version_info[0]}",
                    f"python{sys.version_info[0]}.{sys.version_info[1]}", sys.executable}
    if spec is None:
        km._kernel_spec = KernelSpec(argv=native, display_name="Python 3", language="python")
    elif not spec.argv or spec.argv[0] not in python_names:
        spec.argv = native


def inject_parameters(nb, **values) -> None:
    """Insert a cell setting the parameters after the `parameters` cell (as papermill does),
    so the executed notebook shows what it ran on."""
    source = "# Injected by analysis.render\n" + "\n".join(
        f"{k} = {str(v)!r}" for k, v in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    at = next((i + 1 for i, c in enumerate(nb.cells)
               if "parameters" in c.get("metadata", {}).get("tags", [])), 0)
    nb.cells.insert(at, cell)


def render_notebooks(names, sweep_dir, out_dir=None, timeout: int = 300,
                     notebook_dir=NOTEBOOK_DIR, sweep: str | None = None) -> list[RenderResult]:
    """Execute the notebooks top to bottom on sweep_dir, one after another in one kernel
    (ipykernel of this interpreter, cwd = repo root); write <name>.ipynb, PNGs and <name>.md
    to out_dir (default sweep_dir/analysis). A failing notebook is reported in .error (its
    partly executed notebook is still written) and the next one runs."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    sweep_dir = Path(sweep_dir).resolve()
    if out_dir is None:
        out_dir = (sweep_dir if sweep_dir.is_dir() else sweep_dir.parent) / "analysis"
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nbformat.v4.new_notebook(), timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT)}})
    client.create_kernel_manager()  # owned by the client: shut down when done
    _fix_kernel_spec(client.km)
    results = [RenderResult(n, out_dir / f"{n}.ipynb") for n in names]
    try:
        with client.setup_kernel(env=env):
            info = client.wait_for_reply(client.kc.kernel_info())
            for result in results:
                _run_one(client, result, info, sweep_dir, out_dir, sweep, notebook_dir,
                         CellExecutionError)
    except Exception as exc:  # the kernel did not start or died
        for result in results:
            if not result.notebook.exists() and result.error is None:
                result.error = f"{result.name}: kernel failed: {type(exc).__name__}: {exc}"
    return results


def _run_one(client, result, info, sweep_dir, out_dir, sweep, notebook_dir, cell_error):
    name = result.name
    nb_path = Path(notebook_dir) / f"{name}.ipynb"
    nb = nbformat.read(nb_path, as_version=4) if nb_path.exists() else build_notebook(name)
    inject_parameters(nb, SWEEP_DIR=sweep_dir, OUT_DIR=out_dir, SWEEP=sweep or name)
    if info and "language_info" in info.get("content", {}):
        nb.metadata["language_info"] = info["content"]["language_info"]
    before = _mtimes(out_dir, name)
    client.nb = nb
    client.reset_execution_trackers()
    try:
        for index, cell in enumerate(nb.cells):
            client.execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
    except cell_error as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        result.error = f"{name}: a cell failed: {lines[-1] if lines else repr(exc)}"
    except Exception as exc:  # timeout, dead kernel
        result.error = f"{name}: {type(exc).__name__}: {exc}"
    nbformat.write(nb, result.notebook)
    after = _mtimes(out_dir, name)
    result.files = sorted(p for p, t in after.items() if before.get(p) != t)
    md = out_dir / f"{name}.md"
    if md in result.files:
        result.markdown = md.read_text()


def render_notebook(name: str, sweep_dir, out_dir=None, **kwargs) -> RenderResult:
    """render_notebooks for one notebook."""
    return render_notebooks([name], sweep_dir, out_dir, **kwargs)[0]


def _mtimes(out_dir: Path, name: str) -> dict:
    return {p: p.stat().st_mtime_ns for p in out_dir.glob(f"{name}*") if p.is_file()}


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="wetok-analyze", description="Render the paper's figures/tables from run records.")
    parser.add_argument("sweep_dir", nargs="?", help="sweep folder of run folders (or, for "
                        "tab1_memory, a memory*.csv / a folder holding one)")
    parser.add_argument("--out", help="output folder (default SWEEP_DIR/analysis)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--notebook", action="append", choices=list(NOTEBOOKS),
                       help="render this notebook (repeatable); default: those the sweep fits")
    which.add_argument("--all", action="store_true", help="render every notebook with data")
    parser.add_argument("--sweep", help="keep runs of this sweep name (default: notebook name; "
                        "all runs when none match)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    parser.add_argument("--list", action="store_true", help="print the fitting notebooks only")
    parser.add_argument("--write-notebooks", action="store_true",
                        help=f"regenerate the notebooks in {NOTEBOOK_DIR} and exit")
    args = parser.parse_args(argv)

    if args.write_notebooks:
        for path in write_notebooks():
            print(f"wrote {path}")
        return 0
    if not args.sweep_dir:
        parser.error("SWEEP_DIR is required (or --write-notebooks)")
    sweep_dir = Path(args.sweep_dir)
    if not sweep_dir.exists():
        print(f"error: no such folder or file: {sweep_dir}", file=sys.stderr)
        return 2
    detected = detect_notebooks(sweep_dir)
    if args.list:
        print("\n".join(detected) if detected else "(no notebook fits)")
        return 0
    names = args.notebook or detected
    if not names:
        if args.all:
            print(f"no notebook has data under {sweep_dir}")
            return 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = records.sweep_names(records.load_runs(sweep_dir)) if sweep_dir.is_dir() else []
        print(f"error: no notebook fits {sweep_dir} (sweep names found: {found or 'none'}); "
              f"pass --notebook one of {list(NOTEBOOKS)}", file=sys.stderr)
        return 2
    failed = 0
    for res in render_notebooks(names, sweep_dir, args.out, timeout=args.timeout,
                                sweep=args.sweep):
        print(f"== {res.name}")
        for path in res.files:
            print(f"wrote {path}")
        if res.markdown:
            print()
            print(res.markdown)
        if res.error:
            failed += 1
            print(f"error: {res.error} (see {res.notebook})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
