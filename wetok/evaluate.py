"""Evaluation: rFID, LPIPS, SSIM, PSNR, codebook usage, validation loss and the trivial
baselines (:mod:`wetok.baselines`), under EMA weights, on one GPU or sharded over several.

    python -m wetok.evaluate runs/quick/default                  # a run folder (its last checkpoint)
    python -m wetok.evaluate path=runs/x/checkpoints/last.pt num_images=50000 +run.eval.num_workers=8
    python -m wetok.evaluate runs/fig3_quantizer hydra/launcher=slurm   # every finished run of a sweep
    torchrun --nproc_per_node 8 -m wetok.evaluate runs/quick/default     # one shard per GPU

Writes eval.json beside the run's summary.json and prints the values. A sweep folder becomes a
Hydra multirun over its finished runs whose eval.json is missing or older than their checkpoint
(``force=true``: all of them); ``hydra/launcher=local|slurm`` send each run to a job, and a Slurm
job with several tasks shards its run's images over them. ``+run.KEY=VALUE`` overrides the run's
own config (e.g. ``+run.data.root=/imagenet``). Metrics whose pretrained weights are missing are
listed as skipped, with the reason.
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from wetok import baselines as BL
from wetok import checkpoint, distributed
from wetok.checks import is_int_at_least
# wetok.config also registers run_id for Hydra
from wetok.config import DEVICES, ConfigError, use_compile_cache, validate_eval
from wetok.data import build_loader
from wetok.metrics import Evaluator, safe_name
from wetok.model import build_model, downsample_factor
from wetok.quantize import CodebookUsage

log = logging.getLogger(__name__)


def reference_name(cfg: DictConfig, num_images: int | None) -> str:
    """Cache key of the real images' rFID statistics: data source, split, size, count."""
    source = json.dumps(OmegaConf.to_container(cfg.data, resolve=True), sort_keys=True)
    digest = hashlib.sha1(source.encode()).hexdigest()[:12]
    return f"{cfg.data.name}-val-{cfg.data.image_size}px-{num_images or 'all'}-{digest}"


def autocast(cfg: DictConfig, device: torch.device):
    """The model's precision: bf16 autocast (train.precision auto on a GPU, or bf16), else fp32."""
    p = cfg.train.precision
    if p == "bf16" or (p == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _encode_decode(model, x: torch.Tensor, noise: torch.Generator):
    qout = model.encode(x)
    return model.decode(qout.z_q, generator=noise), qout.indices


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """The model in eval mode inside the block, back in its own mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@contextlib.contextmanager
def gc_paused(paused: bool = True):
    """Python's cyclic garbage collector off inside the block when ``paused`` (and on before):
    torch.compile's first call creates some 10^5 objects, and the full collections they
    trigger took 0.7 s of a 6 s first step (tiny model, CPU, compile cache filled)."""
    if not (paused and gc.isenabled()):
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class EvalPass:
    """The per-batch work of one evaluation (what ``evaluate_model`` and the benchmarks run).

    ``reconstruct(x)``: x on the device (channels_last on a GPU) and its reconstruction in
    [-1, 1] under the model's precision (compiled with eval.compile), with the token indices.
    ``step(x)``: reconstruct x, then accumulate the metrics, the baselines, codebook usage and
    the validation loss on the device. ``result()`` all-reduces over the ranks of
    torch.distributed (every rank must call it) -> (values, skipped, baselines).
    The baselines do not depend on the model: with ``fid_ref_name`` and eval.cache_dir they are
    kept in ``<cache_dir>/<name>.baselines.json`` and a later pass over the same images skips them.
    """

    def __init__(self, model, cfg: DictConfig, device: torch.device, loss=None,
                 fid_ref_name: str | None = None, random_weights: bool = False):
        self.model, self.cfg, self.device, self.loss = model, cfg, device, loss
        self.evaluator = Evaluator(metrics=tuple(cfg.eval.metrics), device=device,
                                   weights=cfg.weights, fid_cache_dir=cfg.eval.cache_dir,
                                   fid_ref_name=fid_ref_name, random_weights=random_weights,
                                   compile=bool(cfg.eval.get("compile")))
        self.baseline_file = (
            Path(cfg.eval.cache_dir) / f"{safe_name(fid_ref_name)}.baselines.json"
            if cfg.eval.cache_dir and fid_ref_name else None)
        self.cached_baselines = _read_baselines(self.baseline_file, device)
        self.baselines = {} if self.cached_baselines else {
            name: Evaluator(metrics=BL.BASELINE_METRICS, device=device,
                            compile=bool(cfg.eval.get("compile"))) for name in BL.BASELINES}
        self.factor = downsample_factor(cfg.model)
        self.usage = CodebookUsage(cfg.quantizer.groups, cfg.quantizer.group_dim)
        self.noise = torch.Generator(device).manual_seed(cfg.eval.noise_seed)
        self.channels_last = device.type == "cuda" and cfg.train.channels_last
        # On a GPU a short last batch is padded to eval.batch_size for the model AND the metric
        # networks: one input shape everywhere, so eval.compile does not recompile and cuDNN
        # benchmark does not try new algorithms (and workspaces) at the end of a pass.
        self.pad_to = cfg.eval.batch_size if device.type == "cuda" else 0
        self._encode_decode = (
            torch.compile(_encode_decode, mode=cfg.eval.get("compile_mode", "default"))
            if cfg.eval.get("compile") else _encode_decode)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0

    @torch.no_grad()
    def _reconstruct_padded(self, x: torch.Tensor):
        """-> (x, x_rec, indices, n): x padded to pad_to rows (copies of its last row) on the
        device; only the first n rows are images of the data set."""
        x = x.to(self.device, non_blocking=True)
        n = len(x)
        if n < self.pad_to:
            x = torch.cat([x, x[-1:].expand(self.pad_to - n, *x.shape[1:])])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.cfg, self.device):
            x_rec, indices = self._encode_decode(self.model, x, self.noise)
        return x, x_rec.float().clamp(-1, 1), indices, n

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (x on the device, x_rec as float in [-1, 1], indices)."""
        x, x_rec, indices, n = self._reconstruct_padded(x)
        return x[:n], x_rec[:n], indices[:n]

    @torch.no_grad()
    def step(self, x: torch.Tensor) -> None:
        x, x_rec, indices, n = self._reconstruct_padded(x)
        if self.loss is not None:
            self.loss_sum += self.loss.reconstruction(x[:n], x_rec[:n]).double() * n
        self.evaluator.update(x, x_rec, valid=n)
        for name, evaluator in self.baselines.items():
            evaluator.update(x, BL.predict(name, x, self.factor), valid=n)
        self.usage.update(indices[:n])
        self.seen += n

    def result(self, bad_images: int = 0) -> tuple[dict, dict, dict]:
        values, skipped = self.evaluator.compute()
        self.usage.gather_ranks()
        values.update(self.usage.compute())
        counts = torch.tensor([self.seen, bad_images], dtype=torch.float64, device=self.device)
        distributed.sum_over_ranks_([self.loss_sum, counts])
        seen, bad = (int(c) for c in counts.tolist())
        baselines = self._baseline_values(seen)
        if self.loss is not None and seen:
            values["val_loss"] = float(self.loss_sum) / seen
        values["num_images"] = seen
        if bad:
            values["bad_images"] = bad
        return values, skipped, baselines

    def _baseline_values(self, seen: int) -> dict:
        """The baselines of this pass's images: from the cache file when every rank read it
        (and it counts the same images), else computed and, on rank 0, written to it."""
        cached = self.cached_baselines
        if cached:
            if cached["num_images"] == seen:
                return cached["baselines"]
            log.warning("baselines skipped: %s holds %d images, this evaluation has %d; delete "
                        "the file or use another eval.cache_dir", self.baseline_file,
                        cached["num_images"], seen)
            return {}
        baselines = {name: ev.compute()[0] for name, ev in self.baselines.items()}
        if self.baseline_file is not None and seen and distributed.rank() == 0:
            self.baseline_file.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.atomic_write_text(self.baseline_file, json.dumps(
                {"num_images": seen, "baselines": baselines}, indent=1))
        return baselines


def _read_baselines(path: Path | None, device: torch.device) -> dict | None:
    """The cached baselines when every rank of torch.distributed can read them, else None."""
    cached = None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
            cached = cached if set(cached["baselines"]) == set(BL.BASELINES) else None
        except (OSError, ValueError, KeyError, TypeError):
            cached = None
    return distributed.on_every_rank(cached, device)


def shard_size(num_images: int | None, rank: int, world_size: int) -> int | None:
    """Images of the first num_images that rank r holds when image i goes to rank i mod W."""
    if num_images is None:
        return None
    return max(0, (num_images - rank + world_size - 1) // world_size)


@torch.no_grad()
def evaluate_model(model, cfg: DictConfig, device: torch.device, loss=None,
                   num_images: int | None = None, random_weights: bool = False,
                   timings: dict | None = None) -> tuple[dict, dict, dict]:
    """One pass over the validation split -> (values, skipped metrics with reasons, baselines).

    Under torch.distributed every rank calls it and scores its own shard (image i on rank
    i mod W: the same images as one process), and every rank gets the values of all images.
    val_loss is the reconstruction loss (plus the perceptual term when the loss has LPIPS).
    The generative decoder's noise comes from a generator seeded with eval.noise_seed.
    ``timings``: filled with the seconds of set-up (``loader_s``, then metric networks and the
    cached baselines and statistics), the wait for the first batch, its step (``first_step_s``:
    eval.compile's compilation, until the device is done), the batches after it (until the
    device is done), the part of those spent waiting for the loader (the host bound), the
    result (all-reduce, FID), on a GPU the seconds the GPU sat idle between batches waiting
    for the host (``gpu_idle_s``; None on a CPU), and the whole call (``wall_s``; all ranks'
    images per second of it, ``img_s``).
    """
    t_start = time.perf_counter()
    num_images = num_images if num_images is not None else cfg.eval.num_images
    rank, world = distributed.rank(), distributed.world()
    loader, stats = build_loader(cfg.data, "val", cfg.eval.batch_size, seed=cfg.seed, rank=rank,
                                 world_size=world, num_workers=cfg.eval.get("num_workers", 0),
                                 pin_memory=device.type == "cuda")
    t_loader = time.perf_counter()
    run = EvalPass(model, cfg, device, loss, reference_name(cfg, num_images), random_weights)
    limit = shard_size(num_images, rank, world)
    t_setup = time.perf_counter()
    waits = []  # seconds blocked on the loader per batch: the first one, then the host bound
    marks = []  # timed on a GPU: CUDA events before and after each batch's work
    gpu_timed = timings is not None and device.type == "cuda"
    first_step = 0.0
    with evaluating(model):
        batches = iter(loader)
        while limit is None or run.seen < limit:
            t = time.perf_counter()
            x = next(batches, None)
            waits.append(time.perf_counter() - t)
            if x is None:
                break
            if gpu_timed:
                marks.append((torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True)))
                marks[-1][0].record()
            with gc_paused(len(waits) == 1):  # the first step compiles (eval.compile)
                run.step(x if limit is None else x[: limit - run.seen])
            if gpu_timed:
                marks[-1][1].record()
            if len(waits) == 1:  # the first step, compilation included (timed: until done)
                if gpu_timed:
                    torch.cuda.synchronize(device)
                first_step = time.perf_counter() - t - waits[0]
    if gpu_timed:
        torch.cuda.synchronize(device)
    t_batches = time.perf_counter()
    result = run.result(bad_images=stats.skipped)
    if timings is not None:
        first = waits[0] if waits else 0.0  # no wait at all on a rank with no images
        t_end = time.perf_counter()
        timings.update(setup_s=t_setup - t_start, loader_s=t_loader - t_start,
                       first_batch_s=first, first_step_s=first_step,
                       batches_s=t_batches - t_setup - first - first_step,
                       loader_wait_s=sum(waits[1:]), result_s=t_end - t_batches,
                       gpu_idle_s=idle_between(marks) if gpu_timed else None,
                       wall_s=t_end - t_start,
                       img_s=result[0]["num_images"] / (t_end - t_start))
    return result


def idle_between(marks: list) -> float:
    """Seconds the device waited for the host between batches: from each batch's end event to
    the next one's start event ((start, end) event pairs in order, as CUDA events)."""
    return sum(end.elapsed_time(nxt) for (_, end), (nxt, _) in zip(marks, marks[1:])) / 1e3


# ---- the command line ------------------------------------------------------------------------


def resolve_checkpoint(path: Path) -> Path:
    """The checkpoint file a path names: a converted or official checkpoint (``wetok.convert``),
    a run folder's checkpoints/last.pt, or the file."""
    from wetok.convert import ConvertError, evaluation_checkpoint

    try:  # a `python -m wetok.convert` folder, or an official .ckpt (converted beside it)
        converted = evaluation_checkpoint(path)
    except ConvertError as exc:
        raise FileNotFoundError(f"{path}: not convertible: {exc}") from None
    if converted is not None:
        return converted
    if path.is_dir():
        found = checkpoint.last_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: no checkpoints/last.pt in this run folder")
        return found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or run folder")
    return path


def pending_runs(sweep: Path, force: bool = False) -> list[Path]:
    """Finished runs of a sweep folder (summary.json status "finished", a checkpoint) whose
    eval.json is missing or older than the checkpoint (all finished runs with force)."""
    runs = []
    for summary in sorted(sweep.glob("*/summary.json")):
        run = summary.parent
        ckpt = checkpoint.last_checkpoint(run)
        if json.loads(summary.read_text()).get("status") != "finished" or ckpt is None:
            continue
        done = run / "eval.json"
        if force or not done.is_file() or done.stat().st_mtime < ckpt.stat().st_mtime:
            runs.append(run)
    return runs


def _is_sweep(path: Path) -> bool:
    return path.is_dir() and checkpoint.last_checkpoint(path) is None \
        and any(path.glob("*/summary.json"))


def _quote(path: Path) -> str:
    return "'" + str(path).replace("\\", "\\\\").replace("'", "\\'") + "'"


def expand_argv(argv: list[str]) -> list[str] | None:
    """Command line -> Hydra overrides: a bare first path becomes path=...; a sweep folder
    becomes a multirun over its pending runs (None when there is nothing to evaluate)."""
    args = list(argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        args[0] = f"path={args[0]}"
    force = any(a in ("force=true", "force=True") for a in args)
    for i, arg in enumerate(args):
        if arg.startswith("path=") and _is_sweep(Path(arg[5:])):
            runs = pending_runs(Path(arg[5:]), force)
            if not runs:
                return None
            args[i] = "path=" + ",".join(_quote(r) for r in runs)
            if "-m" not in args and "--multirun" not in args:
                args.insert(0, "-m")
    return args


def check_options(opts: DictConfig) -> None:
    """The command's own options (conf/evaluate.yaml): ValueError "key: expected ..., got ..."
    before anything is loaded."""
    for key, ok, expected in (
            ("weights", opts.weights in ("ema", "model"), "ema|model"),
            ("device", opts.device in DEVICES, "|".join(DEVICES)),
            ("num_images", opts.num_images is None or is_int_at_least(opts.num_images, 1),
             "null (the run's eval.num_images) or a positive integer"),
            ("noise_seed", opts.noise_seed is None or is_int_at_least(opts.noise_seed, 0),
             "null or a non-negative integer"),
            ("force", isinstance(opts.force, bool), "true or false"),
            ("compile_cache_dir", opts.compile_cache_dir is None
             or isinstance(opts.compile_cache_dir, str), "null or a folder")):
        if not ok:
            raise ValueError(f"{key}: expected {expected}, got {opts[key]!r}")


def evaluate_checkpoint(opts: DictConfig) -> dict:
    """Evaluate one run folder or checkpoint (sharded under torchrun/Slurm); rank 0 writes
    eval.json. Returns the record."""
    check_options(opts)
    started_at = time.time()
    ckpt_path = resolve_checkpoint(Path(opts.path))
    state = checkpoint.load(ckpt_path, mmap=True)  # reads the weights it uses, not the optimisers
    t_checkpoint = time.time()
    cfg = OmegaConf.merge(OmegaConf.create(state["config"]), opts.run or {})
    if opts.noise_seed is not None:
        cfg.eval.noise_seed = opts.noise_seed
    try:
        validate_eval(cfg)
    except ConfigError as exc:
        raise ValueError(f"{ckpt_path} with +run overrides: {exc}") from None
    use_compile_cache(opts)
    dist = distributed.setup(opts.device, cfg.eval.get("cudnn_benchmark", False),
                             cfg.train.get("dist_timeout_s", 600),
                             bool(cfg.train.get("deterministic", False)))
    torch.set_num_threads(distributed.cpu_threads(cfg.train.get("cpu_threads"), dist.device))
    t_device = time.time()
    try:
        with dist.device:  # the random initialisation the weights replace: fast on a GPU
            model = build_model(cfg.model, cfg.quantizer, generative=cfg.stage == 2)
        model.load_state_dict(state[opts.weights])
        model = model.to(dist.device)  # any tensor a module made outside torch's factories
        if dist.device.type == "cuda" and cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        from wetok.losses import WeTokLoss

        loss = WeTokLoss.from_config(cfg.loss, cfg.quantizer, cfg.weights, perceptual=False)
        timings = {"checkpoint_s": t_checkpoint - started_at, "device_s": t_device - t_checkpoint,
                   "model_s": time.time() - t_device}  # device_s: CUDA and process group set-up
        values, skipped, baselines = evaluate_model(model, cfg, dist.device,
                                                    loss.to(dist.device), opts.num_images,
                                                    timings=timings)
    finally:
        distributed.teardown()
    timings.update(started_at=started_at, finished_at=time.time())  # Unix times of this call
    record = {"checkpoint": str(ckpt_path), "step": state["step"], "weights": opts.weights,
              "values": values, "skipped": skipped, "baselines": baselines,
              "timings": timings}
    out = Path(opts.out) if opts.out else ckpt_path.parent.parent / "eval.json"
    if dist.is_main:
        checkpoint.atomic_write_text(out, json.dumps(record, indent=2))
        _print(record, out)
    return record


def _print(record: dict, out: Path) -> None:
    rows = dict(record["values"])
    rows.update({f"{name}.{k}": v for name, vals in record["baselines"].items()
                 for k, v in vals.items()})
    for key, value in rows.items():
        print(f"{key:>20s}  {value:.6g}" if isinstance(value, float) else f"{key:>20s}  {value}")
    for key, reason in record["skipped"].items():
        print(f"{key:>20s}  skipped: {reason}")
    t = record["timings"]
    idle = "" if t["gpu_idle_s"] is None else f", GPU idle {t['gpu_idle_s']:.1f} s"
    print(f"{record['values']['num_images']} images in {t['wall_s']:.1f} s (set-up "
          f"{t['setup_s']:.1f} s, waiting for the loader {t['loader_wait_s']:.1f} s{idle})")
    print(f"wrote {out}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def _hydra_main(opts: DictConfig) -> None:
    try:
        evaluate_checkpoint(opts)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    args = expand_argv(sys.argv[1:] if argv is None else argv)
    if args is None:
        print("nothing to evaluate: every finished run has an up-to-date eval.json")
        return 0
    sys.argv = [sys.argv[0], *args]
    _hydra_main()
    return 0


if __name__ == "__main__":
    status = main()
    gc.freeze()  # no final collection of torch.compile's ~10^6 objects: exit 1-2 s sooner
    sys.exit(status)
