"""What the benchmarks share: the composed config, device sync, the out-of-memory test and the
clean-up after a measurement, fixed random inputs, per-step timing and its spread."""
from __future__ import annotations

import contextlib
import gc
import math
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30


def compose_config(overrides: list[str]):
    """conf/config.yaml with Hydra overrides, outside a Hydra app (or from inside one)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    import wetok.config  # noqa: F401  (registers the run_id resolver)

    if GlobalHydra.instance().is_initialized():  # e.g. called from inside a Hydra app
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Release what the last measurement left: Python garbage, then the CUDA cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    """Out of memory: torch's OutOfMemoryError, MemoryError, or an allocator's RuntimeError
    (the CPU allocator says "can't allocate memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "allocate" in text)


def failure(exc: BaseException) -> str:
    """A failed measurement's status: "OOM", or "error: <type>" with the traceback printed."""
    if is_oom(exc):
        return "OOM"
    traceback.print_exc()
    return f"error: {type(exc).__name__}"


def inputs(n: int, batch: int, size: int, device: torch.device, channels_last: bool,
           seed: int = 1234) -> list[torch.Tensor]:
    """n fixed random image batches in [-1, 1] on the device (never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        x = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x)
    return out


class StepTimer:
    """Per-step times in ms: CUDA events on the GPU (read after one final synchronize),
    perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.pairs: list = []

    @contextlib.contextmanager
    def step(self):
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.pairs.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.pairs.append((t0, time.perf_counter()))

    def times_ms(self) -> list[float]:
        sync(self.device)
        if self.cuda:
            return [s.elapsed_time(e) for s, e in self.pairs]
        return [(e - s) * 1e3 for s, e in self.pairs]


def time_calls(fn, batches: list, device: torch.device, warmup: int, steps: int) -> list[float]:
    """ms per call of fn(batch) over `steps` calls (batches in turn), after `warmup` calls."""
    for i in range(warmup):
        fn(batches[i % len(batches)])
    sync(device)
    timer = StepTimer(device)
    for i in range(steps):
        with timer.step():
            fn(batches[i % len(batches)])
    return timer.times_ms()


def quantile(values: list[float], q: float) -> float:
    """The q-quantile with linear interpolation between the sorted values."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(times: list[float]) -> dict:
    """p10, p90, min and max of per-step times (ms), as the benchmark rows hold them."""
    return {"ms_p10": quantile(times, 0.1), "ms_p90": quantile(times, 0.9),
            "ms_min": min(times), "ms_max": max(times)}
