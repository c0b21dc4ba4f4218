"""Training throughput of N runs side by side on one machine (one GPU shared), img/s per run.

    python -m wetok.bench.side_by_side                            # quick + small, 1 and 4 runs
    python -m wetok.bench.side_by_side --settings small --runs 1 4 --steps 300
    python -m wetok.bench.side_by_side --settings quick --variants before --runs 4 --steps 20
    python -m wetok.bench.side_by_side --device cpu --settings tiny --runs 1 2 --steps 6  # CPU

Each run is a real ``python -m wetok.train`` process (data loading, step, logging, evaluation,
checkpoint) in a temporary run folder; the N runs of a row start together.  Per run, from its
``metrics.jsonl``:

* steady img/s: median of the logged training windows (``train.log_every`` steps each), the
  first window left out (start-up, cuDNN autotuning);
* wall img/s: images from the first to the last training log over that time, so it includes
  the evaluation (``--eval-every``) and everything else the loop does;
* eval s: the time an evaluation held the run up.
The final evaluation and the start-up are outside both figures.

Settings (Hydra overrides): ``quick`` = issue 13's case, ``experiment=table06_gfq scale=quick``
(small model, C=64, B=2, 16x) at 128^2 and batch 16; ``small`` = the same at batch 32; ``short``
= ``scale=short`` (the same model, compiled, on the wallpaper photos: python -m wetok.wallpapers
data/wallpapers); ``tiny`` = the CPU test model.  Variants: ``auto`` = the defaults
(``train.cpu_threads`` and ``train.num_workers`` null: 1 torch thread and 2 loader workers per
run on a GPU); ``before`` =
the earlier defaults (torch's default thread count, one per core; no loader workers);
``threads1`` = one thread, no workers; ``graphs`` = compiled with CUDA graphs
(``train.compile_mode=reduce-overhead``); ``nocache`` = image folders decoded for every crop
(``data.cache_mb=0``).  ``x/1`` = a row's steady img/s per run over the 1-run
row of its setting and variant.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {
    "quick": ["experiment=table06_gfq", "scale=quick", "data.image_size=128",
              "train.batch_size=16"],
    "small": ["experiment=table06_gfq", "scale=quick", "data.image_size=128",
              "train.batch_size=32"],
    "tiny": ["model=tiny", "data.image_size=32", "train.batch_size=4"],
    "short": ["experiment=table06_gfq", "scale=short", "train.batch_size=32"],
}
VARIANTS = {
    "auto": [],
    "before": [f"train.cpu_threads={torch.get_num_threads()}", "train.num_workers=0"],
    "threads1": ["train.cpu_threads=1", "train.num_workers=0"],
    "graphs": ["train.compile=true", "train.compile_mode=reduce-overhead"],
    "nocache": ["data.cache_mb=0"],
}


def run_row(setting: str, variant: str, n: int, args, folder: Path) -> dict:
    """Start n training processes together, wait for all, read their metrics."""
    steps = args.steps
    overrides = [*SETTINGS[setting], *VARIANTS[variant], f"train.steps={steps}",
                 f"train.log_every={args.log_every}",
                 f"train.eval_every={args.eval_every or steps}",
                 f"train.ckpt_every={10 * steps}", f"train.device={args.device}", "logger=none",
                 "eval.metrics=[psnr,ssim]", *args.overrides]
    dirs = [folder / f"{setting}-{variant}-{n}x-{i}" for i in range(n)]
    logs = [open(d.with_suffix(".log"), "w") for d in dirs]
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "wetok.train", *overrides,
                               f"hydra.run.dir={d}"], cwd=ROOT, stdout=log, stderr=log)
             for d, log in zip(dirs, logs)]
    codes = []
    for proc in procs:  # past --timeout a run is stopped and read as far as it logged
        try:
            codes.append(proc.wait(timeout=max(1.0, t0 + args.timeout - time.time())))
        except subprocess.TimeoutExpired:
            proc.kill()
            codes.append("timeout")
            proc.wait()
    for log in logs:
        log.close()
    row = {"setting": setting, "variant": variant, "runs": n, "steps": steps,
           "overrides": overrides, "wall_s": round(time.time() - t0, 1), "codes": codes,
           "per_run": []}
    batch = int([o for o in overrides if o.startswith("train.batch_size=")][-1].split("=")[1])
    for d, code in zip(dirs, codes):
        if code not in (0, "timeout") or not (d / "metrics.jsonl").exists():
            tail = d.with_suffix(".log").read_text()[-2000:]
            raise RuntimeError(f"run {d.name} ended with {code} ({row['wall_s']} s; "
                               f"--timeout {args.timeout}) before it logged:\n{tail}")
        row["per_run"].append(read_run(d, batch))
    for key in ("steady_img_s", "wall_img_s"):
        row[key] = statistics.mean(r[key] for r in row["per_run"])
    row["eval_s"] = max(r["eval_s"] for r in row["per_run"])
    return row


def read_run(run_dir: Path, batch: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    if len(train) < 3:
        raise RuntimeError(f"{run_dir}: {len(train)} training logs; raise --steps")
    last = train[-1]  # train[0] closes the window that holds the start-up
    seconds = max(last["time_s"] - train[0]["time_s"], 1e-9)
    wall = (last["step"] - train[0]["step"]) * batch / seconds
    evals = [r for r in rows if r["split"] == "val" and train[0]["time_s"] < r["time_s"]
             and r["step"] < last["step"]]
    before = {r["step"]: r["time_s"] for r in train}
    eval_s = max((e["time_s"] - before.get(e["step"], e["time_s"]) for e in evals), default=0.0)
    return {"steady_img_s": statistics.median(r["img_per_s"] for r in train[1:]),
            "wall_img_s": wall, "eval_s": eval_s,
            "peak_mem_gib": train[-1].get("peak_mem_gib")}


def table(rows: list[dict]) -> str:
    single = {(r["setting"], r["variant"]): r["steady_img_s"] for r in rows if r["runs"] == 1}
    out = ["| setting | variant | runs | steady img/s per run (each) | x/1 | wall img/s per run "
           "| total img/s | eval s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        each = ", ".join(f"{p['steady_img_s']:.0f}" for p in r["per_run"])
        ref = single.get((r["setting"], r["variant"]))
        ratio = f"{r['steady_img_s'] / ref:.2f}" if ref and r["runs"] > 1 else "-"
        out.append(f"| {r['setting']} | {r['variant']} | {r['runs']} | {r['steady_img_s']:.1f} "
                   f"({each}) | {ratio} | {r['wall_img_s']:.1f} | "
                   f"{r['steady_img_s'] * r['runs']:.0f} | {r['eval_s']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["quick", "small"])
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["auto"])
    p.add_argument("--runs", nargs="+", type=int, default=[1, 4], help="runs side by side")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: only at the end, outside the figures)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides (win)")
    p.add_argument("--timeout", type=float, default=600, help="seconds a row may take")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--keep", default=None, help="keep the run folders here")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.keep or tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for setting in args.settings:
            for variant in args.variants:
                for n in args.runs:
                    rows.append(run_row(setting, variant, n, args, folder))
                    print(f"{setting} {variant} {n}x: {rows[-1]['steady_img_s']:.1f} img/s per run",
                          file=sys.stderr, flush=True)
                    if args.json:  # after every row: a call cut short keeps what it measured
                        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
