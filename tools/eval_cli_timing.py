"""Issue 10's target as a user meets it: `python -m wetok.evaluate` timed from the shell (Python
start-up, checkpoint, metric networks, compilation, every image, the final FID).

    python tools/eval_cli_timing.py --out OUT --images 1024 50000 \
        --overrides experiment=table06_gfq eval.batch_size=128 eval.num_workers=14 eval.compile=true

In a temporary folder: --images JPEG folders (500x375, as the evaluation benchmark writes them),
a checkpoint of the randomly initialised model, and RANDOM-weight files under the pretrained
names (VGG16 for LPIPS, InceptionV3 for rFID; the same compute, values meaningless: only the
timings are printed). Commands, one after the other: the small folder (fills the Inductor
cache at compile_cache_dir when eval.compile is on), the small folder again (cache filled) and
once per --variant; then per larger size the folder with an empty evaluation cache (first pass
over a data set: baselines and the references' rFID statistics computed) and again (later pass:
both from eval.cache_dir). Each command's wall time (fork to exit) is split by its eval.json
timings: Python start-up (imports, Hydra), checkpoint, CUDA set-up, model, loader, metric
networks, first step (compilation), other batches, result, and exit. Before them, the floors:
Python alone, the imports, the imports and a CUDA context, and whether a bytecode cache is used.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from omegaconf import OmegaConf

from wetok import checkpoint
from wetok import weights as W
from wetok.bench.evaluate import folder_config, random_model, write_folders
from wetok.metrics import build_inception


def random_weight_files(folder: Path) -> None:
    """Seeded random VGG16 and InceptionV3 state dicts under the file names wetok.weights finds."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().state_dict(), folder / W.VGG16_FILE)
    torch.save(build_inception(random_weights=True).state_dict(), folder / W.INCEPTION_FILE)


def write_checkpoint(overrides: list[str], root: Path, tmp: Path) -> Path:
    """checkpoints/last.pt of a random model in a run folder, as training would save it."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = folder_config(overrides, root, tmp, device)
    state = random_model(cfg, device).state_dict()
    run = tmp / "run"
    checkpoint.save({"step": 0, "model": state, "ema": state,
                     "config": OmegaConf.to_container(cfg, resolve=True)},
                    run / "checkpoints" / "last.pt")
    return run


COLUMNS = ("command wall s", "Python start-up s", "checkpoint s", "CUDA set-up s", "model s",
           "loader s", "metric networks s", "first step (compile) s", "other batches s",
           "result s", "exit s")


def timed(cmd: list[str], log: Path, out: Path, env: dict | None = None) -> list[float]:
    """The command's seconds from fork to exit, split by the timings of the eval.json it writes
    at out (Unix times of its call, evaluate_model's parts); its output goes to log."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env=dict(os.environ, **(env or {}))).returncode
    t1 = time.time()
    if rc:
        sys.exit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    t = json.loads(out.read_text())["timings"]
    return [t1 - t0, t["started_at"] - t0, t["checkpoint_s"], t["device_s"], t["model_s"],
            t["loader_s"], t["setup_s"] - t["loader_s"], t["first_batch_s"] + t["first_step_s"],
            t["batches_s"], t["result_s"], t1 - t["finished_at"]]


FLOORS = (("python -c pass", "pass"),
          ("import wetok.evaluate", "import wetok.evaluate"),
          ("import wetok.evaluate, again", "import wetok.evaluate"),
          ("import wetok.evaluate + CUDA context",
           "import wetok.evaluate, torch; torch.zeros(1, device='cuda').item()"))


def floors() -> list[str]:
    """Seconds from fork to exit of Python alone, the evaluation's imports, and those plus a
    CUDA context: what no change to the evaluation can take away. Python compiles every
    module it imports from source unless it finds or can write a bytecode cache (a read-only
    install without __pycache__ pays seconds per process; PYTHONPYCACHEPREFIX gives it one):
    the first line says which case this is."""
    cached = (Path(torch.__file__).parent / "__pycache__").is_dir()
    lines = [f"bytecode: torch's __pycache__ {'present' if cached else 'ABSENT'}, "
             f"PYTHONPYCACHEPREFIX={sys.pycache_prefix}, "
             f"PYTHONDONTWRITEBYTECODE={int(sys.dont_write_bytecode)}"]
    for label, code in FLOORS:
        if "cuda" in code and not torch.cuda.is_available():
            continue
        t0 = time.time()
        subprocess.run([sys.executable, "-c", code], check=True)
        lines.append(f"{label}: {time.time() - t0:.2f} s")
    return lines


def split_variant(variant: str) -> tuple[list[str], dict, list[str]]:
    """'[PYTHON ARGS --] [NAME=VALUE ...] [override ...]' -> (Python's arguments, environment
    variables (upper-case names), Hydra overrides)."""
    words = variant.split()
    python_args, words = (words[:words.index("--")], words[words.index("--") + 1:]) \
        if "--" in words else ([], words)
    env = dict(w.split("=", 1) for w in words if w.split("=")[0].isupper())
    return python_args, env, [w for w in words if not w.split("=")[0].isupper()]


def row(label: str, n: int, seconds: list[float]) -> str:
    return f"| {label} | {n} | {' | '.join(f'{x:.1f}' for x in seconds)} | {n / seconds[0]:.0f} |"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True,
                   help="folder for logs, eval.json files, table")
    p.add_argument("--images", type=int, nargs="+", default=[1024, 50000],
                   help="the small folder (fills the compile cache), then the timed ones (a first "
                        "and a later pass each)")
    p.add_argument("--variant", action="append", default=[],
                   help="one more command on the small folder after the cache is filled, with "
                        "these space-separated NAME=VALUE environment variables (upper-case "
                        "names) and Hydra overrides, e.g. 'TORCHINDUCTOR_COMPILE_THREADS=1' or "
                        "'+run.eval.compile=false'; Python's own arguments before a '--', e.g. "
                        "'-m cProfile -o OUT/warm.prof --' or '-X importtime --'")
    p.add_argument("--overrides", nargs="*", default=["experiment=table06_gfq",
                                                      "eval.batch_size=128", "eval.compile=true"])
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    small, timed_sizes = args.images[0], args.images[1:]
    plan = [("fills the compile cache", small, "cache-small", "")]
    plan += [(f"small, compile cache filled {v}".strip(), small, "cache-small", v)
             for v in [""] + args.variant]
    for n in timed_sizes:
        plan += [("first pass over the data set", n, f"cache-{n}", ""),
                 ("later pass (eval.cache_dir filled)", n, f"cache-{n}", "")]
    rows, floor = [], floors()
    print("\n".join(floor))
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        t0 = time.perf_counter()
        folders = write_folders(tmp / "data", sorted(set(args.images)))
        random_weight_files(tmp / "weights")
        run = write_checkpoint(args.overrides, folders[max(args.images)], tmp)
        print(f"set-up (JPEGs, random-weight files, checkpoint): {time.perf_counter() - t0:.1f} s")
        for label, n, cache, variant in plan:
            out = args.out / f"eval-{len(rows) + 1}.json"
            python_args, env, overrides = split_variant(variant)
            cmd = [sys.executable, *python_args, "-m", "wetok.evaluate", str(run),
                   f"num_images={n}", f"out={out}", f"+run.data.root={folders[n]}",
                   f"+run.eval.cache_dir={tmp / cache}", f"+run.weights.vgg16={tmp / 'weights'}",
                   f"+run.weights.inception={tmp / 'weights'}", *overrides]
            rows.append((label, n, timed(cmd, args.out / f"eval-{len(rows) + 1}.log", out, env)))
            print(row(*rows[-1]), flush=True)
    table = ["RANDOM-weight VGG16 and Inception files (timings only; values meaningless)",
             f"overrides: {' '.join(args.overrides)}; WETOK_CACHE={os.environ.get('WETOK_CACHE')}",
             *floor, "", f"| command | images | {' | '.join(COLUMNS)} | img/s of the command |",
             "|---|---|" + "---|" * (len(COLUMNS) + 1)]
    table += [row(*r) for r in rows]
    (args.out / "eval_cli_timing.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
