"""Optimizer construction and learning-rate schedule shared by both training stages.

Both recipes (TiTok's, VAR's) use AdamW with decoupled weight decay that
skips biases, norm weights, embeddings and learned tokens, a linear warmup and a decay
to a final learning rate. The schedule is a pure function of the step so that a resumed
run recomputes exactly the learning rate an uninterrupted run would have used.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Optional

import torch
from torch import nn

logger = logging.getLogger("spectralar")

Schedule = Literal["cosine", "linear", "constant"]

# Name fragments that mark a parameter as an embedding, a positional embedding or a
# learned token (TiTok: latent_tokens, mask_token, positional_embedding; VAR: pos_start,
# pos_1LC, lvl_embed). Weight decay would pull these towards zero for no benefit.
NO_DECAY_NAME_FRAGMENTS: tuple[str, ...] = ("embed", "token", "pos")


# --------------------------------------------------------------------------------------
# Parameter groups
# --------------------------------------------------------------------------------------


def _is_vector_like(parameter: torch.Tensor) -> bool:
    """True for biases and norm weights, and for vectors stored with singleton axes.

    VAR's per-head attention scale has shape (1, H, 1, 1): it is a vector in all but
    layout, so axes of length 1 are not counted.
    """
    return parameter.ndim < 2 or sum(size > 1 for size in parameter.shape) < 2


def _embedding_parameter_names(model: nn.Module) -> set[str]:
    """Names of nn.Embedding weights, caught by type because names vary (VAR: class_emb)."""
    return {
        f"{module_name}.weight" if module_name else "weight"
        for module_name, module in model.named_modules()
        if isinstance(module, nn.Embedding)
    }


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    no_decay_fragments: tuple[str, ...] = NO_DECAY_NAME_FRAGMENTS,
) -> list[dict[str, Any]]:
    """Split trainable parameters into a decayed and a non-decayed AdamW group.

    No decay for: parameters with fewer than two non-singleton axes (biases, norm
    weights), nn.Embedding weights, and any parameter whose name (relative to ``model``)
    contains one of ``no_decay_fragments``. Everything else is decayed.

    Names are matched as substrings of the full dotted name, so pass the model that owns
    the parameters directly: wrapping it under an attribute called e.g. ``tokenizer``
    would put every parameter in the no-decay group.

    Returns two groups in a fixed order, ``"decay"`` then ``"no_decay"``; parameters keep
    their ``named_parameters()`` order and frozen parameters are left out. Each group
    carries ``"name"`` and ``"param_names"`` (the latter is understood by torch.optim and
    saved in the optimizer state dict, which makes a mismatched resume easy to diagnose).
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    embedding_names = _embedding_parameter_names(model)
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = (
            _is_vector_like(parameter)
            or name in embedding_names
            or any(fragment in name.lower() for fragment in no_decay_fragments)
        )
        (no_decay if skip else decay).append((name, parameter))
    logger.debug(
        "parameter groups: %d decayed tensors, %d not decayed", len(decay), len(no_decay)
    )
    return [
        _group("decay", decay, weight_decay),
        _group("no_decay", no_decay, 0.0),
    ]


def _group(
    name: str, named: list[tuple[str, nn.Parameter]], weight_decay: float
) -> dict[str, Any]:
    return {
        "name": name,
        "params": [parameter for _, parameter in named],
        "param_names": [parameter_name for parameter_name, _ in named],
        "weight_decay": weight_decay,
    }


# --------------------------------------------------------------------------------------
# Learning-rate schedule
# --------------------------------------------------------------------------------------


def lr_at(
    step: int,
    *,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: Schedule,
    final_lr: float,
) -> float:
    """Learning rate for the 0-based optimizer ``step``.

    Warmup (``step < warmup_steps``): ``base_lr * (step + 1) / warmup_steps``, so step 0
    already trains (at ``base_lr / warmup_steps``) and the last warmup step reaches
    ``base_lr`` exactly.

    Afterwards, with ``progress = (step - warmup_steps) / (total_steps - warmup_steps)``
    clipped to [0, 1]:

    - ``"cosine"``: ``final_lr + (base_lr - final_lr) * (1 + cos(pi * progress)) / 2``
    - ``"linear"``: ``final_lr + (base_lr - final_lr) * (1 - progress)``
    - ``"constant"``: ``base_lr`` (``final_lr`` is ignored).

    So the rate is ``base_lr`` at ``step == warmup_steps`` (continuous with the warmup)
    and ``final_lr`` from ``step == total_steps`` on. TiTok: warmup 10k, cosine 1e-4 ->
    1e-5 (TiTok); VAR: warmup epochs/50 (VAR).
    """
    _check_schedule_arguments(step, base_lr, warmup_steps, total_steps, schedule, final_lr)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    decay_steps = total_steps - warmup_steps
    progress = 1.0 if decay_steps == 0 else min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "cosine":
        return final_lr + (base_lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return final_lr + (base_lr - final_lr) * (1.0 - progress)


def _check_schedule_arguments(
    step: int,
    base_lr: float,
    warmup_steps: int,
    total_steps: int,
    schedule: str,
    final_lr: float,
) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if base_lr < 0 or final_lr < 0:
        raise ValueError(f"base_lr and final_lr must be >= 0, got {base_lr}, {final_lr}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if total_steps < warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})"
        )
    if schedule not in ("cosine", "linear", "constant"):
        raise ValueError(
            f"schedule must be 'cosine', 'linear' or 'constant', got {schedule!r}"
        )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write ``lr`` into every parameter group (call once per step with ``lr_at``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# --------------------------------------------------------------------------------------
# AdamW
# --------------------------------------------------------------------------------------


def build_adamw(
    model: nn.Module,
    *,
    lr: float,
    betas: tuple[float, float],
    weight_decay: float,
    eps: float = 1e-8,
    fused_if_cuda: bool = True,
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; fused kernel when every parameter is on CUDA.

    The fused CUDA kernel saves one launch per tensor per step; on CPU the default
    (foreach) implementation is used. TiTok: betas (0.9, 0.99), wd 1e-4; VAR: betas
    (0.9, 0.95), wd 0.05 (TiTok's and VAR's code).
    """
    if lr < 0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must be two values in [0, 1), got {betas}")
    groups = parameter_groups(model, weight_decay)
    parameters = [parameter for group in groups for parameter in group["params"]]
    if not parameters:
        raise ValueError("model has no trainable parameters")
    fused: Optional[bool] = None
    if fused_if_cuda and all(parameter.is_cuda for parameter in parameters):
        fused = True
    return torch.optim.AdamW(
        groups, lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, fused=fused
    )
