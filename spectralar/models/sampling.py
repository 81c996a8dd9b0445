"""Sampling from :class:`SpectralGPT`: CFG, top-k / top-p, KV cache, truncation, spectrum completion.

Follows VAR's sampler (its code): classifier-free guidance on a doubled batch (conditional
labels, then the null class), logits = (1 + t) * cond - t * uncond with t ramping linearly from 0 at
the first step to cfg at the last; then temperature, top-k, top-p and a multinomial draw with a
seeded ``torch.Generator``. Paper §3.3 / §4.4 applications: truncated generation (stop after the
first n tokens, Table 3) and spectrum completion (keep a given token prefix, generate the rest).

Three ways to compute a step's logits, the same tokens from all: a KV cache that grows (the default),
full recompute (the reference), and ``compiled``: a static KV cache whose steps all have one shape,
through ``torch.compile`` (on CUDA in "reduce-overhead" mode, which replays each step as a CUDA graph,
so the launches of a small sampling step's hundreds of kernels are paid once).
"""

from __future__ import annotations

import math
import weakref
from typing import Callable, Literal, Optional

import torch

from spectralar.models.generator import SpectralGPT, StaticKVCache

__all__ = ["GuidanceSchedule", "generate", "guidance_scale", "guide_logits", "sample_logits"]

GuidanceSchedule = Literal["constant", "linear"]


def guidance_scale(step: int, num_steps: int, cfg_scale: float, schedule: GuidanceSchedule) -> float:
    """Guidance t at 0-based ``step`` of ``num_steps``.

    constant: t = cfg_scale. linear (VAR): t = cfg_scale * step / (num_steps - 1), so the first
    step is unguided and the last gets the full scale; a single-step run gets the full scale.
    """
    if not 0 <= step < num_steps:
        raise ValueError(f"step must lie in [0, {num_steps}), got {step}")
    if schedule == "constant":
        return cfg_scale
    if schedule == "linear":
        return cfg_scale if num_steps == 1 else cfg_scale * step / (num_steps - 1)
    raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {schedule!r}")


def guide_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: (1 + t) * cond - t * uncond (t = 0 returns cond unchanged)."""
    if scale == 0.0:
        return cond_logits
    return (1.0 + scale) * cond_logits - scale * uncond_logits


def sample_logits(
    logits_BV: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Draw one id per row (B,): logits / temperature, keep the top_k largest (0 = all), then the
    smallest nucleus of probability mass >= top_p (0 = off), then a multinomial draw."""
    if logits_BV.ndim != 2:
        raise ValueError(f"logits must be (B, V), got {tuple(logits_BV.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must lie in [0, 1], got {top_p}")
    logits_BV = logits_BV.float() / temperature
    if 0 < top_k < logits_BV.shape[1]:
        logits_BV = _keep_top_k(logits_BV, top_k)
    if 0.0 < top_p < 1.0:
        logits_BV = _keep_top_p(logits_BV, top_p)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, num_samples=1, generator=generator)[:, 0]  # (B,)


def _keep_top_k(logits_BV: torch.Tensor, top_k: int) -> torch.Tensor:
    # Ties with the k-th largest value are kept as well.
    kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
    return logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))


def _keep_top_p(logits_BV: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    mass_before_BV = probs_BV.cumsum(dim=-1) - probs_BV
    # A token is in the nucleus iff the more likely tokens hold less than top_p; the top one always is.
    remove_sorted_BV = mass_before_BV >= top_p
    remove_sorted_BV[:, 0] = False
    remove_BV = remove_sorted_BV.scatter(1, order_BV, remove_sorted_BV)
    return logits_BV.masked_fill(remove_BV, float("-inf"))


# ------------------------------------------------------------------------------------- generate


class _CachedLogits:
    """Next-group logits that feed only the positions not yet in the KV cache.

    The AdaLN modulation is computed once here, for the whole run: the class never changes.
    """

    def __init__(self, model: SpectralGPT, cond_BC: torch.Tensor) -> None:
        self.model, self.cond_BC, self.cache = model, cond_BC, model.new_kv_cache()
        self.modulation = model.modulation(cond_BC)

    def __call__(self, ids_BT: torch.Tensor) -> torch.Tensor:
        x_BLC = self.model.sequence_inputs(self.cond_BC, ids_BT, start=self.cache.length)  # new positions
        logits_BLV = self.model.forward_cached(x_BLC, self.modulation, self.cache)
        return logits_BLV[:, -self.model.config.tokens_per_step :]  # (B, k, V)


class _StaticLogits:
    """Next-group logits over a :class:`StaticKVCache`: every step feeds k positions and attends over all
    N, so a step has one shape (``step`` may be compiled). A teacher-forced prefix of several groups
    (spectrum completion) runs once, uncompiled, through the same method."""

    def __init__(self, model: SpectralGPT, cond_BC: torch.Tensor, compiled: bool) -> None:
        self.model, self.cond_BC, self.length = model, cond_BC, 0
        self.modulation = model.modulation(cond_BC)
        device, dtype = cond_BC.device, cond_BC.dtype
        if compiled:
            self.step, self.cache = _compiled_sampler(model).for_rows(cond_BC.shape[0], device, dtype)
        else:
            self.step = SpectralGPT.forward_static
            self.cache = model.new_static_kv_cache(cond_BC.shape[0], device, dtype)
        self.cuda_graphs = compiled and device.type == "cuda"

    def __call__(self, ids_BT: torch.Tensor) -> torch.Tensor:
        k = self.model.config.tokens_per_step
        x_BLC = self.model.sequence_inputs(self.cond_BC, ids_BT, start=self.length)
        positions_L = torch.arange(self.length, self.length + x_BLC.shape[1], device=x_BLC.device)
        self.length += x_BLC.shape[1]
        if x_BLC.shape[1] != k:  # a multi-group prefix: once per call, not worth a second trace
            return self.model.forward_static(x_BLC, self.modulation, self.cache, positions_L)[:, -k:]
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's logits are consumed: reuse its memory
        return self.step(self.model, x_BLC, self.modulation, self.cache, positions_L)  # (B, k, V)


class _CompiledSampler:
    """A model's compiled static step and one :class:`StaticKVCache` per row count, device and dtype,
    kept for the model's lifetime so later calls neither trace again nor move the cache (a CUDA graph
    replays on fixed addresses). The step is the unbound method, the model an argument: nothing here
    holds the model, so it and its caches go when the model does."""

    def __init__(self, model: SpectralGPT) -> None:
        self.model = weakref.ref(model)
        self.caches: dict[tuple, StaticKVCache] = {}
        self.step: Optional[Callable[..., torch.Tensor]] = None

    def for_rows(self, rows: int, device: torch.device, dtype: torch.dtype) -> tuple[Callable, StaticKVCache]:
        model = self.model()
        assert model is not None
        if self.step is None:
            mode = "reduce-overhead" if device.type == "cuda" else "default"
            self.step = torch.compile(SpectralGPT.forward_static, mode=mode, dynamic=False)
        key = (rows, str(device), dtype)
        if key not in self.caches:
            self.caches[key] = model.new_static_kv_cache(rows, device, dtype)
        return self.step, self.caches[key]


_COMPILED: "weakref.WeakKeyDictionary[SpectralGPT, _CompiledSampler]" = weakref.WeakKeyDictionary()


def _compiled_sampler(model: SpectralGPT) -> _CompiledSampler:
    if model not in _COMPILED:
        _COMPILED[model] = _CompiledSampler(model)
    return _COMPILED[model]


class _RecomputedLogits:
    """Next-group logits recomputed from the whole prefix (the reference for the cached path)."""

    def __init__(self, model: SpectralGPT, cond_BC: torch.Tensor) -> None:
        self.model, self.cond_BC = model, cond_BC

    def __call__(self, ids_BT: torch.Tensor) -> torch.Tensor:
        logits_BLV = self.model.logits_from_prefix(self.cond_BC, ids_BT)
        return logits_BLV[:, -self.model.config.tokens_per_step :]  # (B, k, V)


@torch.no_grad()
def generate(
    model: SpectralGPT,
    labels: torch.Tensor,
    *,
    num_tokens: Optional[int] = None,
    prefix_ids: Optional[torch.Tensor] = None,
    cfg_scale: float = 1.5,
    cfg_schedule: GuidanceSchedule = "linear",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    generator: Optional[torch.Generator] = None,
    use_kv_cache: bool = True,
    static_cache: bool = False,
    compiled: bool = False,
) -> torch.Tensor:
    """Sample token ids (B, num_tokens) for class ``labels`` (B,).

    num_tokens: generate only the first n <= N tokens (truncated generation). The guidance ramp is
        always over the model's full N / k steps, so a truncated run equals the first n tokens of a
        full run with the same seed.
    prefix_ids: (B, P) tokens kept as given (spectrum completion); groups lying wholly inside the
        prefix are teacher-forced, a group the prefix only partly covers is sampled and then its
        first tokens are overwritten by the prefix.
    cfg_scale: 0 = plain conditional sampling (no null-class half is run).
    generator: seeds every draw; must live on the model's device.
    use_kv_cache: False recomputes the whole prefix each step (reference / benchmark).
    static_cache: a KV cache of one fixed shape (every step attends over all N positions, the later
        ones masked): what ``compiled`` traces, here run eagerly.
    compiled: run the steps through ``torch.compile`` over the static cache (traced on the first call
        for a model and row count: seconds to minutes; then reused).
    ``static_cache`` and ``compiled`` need ``use_kv_cache``.
    The model is put in eval mode for the call and its mode restored afterwards.
    """
    config = model.config
    k, steps = config.tokens_per_step, config.num_steps
    n = config.num_tokens if num_tokens is None else num_tokens
    _check_generate_args(model, labels, n, cfg_scale, cfg_schedule)
    if (static_cache or compiled) and not use_kv_cache:
        raise ValueError("static_cache and compiled run over a KV cache: use_kv_cache must be True")
    prefix_BP = _check_prefix(prefix_ids, labels, n, config.vocab_size)
    guided = cfg_scale != 0.0
    both_labels = torch.cat((labels, torch.full_like(labels, model.null_class))) if guided else labels
    was_training = model.training
    model.eval()
    try:
        cond_BC = model.class_condition(both_labels)  # (B or 2B, C)
        if static_cache or compiled:
            next_logits: Callable[[torch.Tensor], torch.Tensor] = _StaticLogits(model, cond_BC, compiled)
        else:
            next_logits = (_CachedLogits if use_kv_cache else _RecomputedLogits)(model, cond_BC)
        first_group = prefix_BP.shape[1] // k
        ids_BT = prefix_BP[:, : first_group * k]
        for step in range(first_group, math.ceil(n / k)):
            logits_BkV = next_logits(torch.cat((ids_BT, ids_BT)) if guided else ids_BT)
            if guided:
                cond_BkV, uncond_BkV = logits_BkV.float().chunk(2)
                scale = guidance_scale(step, steps, cfg_scale, cfg_schedule)
                logits_BkV = guide_logits(cond_BkV, uncond_BkV, scale)
            B, _, V = logits_BkV.shape
            flat_ids = sample_logits(logits_BkV.reshape(B * k, V), temperature, top_k, top_p, generator)
            new_Bk = flat_ids.view(B, k)
            given = prefix_BP[:, step * k : (step + 1) * k]  # partly covered group, else empty
            new_Bk[:, : given.shape[1]] = given
            ids_BT = torch.cat((ids_BT, new_Bk), dim=1)
    finally:
        model.train(was_training)
    return ids_BT[:, :n]


def _check_generate_args(
    model: SpectralGPT, labels: torch.Tensor, n: int, cfg_scale: float, cfg_schedule: str
) -> None:
    if labels.ndim != 1 or labels.dtype != torch.long:
        raise ValueError(f"labels must be a 1-D LongTensor, got {labels.dtype} {tuple(labels.shape)}")
    if not 1 <= n <= model.config.num_tokens:
        raise ValueError(f"num_tokens must lie in [1, {model.config.num_tokens}], got {n}")
    if cfg_scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {cfg_scale}")
    if cfg_schedule not in ("constant", "linear"):
        raise ValueError(f"cfg_schedule must be 'constant' or 'linear', got {cfg_schedule!r}")


def _check_prefix(
    prefix_ids: Optional[torch.Tensor], labels: torch.Tensor, n: int, vocab_size: int
) -> torch.Tensor:
    if prefix_ids is None:
        return labels.new_zeros((labels.shape[0], 0))
    if prefix_ids.ndim != 2 or prefix_ids.shape[0] != labels.shape[0] or prefix_ids.shape[1] > n:
        raise ValueError(
            f"prefix_ids must be (B={labels.shape[0]}, P<={n}), got {tuple(prefix_ids.shape)}"
        )
    if prefix_ids.dtype != torch.long:
        raise ValueError(f"prefix_ids must be a LongTensor, got {prefix_ids.dtype}")
    if prefix_ids.numel() and (prefix_ids.min() < 0 or prefix_ids.max() >= vocab_size):
        raise ValueError(f"prefix_ids must lie in [0, {vocab_size})")
    return prefix_ids.to(labels.device)


def cyclic_labels(num_classes: int, num_per_class: int) -> torch.Tensor:
    """0, 1, ..., C-1, 0, 1, ...: every class equally often and no class-sorted sample file (ADM's
    evaluator does not shuffle, so a class-sorted file scores a far lower Inception Score)."""
    return torch.arange(num_classes * num_per_class) % num_classes
