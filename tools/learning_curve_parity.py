"""Learning-curve parity: this project and the official WeTok code trained side by side.

    python tools/learning_curve_parity.py /work/ref/WeTok --steps 2000 --out OUT   # GPU run
    python tools/learning_curve_parity.py --plot OUT/curves.json docs/parity_curves.png
    python tools/learning_curve_parity.py --seeds-table docs/parity_curves/seed?.json  # seed gaps

Both start from the same weights (the project's seeded initialisation, copied into the
reference's lfqgan.VQModel through wetok.convert's key map) and see the same batch stream
(the project's loader, ``scale=quick``: bundled photos, 64^2 crops, batch 8, model ``small``,
GQ g=4 d'=8, no LPIPS). The project runs at the reference's settings (docs/parity.md): pooled
codebook entropy averaged over groups, entropy eps 1e-5, per-image non-saturating GAN loss,
EMA without warm-up; fp32 (`--fp64`: float64), no compile. The reference runs its own
training_step and LitEma (imports stubbed as in tools/parity_fixtures.py). Validation PSNR
(uint8, rounded, mean over the fixed validation crops) of raw and EMA weights every
``--eval-every`` steps, beside the trivial baseline (each crop's mean colour).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))


def psnr_uint8(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) of [-1, 1] images after rounding both to uint8."""
    q = lambda t: ((t.clamp(-1, 1) + 1) * 127.5).round()  # noqa: E731
    mse = (q(x) - q(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))


@torch.no_grad()
def val_psnr(reconstruct, val) -> float:
    return float(torch.cat([psnr_uint8(reconstruct(x), x) for x in val]).mean())


def overrides(steps: int, run_dir: Path, device: str = "auto", seed: int = 0) -> list[str]:
    return ["scale=quick", f"seed={seed}", f"train.steps={steps}", f"run_dir={run_dir}",
            f"train.device={device}",
            "train.precision=fp32", "train.channels_last=false", "train.ema_warmup=false",
            "quantizer.entropy_mode=pooled", "quantizer.entropy_reduction=mean",
            "quantizer.entropy_eps=1e-5", "loss.gen_loss=non_saturating_per_image"]


def reference_model(cfg, device):
    import parity_fixtures as pf
    import importlib

    lfqgan = importlib.import_module("src.WeTok.models.lfqgan")
    from wetok.model import resolve_channel_mult

    q, loss = cfg.quantizer, cfg.loss
    dd = {"ch": cfg.model.channels, "ch_mult": resolve_channel_mult(cfg.model),
          "num_res_blocks": cfg.model.num_res_blocks, "z_channels": q.groups * q.group_dim,
          "double_z": False, "resolution": cfg.data.image_size, "in_channels": 3, "out_ch": 3}
    lossconfig = {"target": "src.WeTok.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                  "params": {"disc_start": loss.disc_start, "disc_ndf": loss.disc_ndf,
                             "disc_num_layers": loss.disc_layers,
                             "gen_loss_weight": loss.gan_weight,
                             "lecam_loss_weight": loss.lecam_weight,
                             "codebook_weight": q.entropy_weight, "commit_weight": q.commit_weight,
                             "codebook_enlarge_ratio": 0, "perceptual_weight": loss.perceptual_weight}}
    assert loss.perceptual_weight == 0, "the quick setting has no LPIPS"
    del pf  # (stubs installed by the caller)
    return lfqgan.VQModel(ddconfig=dd, lossconfig=lossconfig, n_embed=2 ** q.group_dim,
                          embed_dim=q.groups * q.group_dim, num_codebooks=q.groups,
                          sample_minimization_weight=1.0, batch_maximization_weight=1.0,
                          learning_rate=cfg.optim.lr, use_ema=True, use_GFQ=True,
                          scheduler_type="None").to(device)


def copy_weights(trainer, vq) -> None:
    """Project weights -> reference modules (wetok.convert's key map, inverted by lookup)."""
    from wetok import convert

    mine = trainer.model.state_dict()
    disc = trainer.disc.state_dict()
    state = {}
    for key in vq.state_dict():
        if key.startswith(convert.DISC_PREFIX):
            state[key] = disc[key[len(convert.DISC_PREFIX):]]
        elif (new := convert.project_key(key)) is not None:
            state[key] = mine[new]
    missing, _ = vq.load_state_dict(state, strict=False)
    left = [k for k in missing if not k.startswith(("loss.perceptual_loss.", "model_ema."))]
    assert not left, left


def run(args) -> None:
    import parity_fixtures as pf
    from hydra import compose, initialize_config_dir

    import wetok.config  # noqa: F401
    from wetok.data import build_loader
    from wetok.train import Trainer

    pf.stub_imports(args.reference)
    from src.WeTok.modules.ema import LitEma

    out = Path(args.out)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides(args.steps, out / "project_run", args.device,
                                                    args.seed))
    trainer = Trainer(cfg)
    dev = trainer.device
    torch.backends.cudnn.benchmark = False
    vq = reference_model(cfg, dev)
    copy_weights(trainer, vq)
    dtype = torch.float64 if args.fp64 else torch.float32
    for module in (trainer.model, trainer.ema, trainer.disc, trainer.loss, vq):
        module.to(dtype)  # in place: the optimizers keep their parameters
    if args.fp64:  # the reference's get_input casts the batch to float32
        vq.get_input = lambda batch, k: batch[k].permute(0, 3, 1, 2).contiguous()
    vq.model_ema = LitEma(vq).to(dev)
    params = [p for m in (vq.encoder, vq.decoder, vq.quantize) for p in m.parameters()]
    opt_g = torch.optim.Adam(params, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas))
    opt_d = torch.optim.Adam(vq.loss.discriminator.parameters(), lr=cfg.optim.disc_lr,
                             betas=tuple(cfg.optim.betas))
    logged = {}
    vq.optimizers = lambda: (opt_g, opt_d)
    vq.manual_backward = lambda loss: loss.backward()
    vq.log_dict = lambda d, **k: logged.update(d)
    noop = lambda *a: None  # noqa: E731
    vq.trainer = type("T", (), {"profiler": type("P", (), {"start": noop, "stop": noop})()})()
    vq.train()

    loader, _ = build_loader(cfg.data, "train", cfg.train.batch_size, seed=cfg.seed)
    val_loader, _ = build_loader(cfg.data, "val", cfg.eval.batch_size, seed=cfg.seed)
    val = [x.to(dev, dtype) for x in val_loader]
    baseline = float(torch.cat([psnr_uint8(x.mean((2, 3), keepdim=True).expand_as(x), x)
                                for x in val]).mean())
    curves = {"step": [], "loss_project": [], "loss_reference": [], "eval_step": [],
              "psnr_project": [], "psnr_reference": [], "psnr_project_ema": [],
              "psnr_reference_ema": [], "baseline_psnr": baseline,
              "config": overrides(args.steps, "-", seed=args.seed), "dtype": str(dtype),
              "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}

    def evaluate(step):
        model, ema = trainer.model.eval(), trainer.ema.eval()
        vq.eval()
        curves["eval_step"].append(step)
        curves["psnr_project"].append(val_psnr(lambda x: model(x)[0], val))
        curves["psnr_project_ema"].append(val_psnr(lambda x: ema(x)[0], val))
        curves["psnr_reference"].append(val_psnr(lambda x: vq.decode(vq.encode(x)[0]), val))
        with vq.ema_scope():
            curves["psnr_reference_ema"].append(val_psnr(lambda x: vq.decode(vq.encode(x)[0]), val))
        model.train(), vq.train()
        (out / "curves.json").write_text(json.dumps(curves, indent=1))  # partial runs keep theirs
        print(f"step {step:5d}  PSNR project {curves['psnr_project'][-1]:.2f} "
              f"reference {curves['psnr_reference'][-1]:.2f} (EMA {curves['psnr_project_ema'][-1]:.2f}"
              f" / {curves['psnr_reference_ema'][-1]:.2f})", flush=True)

    evaluate(0)
    batches, t0 = iter(loader), time.time()
    for step in range(args.steps):
        x = next(batches).to(dev, dtype)
        logs = trainer.train_step([x])
        vq.global_step = step
        vq.training_step({"image": x.permute(0, 2, 3, 1)}, step)
        vq.on_train_batch_end()
        if (step + 1) % args.log_every == 0:
            curves["step"].append(step + 1)
            curves["loss_project"].append(float(logs["loss"]))
            curves["loss_reference"].append(float(logged["train/total_loss"]))
        if (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
    curves["wall_s"] = time.time() - t0
    (out / "curves.json").write_text(json.dumps(curves, indent=1))
    print(f"final PSNR: project {curves['psnr_project'][-1]:.2f} dB, reference "
          f"{curves['psnr_reference'][-1]:.2f} dB (EMA {curves['psnr_project_ema'][-1]:.2f} / "
          f"{curves['psnr_reference_ema'][-1]:.2f}); mean-colour baseline {baseline:.2f} dB; "
          f"{curves['wall_s']:.0f} s")


def plot(curves_path: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = json.loads(Path(curves_path).read_text())
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    smooth = lambda v, k=10: [sum(v[max(0, i - k + 1):i + 1]) / len(v[max(0, i - k + 1):i + 1])  # noqa: E731
                              for i in range(len(v))]
    a.plot(c["step"], smooth(c["loss_project"]), label="this project")
    a.plot(c["step"], smooth(c["loss_reference"]), label="official WeTok code", ls="--")
    a.set(xlabel="step", ylabel="generator loss (running mean of 10 logs)", title="training loss")
    a.legend()
    for key, label, ls in (("psnr_project", "project, raw", "-"), ("psnr_reference", "official, raw", "--"),
                           ("psnr_project_ema", "project, EMA", "-"),
                           ("psnr_reference_ema", "official, EMA", "--")):
        b.plot(c["eval_step"], c[key], label=label, ls=ls)
    b.axhline(c["baseline_psnr"], color="gray", lw=1, label="mean colour per crop")
    b.set(xlabel="step", ylabel="val PSNR (dB, uint8 rounded)", title="validation PSNR")
    b.legend()
    fig.suptitle(f"{c['device']}, scale=quick at the reference settings, same init and batches")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def seeds_table(paths: list[Path]) -> str:
    """Markdown: per seed, each code's final val PSNR and its mean over the last 10 evaluations
    (raw and EMA weights), the gap project - reference, and the gaps' mean, std and paired t
    (PSNR in dB; also the training loss's gap)."""
    import statistics as st

    rows, gaps = [], {"raw": [], "ema": [], "training loss (mean of last 50 logs)": []}
    last = lambda c, k: st.mean(c[k][-10:])  # noqa: E731
    for path in paths:
        c = json.loads(Path(path).read_text())
        seed = next((o.split("=")[1] for o in c["config"] if o.startswith("seed=")), "0")
        cells = [seed, str(c["eval_step"][-1])]
        for kind, suffix in (("raw", ""), ("ema", "_ema")):
            mine, ref = last(c, "psnr_project" + suffix), last(c, "psnr_reference" + suffix)
            gaps[kind].append(mine - ref)
            final = c["psnr_project" + suffix][-1], c["psnr_reference" + suffix][-1]
            cells += [f"{final[0]:.2f} / {final[1]:.2f}", f"{mine:.2f} / {ref:.2f}",
                      f"{mine - ref:+.2f}"]
        gaps["training loss (mean of last 50 logs)"].append(
            st.mean(c["loss_project"][-50:]) - st.mean(c["loss_reference"][-50:]))
        rows.append("| " + " | ".join(cells) + " |")
    head = ("| seed | steps | raw final (project / official) | raw, mean of last 10 evals | gap "
            "| EMA final | EMA, mean of last 10 evals | gap |\n|" + "---|" * 8)
    stats = []
    for kind, g in gaps.items():
        sd = st.stdev(g) if len(g) > 1 else float("nan")
        t = st.mean(g) / (sd / math.sqrt(len(g))) if len(g) > 1 and sd > 0 else float("nan")
        stats.append(f"{kind}: gap mean {st.mean(g):+.3f}, std {sd:.3f}, range [{min(g):+.3f}, "
                     f"{max(g):+.3f}], paired t = {t:.2f} over {len(g)} seeds")
    return "\n".join([head, *rows, "", *stats])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path, nargs="?", help="checkout of zhuangshaobin/WeTok")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("runs/learning_curve_parity"))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--fp64", action="store_true",
                        help="both codes in float64: tells rounding-driven drift from a "
                             "difference in the algorithm")
    parser.add_argument("--seed", type=int, default=0,
                        help="initial weights and batch order of both codes")
    parser.add_argument("--plot", nargs=2, type=Path, metavar=("CURVES_JSON", "PNG"))
    parser.add_argument("--seeds-table", nargs="+", type=Path, metavar="CURVES_JSON")
    args = parser.parse_args(argv)
    if args.plot:
        plot(*args.plot)
    elif args.seeds_table:
        print(seeds_table(args.seeds_table))
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        run(args)


if __name__ == "__main__":
    main()
