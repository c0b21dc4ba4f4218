"""Training (stage 1: reconstruction; stage 2: generative decoder), one readable loop.

    python -m wetok.train                          # quick run on the bundled photos (CPU is fine)
    python -m wetok.train experiment=table06_gfq   # a paper preset
    python -m wetok.train -m +sweep=fig4_groups    # a paper ablation (Hydra multirun)

Each step: generator forward (encoder -> GQ -> decoder), loss of Eq. 3 with the entropy terms
of Eq. 7/9, backward (gradient accumulation up to the global batch), Adam; then the
discriminator step (hinge + LeCam; none when loss.gan_weight is 0) on the same reconstructions;
then EMA. A run folder that holds a checkpoint resumes from it, which is what makes Slurm
requeue and re-launch work.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel as DDP

from wetok import checkpoint, distributed, weights
from wetok.config import (ConfigError, accumulation_steps, check_init_from, compile_options,
                          use_compile_cache, validate)
from wetok.data import build_loader
from wetok.discriminator import NLayerDiscriminator
from wetok.evaluate import autocast, evaluate_model
from wetok.losses import WeTokLoss
from wetok.model import build_model, freeze_for_stage2, to_generative_state_dict
from wetok.record_writer import RecordWriter

log = logging.getLogger("wetok.train")


def lr_factor(step: int, cfg: DictConfig) -> float:
    """Constant ("consistent"), or linear warm-up then cosine decay to end_ratio (Table 28)."""
    s = cfg.schedule
    if s.name == "constant":
        return 1.0
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    progress = (step - s.warmup_steps) / max(1, cfg.train.steps - s.warmup_steps)
    return s.end_ratio + (1 - s.end_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _adam(params, lr: float, cfg: DictConfig, device: torch.device) -> torch.optim.Adam:
    return torch.optim.Adam(params, lr=lr, betas=tuple(cfg.optim.betas),
                            weight_decay=cfg.optim.weight_decay, fused=device.type == "cuda")


def ema_decay(step: int, cfg: DictConfig) -> float:
    """EMA decay (0.999 in the paper), warmed up as min(decay, (1 + t) / (10 + t)) when
    train.ema_warmup is set, so that short runs are not evaluated on near-initial weights."""
    if not cfg.train.ema_warmup:
        return cfg.train.ema_decay
    return min(cfg.train.ema_decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """EMA of the weights; buffers are copied."""
    e_params = [p for p in ema.parameters()]
    m_params = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e_params, m_params, 1.0 - decay)
    for eb, mb in zip(ema.buffers(), model.buffers()):
        eb.copy_(mb)


class RealFake(torch.nn.Module):
    """D on real and fake images in one forward (separate BatchNorm batches, as the reference),
    so that DDP sees a single forward per backward."""

    def __init__(self, disc: torch.nn.Module):
        super().__init__()
        self.disc = disc

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.disc(real), self.disc(fake)


class Trainer:
    """Holds the modules, optimizers and records of one run; `fit()` runs the loop. ``loss``: a
    WeTokLoss to use instead of cfg.loss's (a benchmark's random-LPIPS loss), set up as that one
    would be (device, channels_last, compile, both G and D steps, checkpoints)."""

    def __init__(self, cfg: DictConfig, loss: WeTokLoss | None = None):
        world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
        validate(cfg, world)  # before anything is allocated
        use_compile_cache(cfg)
        if loss is None and cfg.loss.perceptual_weight > 0:
            weights.resolve("vgg16", cfg.weights)  # MissingWeightsError names file and folder
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir)
        resume_from = checkpoint.last_checkpoint(self.run_dir)
        if cfg.init_from is not None and resume_from is None:
            check_init_from(cfg)

        # torch.backends.cudnn is set in wetok.distributed: this module runs as __main__ under
        # submitit, whose cloudpickle cannot pickle that module object
        self.dist = distributed.setup(cfg.train.device, bool(cfg.train.cudnn_benchmark),
                                      cfg.train.dist_timeout_s, cfg.train.deterministic)
        self.device = dev = self.dist.device
        torch.set_num_threads(distributed.cpu_threads(cfg.train.cpu_threads, dev))
        self.accum = accumulation_steps(cfg, self.dist.world_size)
        torch.manual_seed(cfg.seed)  # the same initial weights (and EMA copy) on every rank

        self.model = build_model(cfg.model, cfg.quantizer, generative=cfg.stage == 2).to(dev)
        self.disc = NLayerDiscriminator(ndf=cfg.loss.disc_ndf, n_layers=cfg.loss.disc_layers,
                                        sync_bn=cfg.loss.disc_sync_bn).to(dev)
        self.loss = (loss if loss is not None
                     else WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights)).to(dev)
        torch.manual_seed(cfg.seed + self.dist.rank)  # noise (stage 2) differs between ranks
        if dev.type == "cuda" and cfg.train.channels_last:
            for module in (self.model, self.disc, self.loss):  # the loss holds LPIPS' VGG16
                module.to(memory_format=torch.channels_last)
        self.ema = copy.deepcopy(self.model).requires_grad_(False)

        self.step = 0
        resumed = checkpoint.load(resume_from) if resume_from is not None else None
        if resumed is not None:
            self._load(resumed)
            log.info("resumed from %s at step %d", resume_from, self.step)
        elif cfg.init_from is not None:
            self._init_from(Path(cfg.init_from))
        if cfg.stage == 2:
            freeze_for_stage2(self.model)

        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt_g = _adam(trainable, cfg.optim.lr, cfg, dev)
        self.opt_d = _adam(self.disc.parameters(), cfg.optim.disc_lr, cfg, dev)
        if resumed is not None:
            self.opt_g.load_state_dict(resumed["opt_g"])
            self.opt_d.load_state_dict(resumed["opt_d"])

        # with loss.gan_weight 0 the discriminator changes nothing in G (Eq. 10): not trained
        self.train_disc = cfg.loss.gan_weight > 0
        self.g_model, self.d_model = self.model, RealFake(self.disc)
        if self.dist.enabled:
            self.g_model = DDP(self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
            self.d_model = DDP(self.d_model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.g_loss, self.d_loss = self._generator_loss, self.loss.discriminator
        self.cudagraphs = False
        if cfg.train.compile:  # inductor is imported only for compiled runs
            options = compile_options(cfg)
            self.cudagraphs = bool(options.get("triton.cudagraphs"))
            self.g_model, self.d_model, self.g_loss, self.d_loss = (
                torch.compile(f, options=options)
                for f in (self.g_model, self.d_model, self.g_loss, self.d_loss))
        self.records = RecordWriter(self.run_dir, cfg, enabled=self.dist.is_main)
        self.hook = distributed.PreemptionHook()

    # ---- checkpoints -------------------------------------------------------------------------
    def _rng_state(self) -> dict:
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return rng

    def _state(self, rng_ranks: list[dict]) -> dict:
        """The checkpoint; ``rng_ranks``: every rank's RNG state (``rng``: rank 0's)."""
        return {
            "step": self.step,
            "model": self.model.state_dict(), "ema": self.ema.state_dict(),
            "disc": self.disc.state_dict(), "loss": self.loss.state_dict(),
            "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "rng": rng_ranks[0], "rng_ranks": rng_ranks,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self) -> None:
        """Rank 0 writes the checkpoint (with every rank's RNG state); call it on all ranks."""
        rng_ranks = [self._rng_state()]
        if self.dist.enabled:
            rng_ranks = [None] * self.dist.world_size if self.dist.is_main else None
            torch.distributed.gather_object(self._rng_state(), rng_ranks)
        if not self.dist.is_main:
            return
        state = self._state(rng_ranks)
        ckpt_dir = self.run_dir / "checkpoints"
        checkpoint.save(state, ckpt_dir / "last.pt")
        keep = self.cfg.train.keep_every
        if keep and self.step % keep == 0:
            checkpoint.save(state, ckpt_dir / f"step_{self.step:07d}.pt")

    def _load_weights(self, state: dict, convert=dict) -> None:
        """Raw, EMA and discriminator weights and the LeCam state (G weights through convert)."""
        self.model.load_state_dict(convert(state["model"]))
        self.ema.load_state_dict(convert(state["ema"]))
        self.disc.load_state_dict(state["disc"])
        self.loss.load_state_dict(state["loss"])

    def _load(self, state: dict) -> None:
        """Resume this run: weights, step and RNG (the optimizers are loaded once built)."""
        self._load_weights(state)
        self.step = state["step"]
        ranks = state.get("rng_ranks", [state["rng"]])
        if len(ranks) != self.dist.world_size:
            log.warning("checkpoint from %d rank(s), now %d: rank 0's RNG state on every rank",
                        len(ranks), self.dist.world_size)
        rng = ranks[self.dist.rank] if len(ranks) == self.dist.world_size else ranks[0]
        torch.set_rng_state(rng["cpu"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)

    def _init_from(self, path: Path) -> None:
        """Start from another run's weights (fresh optimizers, step 0). Stage 2 from a stage-1
        checkpoint: zero noise weights are appended to raw and EMA conv_in (Sec 3.3)."""
        convert = to_generative_state_dict if self.cfg.stage == 2 else dict
        self._load_weights(checkpoint.load(path), convert)
        log.info("stage %d initialised from checkpoint %s", self.cfg.stage, path)

    # ---- one optimizer step ------------------------------------------------------------------
    def _generator_loss(self, x, x_rec, qout, gan_active: bool):
        """Eq. 3 with the GAN term of Eq. 10 (LPIPS and D(x_rec) included: compiled as one graph
        with train.compile). D is used directly, not through DDP: it gets no gradients here."""
        return self.loss.generator(x, x_rec, qout,
                                   self.disc(x_rec) if self.train_disc else None,
                                   gan_active=gan_active,
                                   last_layer=self.model.decoder.conv_out.weight)

    def train_step(self, batches) -> dict:
        """Generator step over `accum` micro-batches, then the discriminator step (when D is
        trained), then EMA."""
        cfg, dev = self.cfg, self.device
        for group in self.opt_g.param_groups:
            group["lr"] = cfg.optim.lr * lr_factor(self.step, cfg)
        for group in self.opt_d.param_groups:
            group["lr"] = cfg.optim.disc_lr * lr_factor(self.step, cfg)
        if self.cudagraphs:  # outputs of the previous step's graphs may be overwritten now
            torch.compiler.cudagraph_mark_step_begin()
        gan_active = self.loss.gan_active(self.step)  # a bool: compiled graphs never see step
        logs: dict[str, torch.Tensor] = {}
        recs = []
        self.disc.requires_grad_(False)  # the generator loss must not touch D's gradients
        for i, x in enumerate(batches):
            sync = contextlib.nullcontext() if (i == len(batches) - 1 or not self.dist.enabled) \
                else self.g_model.no_sync()
            with sync, autocast(cfg, dev):
                x_rec, qout = self.g_model(x)
                total, parts = self.g_loss(x, x_rec, qout, gan_active)
            (total / len(batches)).backward()
            if self.train_disc:  # a CUDA graph's next replay overwrites its outputs
                recs.append(x_rec.detach().clone() if self.cudagraphs else x_rec.detach())
            for k, v in parts.items():
                logs[k] = logs.get(k, 0) + v.detach() / len(batches)
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.opt_g.step()
        self.opt_g.zero_grad(set_to_none=True)

        if self.train_disc:
            self._discriminator_step(batches, recs, gan_active, logs)
        ema_update(self.ema, self.model, ema_decay(self.step, cfg))
        self.step += 1
        return logs

    def _discriminator_step(self, batches, recs, gan_active: bool, logs: dict) -> None:
        """Hinge + LeCam (Eq. 10) on the generator step's reconstructions, per micro-batch."""
        cfg, dev = self.cfg, self.device
        self.disc.requires_grad_(True)
        for i, (x, x_rec) in enumerate(zip(batches, recs)):
            sync = contextlib.nullcontext() if (i == len(batches) - 1 or not self.dist.enabled) \
                else self.d_model.no_sync()
            with sync, autocast(cfg, dev):
                real, fake = self.d_model(x, x_rec)
                d_total, d_parts = self.d_loss(real, fake, gan_active=gan_active)
            (d_total / len(batches)).backward()
            for k, v in d_parts.items():
                logs[k] = logs.get(k, 0) + v.detach() / len(batches)
        self.opt_d.step()
        self.opt_d.zero_grad(set_to_none=True)

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self) -> dict:
        cfg = self.cfg
        if self.step >= cfg.train.steps:
            log.info("run %s already finished at step %d", self.run_dir, self.step)
            # preempted during its last step: the checkpoint is final but nothing evaluated it
            missing = self.dist.is_main and not self.records.summary.get("final")
            return self.finish(evaluate=distributed.any_rank(missing, self.dist))
        loader, stats = build_loader(
            cfg.data, "train", cfg.train.batch_size, seed=cfg.seed, rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=distributed.loader_workers(cfg.train.num_workers, self.device),
            start_batch=self.step * self.accum)
        batches = iter(loader)
        bad_before = self.records.summary.get("counts", {}).get("bad_images", 0)  # earlier attempts
        images_per_step = cfg.train.batch_size * self.accum * self.dist.world_size
        first_bad = torch.full((), -1, dtype=torch.long, device=self.device)
        progress = _progress(self.step, cfg.train.steps, self.dist.is_main)
        t_last, step_last = time.time(), self.step
        try:
            while self.step < cfg.train.steps:
                xs = [next(batches).to(self.device, non_blocking=True) for _ in range(self.accum)]
                if self.device.type == "cuda" and cfg.train.channels_last:
                    xs = [x.contiguous(memory_format=torch.channels_last) for x in xs]
                step = self.step
                logs = self.train_step(xs)
                bad = ~torch.isfinite(logs["loss"])
                first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                done = self.step >= cfg.train.steps
                preempted = distributed.any_rank(self.hook.pending is not None, self.dist)
                if self.step % cfg.train.log_every == 0 or done or preempted:
                    self._check_finite(first_bad)
                    now = time.time()
                    rate = (self.step - step_last) * images_per_step / max(now - t_last, 1e-9)
                    t_last, step_last = now, self.step
                    values = self._global_means(logs)
                    values.update(lr=self.opt_g.param_groups[0]["lr"], img_per_s=rate,
                                  **self._memory())
                    self.records.log(self.step, "train", values)
                    progress.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{rate:.1f}")
                    if progress.disable and self.dist.is_main:  # no terminal: a log line instead
                        log.info("step %d/%d loss %.4f %.1f img/s", self.step, cfg.train.steps,
                                 values["loss"], rate)
                progress.update(self.step - progress.n)
                if self.step % cfg.train.eval_every == 0 and not done:
                    self._evaluate()
                if self.step % cfg.train.ckpt_every == 0 or done or preempted:
                    self._check_finite(first_bad)
                    self.save()
                    self.records.update(steps=self.step,
                                        counts={"bad_images": bad_before + stats.skipped})
                if preempted:
                    log.warning("preempted at step %d: checkpoint saved, requeueing", self.step)
                    self.hook.requeue()
        except (Exception, KeyboardInterrupt) as exc:  # the last checkpoint stays; say why
            self.records.update(status="failed", error=self._failure(exc))
            raise
        finally:
            progress.close()
        self.records.update(counts={"bad_images": bad_before + stats.skipped},
                            bad_image_examples=stats.examples[:10])
        return self.finish(evaluate=True)

    def _failure(self, exc: BaseException) -> str:
        """The error line of a failed run; under DDP it names this rank, and a failed collective
        says that another rank died, raised or hung (past train.dist_timeout_s) first."""
        text = f"{type(exc).__name__}: {exc}"
        if not self.dist.enabled:
            return text
        where = f"rank {self.dist.rank} of {self.dist.world_size}"
        if isinstance(exc, torch.distributed.DistError) or any(
                name in text for name in ("gloo", "NCCL", "c10d")):
            where += (": a collective failed: another rank died, raised or waited more than "
                      f"train.dist_timeout_s={self.cfg.train.dist_timeout_s} s (see its log)")
        log.error("%s: %s", where, text)
        return f"{where}: {text}"

    def _global_means(self, logs: dict) -> dict:
        """Logged values: the means over the ranks (global-batch means: equal rank batches)."""
        names = sorted(logs)
        stacked = distributed.mean_over_ranks(torch.stack([logs[k].float() for k in names]))
        return dict(zip(names, stacked.tolist()))

    def _check_finite(self, first_bad: torch.Tensor) -> None:
        """Raise on every rank when any rank has had a non-finite loss."""
        if self.dist.enabled:
            first_bad = first_bad.clone()
            torch.distributed.all_reduce(first_bad, op=torch.distributed.ReduceOp.MAX)
        bad = int(first_bad)
        if bad >= 0:
            raise FloatingPointError(
                f"non-finite loss at step {bad + 1}; stopped, last good checkpoint kept in "
                f"{self.run_dir / 'checkpoints'}")

    def _memory(self) -> dict:
        if self.device.type != "cuda":
            return {}
        return {"peak_mem_gib": torch.cuda.max_memory_allocated(self.device) / 2**30}

    def _evaluate(self) -> dict:
        """Every rank scores its shard of the validation images; rank 0 records the result."""
        values, skipped, baselines = evaluate_model(self.ema, self.cfg, self.device, self.loss)
        self.records.log(self.step, "val", values)
        self.records.update(skipped=skipped, baselines=baselines)
        return values

    def finish(self, evaluate: bool) -> dict:
        final = self._evaluate() if evaluate else self.records.summary.get("final", {})
        self.records.update(status="finished", steps=self.step, final=final, **self._memory())
        distributed.teardown()
        return self.records.summary


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    # a progress bar on a terminal; elsewhere (Slurm logs, pipes) the log lines of fit()
    return tqdm(total=total, initial=start, disable=not (enabled and sys.stderr.isatty()),
                unit="step", dynamic_ncols=True, file=sys.stderr)


def train(cfg: DictConfig) -> dict:
    """Run (or resume) the training described by cfg; returns the run summary."""
    return Trainer(cfg).fit()


@record  # under torchrun: the failing rank's traceback goes into the job's error summary
@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        summary = train(cfg)
    except (ConfigError, weights.MissingWeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return summary.get("final", {}).get("val_loss")


if __name__ == "__main__":
    main()
