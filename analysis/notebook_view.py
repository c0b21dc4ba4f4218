"""The notebooks analysis/notebooks/<name>.ipynb: a view of analysis.registry's figures.

Each notebook sets SWEEP_DIR / OUT_DIR / SWEEP in its parameter cell (overridable with the env
vars WETOK_SWEEP_DIR / WETOK_OUT_DIR / WETOK_SWEEP), then calls paper.report(name, ...) and
shows it. build_notebook makes them (`python -m analysis.render --write-notebooks`);
render_notebooks executes them without Jupyter: it injects the parameters after the parameter
cell, papermill-style, and runs the notebooks one after another in one ipykernel of the
running interpreter, writing the executed <name>.ipynb beside the report's files.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat

from analysis.paper import RenderResult, default_out_dir
from analysis.registry import FIGURES

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = Path(__file__).resolve().parent / "notebooks"


def build_notebook(name: str) -> nbformat.NotebookNode:
    """The notebook for one figure/table (deterministic: fixed cell ids)."""
    figure = FIGURES[name]
    v4 = nbformat.v4
    header = (f"# {figure.title}\n\n{figure.shows}\n\nRender without Jupyter: "
              f"`python -m analysis.render <sweep dir> --figure {name}`. "
              "The parameters below are overridden by the env vars WETOK_SWEEP_DIR, "
              "WETOK_OUT_DIR and WETOK_SWEEP.")
    source = ("# The memory table CSV, or a folder holding memory*.csv\n"
              if figure.reads == "memory" else "")
    params = ("import os\n\n" + source
              + f'SWEEP_DIR = os.environ.get("WETOK_SWEEP_DIR", "runs/{name}")\n'
              'OUT_DIR = os.environ.get("WETOK_OUT_DIR")  # None: SWEEP_DIR/analysis\n'
              f'SWEEP = os.environ.get("WETOK_SWEEP", "{name}")  # keep the runs of this sweep')
    make = ("from analysis import paper\n\n"
            f'report = paper.report("{name}", SWEEP_DIR, OUT_DIR, sweep=SWEEP)\n'
            "report.show()")
    cells = [
        v4.new_markdown_cell(header),
        v4.new_code_cell(params, metadata={"tags": ["parameters"]}),
        v4.new_code_cell(make),
        v4.new_code_cell("[str(f) for f in report.files]"),
    ]
    for i, cell in enumerate(cells):
        cell["id"] = f"{name}-{i}"
    return v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })


def write_notebooks(directory=NOTEBOOK_DIR) -> list[Path]:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in FIGURES:
        path = directory / f"{name}.ipynb"
        nbformat.write(build_notebook(name), path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- execution
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
    out_dir = Path(default_out_dir(sweep_dir) if out_dir is None else out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    client = NotebookClient(nbformat.v4.new_notebook(), timeout=timeout, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT)}})
    client.create_kernel_manager()  # owned by the client: shut down when done
    _fix_kernel_spec(client.km)
    results = [RenderResult(n, notebook=out_dir / f"{n}.ipynb") for n in names]
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
