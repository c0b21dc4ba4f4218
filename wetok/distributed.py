"""torch.distributed from torchrun or from a Slurm job (through submitit), and the preemption hook.

One process per GPU. Rank 0 logs and saves. No scheduler of our own: Slurm (or torchrun) starts
the processes, submitit requeues them.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


BACKEND_ENV = "WETOK_DIST_BACKEND"  # nccl | gloo; unset: nccl on GPUs, gloo on CPUs


def backend(dev: torch.device) -> str:
    """torch.distributed's backend: $WETOK_DIST_BACKEND, else nccl on a GPU, gloo on the CPU."""
    name = os.environ.get(BACKEND_ENV) or ("nccl" if dev.type == "cuda" else "gloo")
    if name not in ("nccl", "gloo") or (name == "nccl" and dev.type != "cuda"):
        raise ValueError(f"{BACKEND_ENV}: expected gloo, or nccl on a GPU; got {name!r} "
                         f"on {dev.type}")
    return name


def _pick_device(name: str, local_rank: int) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK; with gloo, ranks beyond the visible GPUs share them
    (LOCAL_RANK mod their number: DDP's code paths rehearsed on fewer GPUs, not its speed)."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible")
    count = torch.cuda.device_count()
    if local_rank >= count:
        if os.environ.get(BACKEND_ENV) != "gloo":
            raise RuntimeError(f"LOCAL_RANK={local_rank} but {count} CUDA device(s) visible: "
                               f"one GPU per rank (or {BACKEND_ENV}=gloo to share them)")
        local_rank %= count
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def global_rank() -> int:
    """This process's rank from the launcher's environment (torchrun: RANK; Slurm: SLURM_PROCID)
    before torch.distributed starts; 0 for a single process."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def setup(device: str = "auto", cudnn_benchmark: bool = False, timeout_s: float = 600,
          deterministic: bool = False) -> Dist:
    """Start torch.distributed when launched by torchrun or as a multi-task Slurm job; on a GPU,
    ``cudnn_benchmark`` lets cuDNN time its conv algorithms once per shape (fixed shapes).

    ``deterministic``: deterministic kernels (torch.use_deterministic_algorithms, cuBLAS's fixed
    workspace, no cuDNN benchmark), so a GPU run repeats its losses; an op without such a kernel
    warns (its name in the log) instead of failing.

    ``timeout_s``: a collective that waits longer (another rank died or hangs) raises on the
    waiting ranks instead of blocking forever (NCCL aborts the communicator)."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        import submitit

        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
        torch.use_deterministic_algorithms(True, warn_only=True)
    dev = _pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    if world_size > 1 and not tdist.is_initialized():
        tdist.init_process_group(backend(dev), timeout=timedelta(seconds=timeout_s))
    rank = tdist.get_rank() if tdist.is_initialized() else 0
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


GPU_LOADER_WORKERS = 2


def cpu_threads(requested: int | None, device: torch.device) -> int:
    """torch CPU threads for this process: ``requested``, or (None) 1 on a GPU unless
    OMP_NUM_THREADS is set (torchrun's default too), torch's default on the CPU.

    On a GPU the step runs on the device; the CPU only feeds it.  With torch's default (one
    thread per core) several runs side by side oversubscribe the cores, and every intra-op
    parallel region on the CPU (at 128^2 one image's uint8 -> float conversion already is one:
    3*128*128 elements > torch's grain of 32768) then waits for descheduled threads.
    """
    if requested is not None:
        return int(requested)
    if device.type == "cuda" and "OMP_NUM_THREADS" not in os.environ:
        return 1
    return torch.get_num_threads()


def loader_workers(requested: int | None, device: torch.device) -> int:
    """DataLoader worker processes: ``requested``, or (None) 0 on the CPU (the step is the
    bottleneck; workers would compete for its cores) and GPU_LOADER_WORKERS on a GPU (decoding
    and cropping overlap the step instead of adding to it)."""
    if requested is not None:
        return int(requested)
    return GPU_LOADER_WORKERS if device.type == "cuda" else 0


def teardown() -> None:
    if tdist.is_initialized():
        tdist.destroy_process_group()


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank when the flag is set on any rank (so all stop at the same step)."""
    if not dist.enabled:
        return flag
    t = torch.tensor([float(flag)], device=dist.device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def world() -> int:
    """The number of torch.distributed ranks (1 when it is not started)."""
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


def rank() -> int:
    """This process's torch.distributed rank (0 when it is not started)."""
    return tdist.get_rank() if tdist.is_available() and tdist.is_initialized() else 0


def sum_over_ranks_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place (nothing in a single process)."""
    if world() > 1:
        for t in tensors:
            tdist.all_reduce(t)


def on_every_rank(value, device: torch.device):
    """value when every rank of torch.distributed has one (not None), else None on every rank
    (a cache only some ranks could read is ignored by all: their collectives must agree).
    Every rank must call it."""
    found = torch.tensor([float(value is not None)], dtype=torch.float64, device=device)
    sum_over_ranks_([found])
    return value if int(found) == world() else None


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over all ranks (t itself in a single process); not differentiable."""
    if world() == 1:
        return t
    t = t.detach().clone()
    sum_over_ranks_([t])
    return t / world()


class AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum); backward all-reduces the gradient.

    Every rank computes the same loss L(sum_r s_r); the backward sum gives rank r the gradient
    R * dL/ds_r, and DDP's averaging over R ranks then yields exactly dL/dtheta.
    """

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        tdist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tdist.all_reduce(grad)
        return grad


class PreemptionHook:
    """Defers submitit's preemption/timeout signal to the next step boundary.

    Under submitit, USR2 means "checkpoint and requeue". The handler only records the signal;
    the trainer saves its checkpoint at the end of the current step and then calls submitit's
    own handler, which requeues the job (rank 0) — the requeued job resumes from the run folder.
    Outside submitit the hook does nothing.
    """

    def __init__(self) -> None:
        self.pending: tuple | None = None
        self._previous = None
        self._signum = None
        try:
            import submitit

            submitit.JobEnvironment()
        except (ImportError, RuntimeError):
            return
        self._signum = getattr(signal, os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "SIGUSR2"))
        self._previous = signal.getsignal(self._signum)
        signal.signal(self._signum, self._record)

    def _record(self, signum, frame) -> None:
        self.pending = (signum, frame)

    def requeue(self) -> None:
        """Hand the recorded signal to submitit (requeue on rank 0), then stop this process."""
        signum, frame = self.pending
        if callable(self._previous):
            self._previous(signum, frame)
        raise SystemExit(0)
