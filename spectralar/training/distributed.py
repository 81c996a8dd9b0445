"""Process-group setup for single-process and torchrun launches, device choice, autocast.

A stage calls :func:`init_distributed` once, uses the returned context for device
placement and "only rank 0 writes files" decisions, and calls :func:`cleanup` at the end.
Nothing here assumes a GPU: a plain ``python -m spectralar ...`` on a laptop gets a
single-process context without any process group.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Literal, Optional, Union

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger("spectralar")

DeviceLike = Union[str, torch.device]
CpuBf16 = Union[bool, Literal["auto"]]  # train_*.cpu_bf16: true | false | auto (native bf16 CPUs only)

# /proc/cpuinfo flags of native bf16 arithmetic: x86 AVX512-BF16 and AMX (flags), arm64 BF16 (Features)
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job. ``is_main`` is rank 0: the one that writes."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available else CPU; ``"cpu"``; ``"cuda"`` or ``"cuda:N"``.

    Asking for CUDA on a machine without it is an error rather than a silent CPU fallback,
    so a misconfigured cluster job fails at start instead of training 100x slower.
    """
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" or preference.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device_preference={preference!r} but CUDA is not available")
        return torch.device(preference)
    raise ValueError(
        f"device_preference must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {preference!r}"
    )


def _env_int(name: str, default: Optional[int] = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is required under torchrun")
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {raw!r}")


def init_distributed(
    backend: Optional[str] = None, device_preference: str = "auto"
) -> DistributedContext:
    """Read torchrun's environment and join the process group when there is more than one rank.

    torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. Without
    WORLD_SIZE (or with WORLD_SIZE=1) no process group is created, so the collectives in
    this module become no-ops. The backend defaults to NCCL on CUDA and Gloo on CPU; on
    CUDA each process binds to ``cuda:LOCAL_RANK``. Calling it again when a group already
    exists reuses that group.
    """
    world_size = _env_int("WORLD_SIZE", default=1)
    local_rank = _env_int("LOCAL_RANK", default=0)
    device = resolve_device(device_preference)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world_size <= 1:
        return DistributedContext(0, local_rank, 1, device, True)
    rank = _env_int("RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise ValueError(f"environment variable {name} is required when WORLD_SIZE > 1")
    if not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            device_id=device if device.type == "cuda" else None,
        )
        logger.info("joined process group: rank %d/%d, backend %s", rank, world_size, backend)
    return DistributedContext(rank, local_rank, world_size, device, rank == 0)


def cleanup() -> None:
    """Leave the process group if one was created (safe to call in every case)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of ``tensor`` over ranks, returned as a new tensor (the input is untouched).

    Used for logging averaged losses; without a process group it returns a detached copy.
    Under NCCL the tensor must live on ``ctx.device`` (NCCL reduces GPU tensors only).
    """
    if not torch.is_floating_point(tensor):
        raise ValueError(f"tensor must be floating point to average, got {tensor.dtype}")
    reduced = tensor.detach().clone()
    world_size = _group_size()
    if world_size > 1:
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        reduced /= world_size
    return reduced


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's ``tensor`` (same shape on every rank) concatenated along dim 0 in rank order.

    Ranks hold contiguous slices of one global batch, so the result is the tensor a single process
    would hold for the whole batch; every rank gets it (e.g. to make a data-dependent decision,
    such as re-seeding dead codes, identically everywhere). Without a process group it is ``tensor``.
    """
    world_size = _group_size()
    if world_size == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def data_parallel(module: nn.Module, ctx: DistributedContext) -> nn.Module:
    """``module`` wrapped in DistributedDataParallel when ``ctx`` spans several processes, else itself.

    DDP averages the gradients of the parameters that require them (set ``requires_grad`` before
    wrapping), overlapping the all-reduce with the backward pass; gradients follow only calls of the
    wrapper's ``forward``, never of the inner module's other methods.
    """
    if not ctx.is_distributed:
        return module
    device_ids = [ctx.device] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids)


def gradient_sync(module: nn.Module, sync: bool) -> ContextManager[object]:
    """Around a backward pass: DDP all-reduces the gradients only when ``sync`` (the last
    micro-batch of an accumulated step); a null context for an unwrapped module."""
    ddp = getattr(module, "_orig_mod", module)  # a compiled DDP wrapper: DDP's own no_sync
    if sync or not isinstance(ddp, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return ddp.no_sync()


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if _group_size() > 1:
        dist.barrier()


@functools.lru_cache(maxsize=None)
def native_cpu_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively, from the kernel's CPU flags: x86 ``avx512_bf16`` or
    ``amx_bf16``, arm64 ``bf16``. False where the file is missing (macOS, Windows) or lists none: there
    oneDNN emulates bf16, and a bf16 step is slower than float32 (a default tokenizer step: 5.1 s
    against 0.4 s on an AVX2-only AMD EPYC, 2 cores; 0.17 s against 0.26 s with AVX512-BF16)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and _NATIVE_BF16_FLAGS & set(value.split()):
            return True
    return False


def cpu_bf16_enabled(setting: CpuBf16) -> bool:
    """``train_*.cpu_bf16`` resolved on this machine: ``"auto"`` is :func:`native_cpu_bf16`."""
    return native_cpu_bf16() if setting == "auto" else bool(setting)


def autocast(device: DeviceLike, enabled: bool, cpu: CpuBf16 = False) -> ContextManager[object]:
    """bf16 autocast on CUDA when ``enabled``, on the CPU when ``enabled`` and ``cpu`` (``"auto"``: when the
    CPU has native bf16, :func:`native_cpu_bf16`); else a null context.

    bf16 rather than fp16: no loss scaler needed (VAR's q/k normalisation exists to keep
    fp16 stable, VAR's code; bf16 has fp32's exponent range). On the CPU it is a separate switch
    (``train_*.cpu_bf16``): it pays on CPUs with native bf16 matmuls (AVX512-BF16 or AMX; 4x float32's
    matmul throughput on a 2-core AMD EPYC with AVX512-BF16, 1.5-1.6x per training step) and costs
    13x where bf16 is emulated (AVX2); float32 keeps the tiny test configs exact.
    """
    device_type = torch.device(device).type
    if _autocasts(device_type, enabled, cpu):
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _autocasts(device_type: str, enabled: bool, cpu: CpuBf16) -> bool:
    return enabled and (device_type == "cuda" or (device_type == "cpu" and cpu_bf16_enabled(cpu)))


def training_precision(device: DeviceLike, enabled: bool, cpu: CpuBf16 = False) -> str:
    """What :func:`autocast` with these arguments trains in: ``"bf16 autocast"`` or ``"float32"``."""
    return "bf16 autocast" if _autocasts(torch.device(device).type, enabled, cpu) else "float32"


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """``torch.compile(module)`` when ``enabled`` (``train_*.compile``), else ``module``. Wrap DDP
    first and compile the wrapper (PyTorch's recipe: dynamo splits the graph at DDP's buckets);
    :func:`unwrap_model` finds the user's module inside either."""
    return torch.compile(module) if enabled else module


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel and/or ``torch.compile`` wrappers.

    Checkpoints and EMA should use the unwrapped names (no ``module.`` / ``_orig_mod.``
    prefixes) so that a checkpoint loads the same way with or without the wrappers.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
