"""Training building blocks shared by the tokenizer and generator stages.

No file layout, MLflow or params.yaml knowledge lives here: stages pass paths and values.
"""

from __future__ import annotations

from spectralar.training.checkpoint import (
    NonFiniteLossError,
    capture_rng_state,
    check_finite,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    restore_rng_state,
    save_checkpoint,
    seed_everything,
    sorted_checkpoints,
    step_generator,
)
from spectralar.training.codebook import DeadCodeRestarts
from spectralar.training.distributed import (
    CpuBf16,
    DistributedContext,
    all_gather_rows,
    all_reduce_mean,
    autocast,
    barrier,
    cleanup,
    compiled,
    data_parallel,
    gradient_sync,
    init_distributed,
    native_cpu_bf16,
    resolve_device,
    synchronize,
    training_precision,
    unwrap_model,
)
from spectralar.training.ema import EMA
from spectralar.training.meter import (
    HistoryRows,
    Throughput,
    mfu,
    model_flops_per_sample,
    peak_flops,
    peak_flops_for_name,
    progress,
    transformer_flops_per_token,
)
from spectralar.training.optim import build_adamw, lr_at, parameter_groups, set_lr

__all__ = [
    "CpuBf16",
    "EMA",
    "HistoryRows",
    "DeadCodeRestarts",
    "DistributedContext",
    "NonFiniteLossError",
    "Throughput",
    "all_gather_rows",
    "all_reduce_mean",
    "autocast",
    "barrier",
    "build_adamw",
    "capture_rng_state",
    "check_finite",
    "cleanup",
    "compiled",
    "data_parallel",
    "gradient_sync",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "mfu",
    "model_flops_per_sample",
    "native_cpu_bf16",
    "parameter_groups",
    "peak_flops",
    "peak_flops_for_name",
    "progress",
    "prune_checkpoints",
    "resolve_device",
    "restore_rng_state",
    "save_checkpoint",
    "seed_everything",
    "set_lr",
    "sorted_checkpoints",
    "step_generator",
    "synchronize",
    "training_precision",
    "transformer_flops_per_token",
    "unwrap_model",
]
