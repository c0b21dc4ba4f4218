"""Profiler tables of training steps (``python -m wetok.bench.train_step --profile N``): the
kernels that take the device's time, their families on a GPU, and where the dtype/layout
copies (``aten::copy_``) come from."""
from __future__ import annotations

import torch

from wetok.bench.common import sync


def profile_table(trainer, next_batches, steps: int, rows: int = 50) -> str:
    """torch.profiler over a few steps: the kernels that take the device's time, heaviest first;
    on a GPU their time per kernel family; then the dtype/layout copies (``aten::copy_``) by
    input shape and by call site, which say where such copies come from."""
    from torch.profiler import ProfilerActivity, profile

    dev = trainer.device
    cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True, with_stack=True) as prof:
        for _ in range(steps):
            trainer.train_step(next_batches())
        sync(dev)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    total = "device_time_total" if cuda else "cpu_time_total"
    averages = prof.key_averages()
    parts = [averages.table(sort_by=key, row_limit=rows, max_name_column_width=70)]
    if cuda:
        parts.append(_kernel_families(averages, steps))
    by_shape = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                       if e.key == "aten::copy_"), key=lambda e: getattr(e, total), reverse=True)
    parts.append("\n".join(["aten::copy_ by input shape:"] + [
        f"  {getattr(e, total) / 1e3:9.2f} ms  x{e.count:<5d} {e.input_shapes}"
        for e in by_shape[:12]]))
    parts.append(_copy_sites(prof.events(), total))
    return "\n\n".join(parts)


def _kernel_family(name: str) -> str:
    name = name.lower()
    if any(k in name for k in ("xmma", "cudnn", "gemm", "conv", "cutlass", "sm90", "sm80")):
        return "conv/gemm (cuDNN, cuBLAS)"
    if name.startswith("triton"):
        return "triton (inductor)"
    if "elementwise" in name or "copy" in name:
        return "aten elementwise/copy"
    if any(k in name for k in ("reduce", "norm", "moments", "gradients")):
        return "aten reductions/norms"
    return "other"


def _kernel_families(averages, steps: int) -> str:
    """Device time per step by kernel family (GPU kernels only, not the '##' annotations)."""
    kinds: dict[str, float] = {}
    for e in averages:
        if e.device_type == torch.autograd.DeviceType.CUDA and not e.key.startswith("##"):
            kind = _kernel_family(e.key)
            kinds[kind] = kinds.get(kind, 0.0) + e.self_device_time_total
    step_total = sum(kinds.values())
    return "\n".join(["device time per step by kernel family:"] + [
        f"  {t / 1e3 / steps:8.2f} ms  {100 * t / step_total:5.1f}%  {kind}"
        for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1])])


def _copy_sites(events, total: str, rows: int = 15) -> str:
    """aten::copy_ grouped by call site: the ops around it and the nearest non-torch frame."""
    sites: dict[str, list] = {}
    for e in events:
        if e.name != "aten::copy_":
            continue
        ops, frame, outer = [], "(no Python frame)", e.cpu_parent
        while outer is not None:
            if ".py(" in outer.name:
                if "torch/" not in outer.name:
                    frame = outer.name
                    break
            elif len(ops) < 3:
                ops.append(outer.name)
            outer = outer.cpu_parent
        acc = sites.setdefault(f"{' <- '.join(ops) or '-'} @ {frame}", [0.0, 0])
        acc[0] += getattr(e, total)
        acc[1] += 1
    return "\n".join(["aten::copy_ by call site:"] + [
        f"  {t / 1e3:9.2f} ms  x{n:<5d} {site}"
        for site, (t, n) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]])

