"""What ``python -m wetok.bench.train_step`` prints and writes: the header, the per-mode lines,
the markdown table, the lines against the reference code's anchor, and the CSV / JSON files."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

REFERENCE = {"name": "Open-MAGVIT2 reference code (H100)", "ms_per_step": 318.0, "img_s": 50.0,
             "peak_gib": 50.7}
TARGET = {"img_s": 150.0, "peak_gib": 25.0}
FIELDS = ("mode", "gpus", "status", "ms_median", "img_s", "peak_gib", "compile_s", "tflop_step",
          "tflop_s", "ms_p10", "ms_p90", "ms_min", "ms_max", "wall_img_s", "images_per_step",
          "gn_silu", "note")


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown(rows: list[dict]) -> str:
    """One row per mode: median step, img/s, peak GiB, compile s, TFLOP/step, TFLOP/s."""
    lines = ["| mode | ms/step (median) | img/s | peak GiB | compile s | TFLOP/step | TFLOP/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['mode']} | {r['status']} | - | - | - | - | - |")
            continue
        compile_s = _fmt(r.get("compile_s")) if r["mode"] == "compile" else "-"
        lines.append(f"| {r['mode']} | {_fmt(r['ms_median'])} | {_fmt(r['img_s'])} | "
                     f"{_fmt(r.get('peak_gib'), 2)} | {compile_s} | "
                     f"{_fmt(r.get('tflop_step'), 3)} | {_fmt(r.get('tflop_s'), 2)} |")
    return "\n".join(lines)


def header(info: dict) -> str:
    """What was measured, on what, with which config."""
    return "\n".join([
        "# WeTok training-step benchmark",
        f"device: {info['device_name']} | torch {info['torch']} | cuda {info['cuda']}",
        f"config: model={info['model']} (C={info['channels']}, ch_mult={info['channel_mult']}, "
        f"B={info['num_res_blocks']}), {info['image_size']}^2, batch {info['batch_size']} "
        f"x accum {info['accum']} x {info['gpus']} rank(s), GQ g={info['groups']} d'={info['group_dim']} "
        f"({info['entropy_mode']}), loss: recon {info['recon']} + LPIPS x"
        f"{info['perceptual_weight']} + GAN x{info['gan_weight']} + LeCam x{info['lecam_weight']}",
        f"precision: {info['precision']}, channels_last={info['channels_last']}",
        f"LPIPS: {info['lpips']}",
        f"overrides: {' '.join(info['overrides'])}",
        f"measured: full Trainer.train_step (G fwd+bwd+Adam, D fwd+bwd+Adam, EMA); "
        f"{info['warmup']} warm-up steps, median of {info['steps']} timed steps "
        f"({info['timer']}); {info['buffers']} rotating random input batches on the device; "
        f"peak = max_memory_allocated over the timed steps; compile s = warm-up excess over "
        f"the median; FLOPs = FlopCounterMode over one eager step (conv/matmul only)",
    ])


def anchor_lines(rows: list[dict], cuda: bool) -> list[str]:
    """The reference code's numbers and the target; on a GPU each mode against them."""
    ref = REFERENCE
    lines = [f"anchor: {ref['name']}: {ref['ms_per_step']:.0f} ms/step = {ref['img_s']:.0f} "
             f"img/s, peak {ref['peak_gib']} GiB; target >= {TARGET['img_s']:.0f} img/s at "
             f"<= {TARGET['peak_gib']:.0f} GiB"]
    if cuda:
        for r in rows:
            if r["status"] == "ok" and r.get("peak_gib") is not None:
                ok = r["img_s"] >= TARGET["img_s"] and r["peak_gib"] <= TARGET["peak_gib"]
                lines.append(f"  {r['mode']}: {r['img_s'] / ref['img_s']:.2f}x reference img/s, "
                             f"{r['peak_gib'] / ref['peak_gib']:.2f}x reference memory -> "
                             f"target {'met' if ok else 'not met'}")
    return lines


def mode_line(row: dict) -> str:
    """The line printed when a mode is done."""
    extra = ""
    if row["status"] == "ok":
        extra = (f"{row['ms_median']:.1f} ms/step (p10 {row['ms_p10']:.1f}, p90 "
                 f"{row['ms_p90']:.1f}), {row['img_s']:.1f} img/s, wall mean "
                 f"{row['wall_img_s']:.1f} img/s")
    return f"[{row['mode']}] {row['status']} {extra} {row.get('note') or ''}".rstrip()


def summary(rows: list[dict], eval_rows: list[dict], cuda: bool) -> str:
    """The closing text: the table, the anchor lines, the evaluation rows and the notes."""
    lines = ["", markdown(rows), ""] + anchor_lines(rows, cuda)
    for r in eval_rows:
        if r["status"] == "ok":
            lines.append(f"{r['mode']}: {r['img_s']:.1f} img/s ({r['ms_median']:.1f} ms per "
                         f"batch of {r['images_per_step']})" + (f"; {r['note']}" if r.get("note")
                                                                else ""))
        else:
            lines.append(f"{r['mode']}: {r['status']} {r.get('note', '')}")
    for r in rows:
        if r.get("note"):
            lines.append(f"note [{r['mode']}]: {r['note']}")
    return "\n".join(lines)


def write(rows: list[dict], info: dict, eval_rows: list[dict], args) -> None:
    """--csv: one row per mode and evaluation row (FIELDS); --json: everything."""
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            for r in rows + eval_rows:
                writer.writerow({k: r.get(k) for k in FIELDS})
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"info": info, "train": rows, "eval": eval_rows,
                                    "reference": REFERENCE, "target": TARGET}, indent=2))
