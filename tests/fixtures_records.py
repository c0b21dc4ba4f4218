"""Small synthetic but well-formed run folders (docs/DESIGN.md, "Records") for analysis tests.

    paths = make_all(tmp_path)       # {"fig3_quantizer": Path, ..., "tab1_memory": Path}
    FINAL[("fig3_quantizer", "quantizer=gq")]["psnr"]   # the numbers written

Run folders look like what wetok/record_writer.py writes (format version 1, without
schema_version): .hydra/config.yaml, config.yaml,
metrics.jsonl (train + val rows), summary.json (name, sweep, status, stage, steps, wall_time_s,
peak_mem_gib, choices, params, final, baselines, skipped, counts), checkpoints/.
Fig 3 has 3 seeds per setting (GQ and LFQ overlap: unresolved; BSQ below both: resolved);
Fig 4 is written as older records without `baselines`.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from wetok.record_schema import VAL_KEYS

FINAL: dict = {}  # (sweep, run folder) -> final metrics written
# the trivial predictors on the validation images (wetok's evaluation writes these)
BASELINES = {"mean_colour": {"psnr": 18.5, "ssim": 0.35}, "avg_pool": {"psnr": 19.5, "ssim": 0.42}}


def base_params(sweep: str, name: str, run_dir: Path, stage: int = 1, steps: int = 40) -> dict:
    return {
        "name": name, "sweep": sweep, "seed": 0, "stage": stage, "init_from": None,
        "run_dir": str(run_dir),
        "train.steps": steps, "train.batch_size": 8, "train.global_batch_size": None,
        "train.ema_decay": 0.999, "train.precision": "auto", "train.log_every": 10,
        "train.eval_every": 20,
        "eval.num_images": 64, "eval.metrics": ["psnr", "ssim", "lpips", "rfid"],
        "quantizer.name": "gq", "quantizer.dim": None, "quantizer.groups": 2,
        "quantizer.group_dim": 8, "quantizer.codebook_entropy": "grouped", "quantizer.tau": 0.01,
        "quantizer.l2_norm": False, "quantizer.entropy_weight": 0.1, "quantizer.zeta": 1.0,
        "model.name": "tiny", "model.channels": 32, "model.channel_mult": [1, 2, 2],
        "model.num_res_blocks": 1, "model.downsample": 4,
        "schedule.name": "constant", "schedule.warmup_steps": 0, "schedule.end_ratio": 1.0,
        "data.name": "bundled", "data.image_size": 64,
        "optim.lr": 1e-4, "optim.betas": [0.5, 0.9],
        "logger.wandb": False,
    }


def val_row(step: int, steps: int, q: float, rfid: bool = True) -> dict:
    """Validation metrics improving with step; q in (0, 1] is the setting's quality."""
    t = step / steps
    row = {
        "val_loss": round(0.30 - 0.15 * q * t, 6),
        "lpips": round(0.40 - 0.20 * q * t, 6),
        "ssim": round(0.30 + 0.25 * q * t, 6),
        "psnr": round(17.0 + 4.0 * q * t + 0.0037, 6),
        "usage": round(0.5 + 0.4 * q, 6),
        "joint_codes": int(100 + 300 * q),
    }
    if rfid:
        row["rfid"] = round(40.0 - 30.0 * q * t, 6)
    return row


def write_run(run_dir: Path, *, sweep: str, name: str | None = None, q: float = 0.5,
              stage: int = 1, status: str = "finished", steps: int = 40,
              choices: dict | None = None, params: dict | None = None, rfid: bool = True,
              write_final: bool = True, truncated_tail: bool = False, extra: dict | None = None,
              peak_mem_gib: float = 1.25, step0: int = 0, logged_until: int | None = None,
              baselines: dict | None = BASELINES) -> dict:
    """One run folder; returns its final metrics (the last val row)."""
    run_dir = Path(run_dir)
    name = name or sweep
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    flat = base_params(sweep, name, run_dir, stage, steps)
    flat.update(params or {})
    (run_dir / ".hydra" / "config.yaml").write_text(f"name: {name}\nsweep: {sweep}\n")
    (run_dir / "config.yaml").write_text(f"name: {name}\nsweep: {sweep}\nstage: {stage}\n")
    lines, last_val = [], None
    until = steps if logged_until is None else logged_until
    for step in range(step0 + 10, step0 + until + 1, 10):
        lines.append({"step": step, "time_s": 0.5 * step, "split": "train",
                      "loss": 1.0 / step, "loss_rec": 0.5 / step, "loss_lpips": 0.2,
                      "loss_gan": 0.1, "loss_commit": 0.01, "token_entropy": 0.3 - 0.001 * step,
                      "codebook_entropy": 2.0 + 0.01 * step, "loss_disc": 1.0,
                      "lr": 1e-4, "img_per_s": 100.0})
        if step % 20 == 0:
            last_val = {"step": step, "time_s": 0.5 * step + 0.1, "split": "val",
                        **val_row(step - step0, steps, q, rfid)}
            lines.append(last_val)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncated_tail:
        text += '{"step": 999, "time_s": 1.0, "spl'  # a killed run's half-written line
    (run_dir / "metrics.jsonl").write_text(text)
    final = {k: v for k, v in (last_val or {}).items() if k in VAL_KEYS}
    summary = {
        "name": name, "sweep": sweep, "stage": stage, "status": status,
        "choices": {"quantizer": flat["quantizer.name"], "model": flat["model.name"],
                    "schedule": flat["schedule.name"], "data": flat["data.name"],
                    "loss": "quick", "optim": "adam", "scale": "quick", **(choices or {})},
        "params": flat, "wall_time_s": 12.5 + q, "counts": {"bad_images": 0},
        "skipped": {} if rfid else {"rfid": "no Inception weights (offline)"},
    }
    if status != "running":
        summary.update(steps=step0 + until, peak_mem_gib=peak_mem_gib)
    if write_final:
        summary["final"] = final
    if baselines is not None:
        summary["baselines"] = baselines
    summary.update(extra or {})
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    FINAL[(sweep, run_dir.name)] = final
    return final


def make_fig3(root: Path) -> Path:
    """3 seeds of quantizer lfq / bsq / gq at d = 16 (presets of Tables 6-8), no rFID
    (skipped). PSNR ranges: GQ and LFQ overlap, BSQ is below both (and below baseline)."""
    sweep = Path(root) / "fig3_quantizer"
    for quant, exp, g, dp, qs in (("lfq", "table07_lfq", 1, 16, (0.8, 0.86, 0.89)),
                                  ("bsq", "table08_bsq", 16, 1, (0.3, 0.28, 0.33)),
                                  ("gq", "table06_gfq", 2, 8, (0.9, 0.88, 0.92))):
        for seed, q in enumerate(qs):
            write_run(sweep / f"quantizer={quant},seed={seed}", sweep="fig3_quantizer", name=exp,
                      q=q, rfid=False, choices={"quantizer": quant, "experiment": exp},
                      params={"quantizer.name": quant, "quantizer.groups": g,
                              "quantizer.group_dim": dp, "seed": seed,
                              "quantizer.entropy_mode": "exact" if quant == "lfq"
                              else "grouped", "quantizer.l2_norm": quant == "bsq"})
    return sweep


def make_fig4(root: Path) -> Path:
    """G = 1, 2, 4, 8 (d' = 8); G = 8 still running: no final, truncated metrics.jsonl.
    Older records: no `baselines`."""
    sweep = Path(root) / "fig4_groups"
    for g, table in ((1, 11), (2, 12), (4, 13)):
        write_run(sweep / "multirun" / f"quantizer.groups={g}", sweep="fig4_groups",
                  q=0.2 * g, choices={"experiment": f"table{table}_g{g}"},
                  params={"quantizer.groups": g}, baselines=None)
    write_run(sweep / "multirun" / "quantizer.groups=8", sweep="fig4_groups", q=0.95,
              baselines=None,
              params={"quantizer.groups": 8}, status="running", write_final=False,
              choices={"experiment": "table14_g8"},
              truncated_tail=True, logged_until=20, extra={"note": "an extra key"})
    return sweep


def make_fig5(root: Path) -> Path:
    sweep = Path(root) / "fig5_architecture"
    for c in (128, 256):
        for b in (2, 4):
            write_run(sweep / f"model=c{c}_b{b}", sweep="fig5_architecture",
                      q=c / 300 + b / 20, choices={"model": f"c{c}_b{b}"},
                      params={"model.name": f"c{c}_b{b}", "model.channels": c,
                              "model.num_res_blocks": b, "model.channel_mult": None})
    return sweep


def make_fig6(root: Path) -> Path:
    """As at scale=quick: both data presets read the bundled photos (choice.data is the same),
    the experiment preset tells them apart; x constant / warm-up + cosine."""
    sweep = Path(root) / "fig6_data_schedule"
    for exp, schedule, q in (("table26_imagenet", "constant", 0.7),
                             ("table27_general", "constant", 0.6),
                             ("table26_imagenet", "warmup_cosine", 0.4),
                             ("table27_general", "warmup_cosine", 0.35)):
        write_run(sweep / f"experiment={exp},schedule={schedule}", sweep="fig6_data_schedule",
                  q=q, choices={"experiment": exp, "schedule": schedule, "data": "bundled"},
                  params={"schedule.name": schedule})
    return sweep


def make_tab2(root: Path) -> Path:
    """Stage 1 (reconstruction) and stage 2 (generative decoder from stage 1's checkpoint),
    in <overrides>/stage1 and <overrides>/stage2 as sweeps/tab2_generative_decoder.yaml does."""
    sweep = Path(root) / "tab2_generative_decoder" / "experiment=table09_gd_stage1"
    s1 = sweep / "stage1"
    choices = {"experiment": "table09_gd_stage1"}
    write_run(s1, sweep="tab2_generative_decoder", q=0.5, stage=1, choices=choices)
    write_run(sweep / "stage2", sweep="tab2_generative_decoder", q=0.6, stage=2, choices=choices,
              params={"init_from": str(s1 / "checkpoints" / "last.pt")})
    return sweep.parent


def make_lfq_exact(root: Path) -> Path:
    sweep = Path(root) / "lfq_exact_d24"
    write_run(sweep / "quantizer=lfq", sweep="lfq_exact_d24", q=0.7, peak_mem_gib=3.5,
              choices={"quantizer": "lfq", "experiment": "ext_lfq_exact_d24"},
              params={"quantizer.name": "lfq", "quantizer.groups": 1, "quantizer.group_dim": 24,
                      "quantizer.entropy_mode": "exact"})
    write_run(sweep / "quantizer=gq", sweep="lfq_exact_d24", q=0.75, peak_mem_gib=2.0,
              choices={"experiment": "ext_gq_d24"},
              params={"quantizer.groups": 3, "quantizer.group_dim": 8})
    return sweep


MEMORY_ROWS = [  # as wetok/bench/memory.py writes them (csv.DictWriter: None -> empty)
    # method, d, g, d_prime, peak_gib, status
    ("lfq_naive", 8, 1, 8, 10.51, "ok"), ("lfq_naive", 16, 1, 16, 10.62, "ok"),
    ("lfq_naive", 24, 1, 24, None, "OOM"),
    ("lfq_exact", 8, 1, 8, 10.5, "ok"), ("lfq_exact", 16, 1, 16, 10.5, "ok"),
    ("lfq_exact", 24, 1, 24, 10.51, "ok"),
    ("bsq", 8, 8, 1, 10.5, "ok"), ("bsq", 16, 16, 1, 10.5, "ok"), ("bsq", 24, 24, 1, 10.57, "ok"),
    ("gq", 8, 1, 8, 10.5, "ok"), ("gq", 16, 2, 8, 10.58, "ok"), ("gq", 24, 3, 8, 10.59, "ok"),
    ("gq", 12, None, None, None, "n/a"),
]


def make_memory(root: Path) -> Path:
    """runs/tab1_memory/<run>/memory.csv in the `python -m wetok.memory` format."""
    folder = Path(root) / "tab1_memory"
    (folder / "dims=8,16,24").mkdir(parents=True, exist_ok=True)
    with open(folder / "dims=8,16,24" / "memory.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "d", "g", "d_prime", "peak_gib", "status", "device"])
        for method, d, g, dp, peak, status in MEMORY_ROWS:
            writer.writerow([method, d, "" if g is None else g, "" if dp is None else dp,
                             "" if peak is None else peak, status, "NVIDIA H100 80GB HBM3"])
    (folder / "dims=8,16,24" / "memory.md").write_text("| method | d = 8 |\n")
    return folder


MAKERS = {
    "fig3_quantizer": make_fig3, "fig4_groups": make_fig4, "fig5_architecture": make_fig5,
    "fig6_data_schedule": make_fig6, "tab1_memory": make_memory,
    "tab2_generative_decoder": make_tab2, "lfq_exact_d24": make_lfq_exact,
}


def make_all(root: Path) -> dict:
    return {name: make(Path(root)) for name, make in MAKERS.items()}


if __name__ == "__main__":  # python tests/fixtures_records.py /tmp/records
    import sys

    for name, path in make_all(Path(sys.argv[1] if len(sys.argv) > 1 else "records")).items():
        print(name, path)
