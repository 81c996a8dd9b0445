"""Spectral autoregressive generator: a VAR-style class-conditional GPT over spectral token ids.

Paper §3.3, eq. 8: p_{i+1} = M(t_1, ..., t_i). The paper uses "the same architecture and recipe
as VAR" (§4.1), so every block follows VAR (its paper and code): width 64·depth, depth heads, AdaLN from
the class embedding, q/k L2-normalised attention with a learnable per-head scale, tanh-GELU MLP,
linearly increasing drop path, and VAR's initialisation. The class embedding is the start token.

Sequence layout with k = tokens_per_step (k = 1 plain next-token, k = 4 the p4 variant):
position p predicts token p (0-based), and the input at position p is

    the class embedding            for p < k     (the start group, k copies),
    embed(token p - k)             for p >= k,

plus a learned position embedding. Attention is block-causal over groups of k positions
(group of p = p // k), so the k outputs of group g see exactly the tokens of groups < g and the
whole group can be sampled in parallel. For k = 1 this is the ordinary causal mask.

Sampling cost: the AdaLN gates, scales and shifts depend only on the class, so a sampling run computes
them once (:meth:`SpectralGPT.modulation`) and every step reuses them; keys and values go into buffers
preallocated for the whole sequence (:class:`KVCache`), so a step writes k positions and never copies
the cache. :class:`StaticKVCache` goes one step further for ``torch.compile``: every step attends over
all N positions under a mask, so every step has the same shapes and is traced once (on CUDA, captured
once as a CUDA graph). SDPA backends are chosen explicitly, per device and per kind of call (whole sequence or
sampling step): :func:`spectralar.models.attention.attention_backends`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

from spectralar.models.attention import attention_backends
from spectralar.models.checks import require_in_range

__all__ = [
    "GeneratorConfig",
    "KVCache",
    "LayerKVCache",
    "Modulation",
    "SpectralGPT",
    "StaticKVCache",
    "attention_backends",
    "block_causal_mask",
]

# VAR caps the learnable attention scale at 100 (applied in log space).
_MAX_LOG_ATTENTION_SCALE = math.log(100.0)
# VAR's init: AdaLN gates x1e-5 (blocks start near identity), other AdaLN rows x0.5, head x0.02.
_INIT_ADALN_GATE = 1e-5
_INIT_ADALN = 0.5
_INIT_HEAD = 0.02


# --------------------------------------------------------------------------------------- config


TOKEN_MANIFEST = "the token dump's manifest (dump_tokens: the tokenizer's N and codebook, the dataset's classes)"


@dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of :class:`SpectralGPT`; ``None`` fields take VAR's depth-derived values."""

    depth: int = 4
    # Derived (spectralar.config.DERIVED_FROM): train_generator reads them from the token dump.
    vocab_size: int = field(default=256, metadata={"derived_from": TOKEN_MANIFEST})  # tokenizer codebook size V
    num_tokens: int = field(default=16, metadata={"derived_from": TOKEN_MANIFEST})  # sequence length N
    num_classes: int = field(default=10, metadata={"derived_from": TOKEN_MANIFEST})  # index num_classes = null class (CFG)
    tokens_per_step: int = 1  # k tokens sampled in parallel per step (4 = p4 variant)
    width: Optional[int] = None  # None -> 64 * depth (VAR)
    heads: Optional[int] = None  # None -> depth (VAR, head dim 64)
    mlp_ratio: float = 4.0
    drop_path_rate: Optional[float] = None  # None -> 0.1 * depth / 24 (VAR)
    dropout: float = 0.0  # on the attention projection and MLP outputs
    class_dropout: float = 0.1  # label -> null class with this probability in training (CFG)
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        for name in ("depth", "vocab_size", "num_tokens", "num_classes", "tokens_per_step"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("width", "heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.num_tokens % self.tokens_per_step:
            raise ValueError(
                f"num_tokens ({self.num_tokens}) must be divisible by "
                f"tokens_per_step ({self.tokens_per_step})"
            )
        if self.resolved_width % self.resolved_heads:
            raise ValueError(
                f"width ({self.resolved_width}) must be divisible by heads ({self.resolved_heads})"
            )
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.resolved_drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.resolved_drop_path_rate}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {self.class_dropout}")
        if self.norm_eps <= 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")

    @property
    def resolved_width(self) -> int:
        return self.width if self.width is not None else 64 * self.depth

    @property
    def resolved_heads(self) -> int:
        return self.heads if self.heads is not None else self.depth

    @property
    def resolved_drop_path_rate(self) -> float:
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    @property
    def num_steps(self) -> int:
        """Number of sampling steps N / k."""
        return self.num_tokens // self.tokens_per_step

    @classmethod
    def d16(cls, **overrides: object) -> GeneratorConfig:
        return cls._imagenet(depth=16, **overrides)

    @classmethod
    def d20(cls, **overrides: object) -> GeneratorConfig:
        return cls._imagenet(depth=20, **overrides)

    @classmethod
    def d24(cls, **overrides: object) -> GeneratorConfig:
        return cls._imagenet(depth=24, **overrides)

    @classmethod
    def d16_p4(cls, **overrides: object) -> GeneratorConfig:
        """Paper Table 2's d16-p4: 16 steps of 4 tokens (the grouping is our design: the paper does not state it)."""
        return cls._imagenet(depth=16, tokens_per_step=4, **overrides)

    @classmethod
    def _imagenet(cls, **fields: object) -> GeneratorConfig:
        # ImageNet setting of the paper: 64 spectral tokens, 4096-code tokenizer, 1000 classes.
        defaults: dict[str, object] = dict(vocab_size=4096, num_tokens=64, num_classes=1000)
        return cls(**{**defaults, **fields})  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- KV cache


class LayerKVCache:
    """Keys and values of one attention layer, in buffers preallocated for ``max_length`` positions.

    A step writes its new positions at the current length and attends over the filled part (a view,
    no copy): growing the cache with ``torch.cat`` copied it whole at every step.
    """

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self.length = 0
        self.keys: Optional[torch.Tensor] = None  # (B, H, max_length, D), allocated on first use
        self.values: Optional[torch.Tensor] = None  # (B, H, max_length, D)

    def append(
        self, keys_BHLD: torch.Tensor, values_BHLD: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions and return keys/values (B, H, length, D) of all positions so far."""
        start, end = self.length, self.length + keys_BHLD.shape[2]
        if end > self.max_length:
            raise ValueError(f"cache holds {start} positions; {end - start} more exceed {self.max_length}")
        if self.keys is None or self.values is None:
            B, H, _, D = keys_BHLD.shape
            self.keys = keys_BHLD.new_empty((B, H, self.max_length, D))
            self.values = values_BHLD.new_empty((B, H, self.max_length, D))
        self.keys[:, :, start:end] = keys_BHLD
        self.values[:, :, start:end] = values_BHLD
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # (B, H, end, D) views


class StaticKVCache:
    """Keys and values of every block in buffers of one fixed shape (B, H, N, D), for compiled sampling.

    A step writes its k positions with ``index_copy_`` at positions given as a tensor and attends over
    all N positions, the ones not yet written masked out; so every step sees the same shapes and
    addresses, and ``torch.compile`` traces the step once (on CUDA it can replay it as a CUDA graph: the
    buffers are marked as static addresses, as HF transformers' ``StaticCache`` does). The buffers start
    at zero and a position is written before any query sees it, so a cache can serve run after run (a
    masked position's weight is exactly 0, which leaves its value out as long as it is finite).
    """

    def __init__(self, depth: int, batch: int, heads: int, num_tokens: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (batch, heads, num_tokens, head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(depth)]
        for buffer in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(buffer)


class _StaticLayerWrite:
    """One block's view of a :class:`StaticKVCache` for one step: writes at ``positions_L``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions_L: torch.Tensor) -> None:
        self.keys, self.values, self.positions_L = keys, values, positions_L

    def append(self, keys_BHLD: torch.Tensor, values_BHLD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions; keys/values (B, H, N, D) of every position (the unwritten masked)."""
        self.keys.index_copy_(2, self.positions_L, keys_BHLD)
        self.values.index_copy_(2, self.positions_L, values_BHLD)
        return self.keys, self.values


class KVCache:
    """Per-block key/value caches of one sampling run; passed explicitly, never stored on the model."""

    def __init__(self, depth: int, max_length: int) -> None:
        self.layers = [LayerKVCache(max_length) for _ in range(depth)]

    @property
    def length(self) -> int:
        """Number of sequence positions already processed."""
        return self.layers[0].length


@dataclass(frozen=True)
class Modulation:
    """AdaLN gates, scales and shifts of every block and of the head, for one batch of classes.

    They depend on the class only, never on the tokens, so a sampling run computes them once and
    reuses them at every step: recomputed per step they add a 6C x C matmul per row to a one-token
    step's 12C x C of attention and MLP weights in every block.
    """

    blocks: tuple[tuple[torch.Tensor, ...], ...]  # per block: 6 tensors (B, 1, C), VAR's row order
    head: tuple[torch.Tensor, torch.Tensor]  # scale, shift (B, 1, C)


def block_causal_mask(
    query_start: int,
    query_length: int,
    key_length: int,
    tokens_per_step: int,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """Bool mask (query_length, key_length), True = may attend.

    Query position q (absolute: query_start + row) sees key position j iff j // k <= q // k:
    causal across groups, bidirectional inside a group. k = 1 gives the usual lower-triangular mask.
    """
    query_group = torch.arange(query_start, query_start + query_length, device=device)
    key_group = torch.arange(key_length, device=device)
    return (key_group[None, :] // tokens_per_step) <= (query_group[:, None] // tokens_per_step)


# ------------------------------------------------------------------------------------- modules


class DropPath(nn.Module):
    """Stochastic depth: drop a sample's whole residual branch with the given probability."""

    def __init__(self, probability: float) -> None:
        super().__init__()
        self.probability = probability

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.probability == 0.0:
            return x
        keep = 1.0 - self.probability
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)  # (B, 1, 1)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"probability={self.probability:g}"


class SelfAttention(nn.Module):
    """Multi-head self-attention with L2-normalised q, k and a learnable per-head scale (VAR).

    The attention logit is cos(q, k) * s_h with s_h = exp(min(log_scale_h, log 100)), initialised
    to 4: bounded logits keep fp16 training stable. Like VAR, qkv has a query and a value bias but no
    key bias.
    """

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.query_bias = nn.Parameter(torch.zeros(width))
        self.value_bias = nn.Parameter(torch.zeros(width))
        self.log_scale = nn.Parameter(torch.full((1, heads, 1, 1), math.log(4.0)))
        self.proj = nn.Linear(width, width)
        self.proj_dropout = nn.Dropout(dropout)

    def forward(
        self,
        x_BLC: torch.Tensor,
        attn_mask: Optional[torch.Tensor],
        is_causal: bool,
        cache: Optional[LayerKVCache | _StaticLayerWrite],
    ) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.query_bias, torch.zeros_like(self.query_bias), self.value_bias))
        qkv = F.linear(x_BLC, self.qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q_BHLD, k_BHLD, v_BHLD = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        scale_1H11 = self.log_scale.clamp_max(_MAX_LOG_ATTENTION_SCALE).exp()
        q_BHLD = F.normalize(q_BHLD, dim=-1) * scale_1H11
        k_BHLD = F.normalize(k_BHLD, dim=-1)
        if cache is not None:
            k_BHLD, v_BHLD = cache.append(k_BHLD, v_BHLD)  # (B, H, L_cached + L, D)
        static_step = isinstance(cache, _StaticLayerWrite)
        if x_BLC.device.type == "cpu" and (static_step or cache is not None and attn_mask is None and not is_causal):
            # A sampling step on CPU (one group of queries over the whole cache, no mask; or over a
            # static cache, its unwritten positions masked): the product written out. SDPA's math
            # kernel multiplies q and every cached key by sqrt(scale) even at scale 1, a pass over the
            # cache per layer and step that cost 9% of sampling time.
            scores_BHLK = torch.matmul(q_BHLD, k_BHLD.transpose(-2, -1))
            if attn_mask is not None:
                scores_BHLK = scores_BHLK.masked_fill(~attn_mask, float("-inf"))
            out_BHLD = torch.matmul(scores_BHLK.softmax(dim=-1), v_BHLD)
        else:
            # scale=1: the per-head scale is already in q (a cosine-similarity logit, not 1/sqrt(D)).
            out_BHLD = F.scaled_dot_product_attention(
                q_BHLD, k_BHLD, v_BHLD, attn_mask=attn_mask, is_causal=is_causal, scale=1.0
            )
        out_BLC = out_BHLD.transpose(1, 2).reshape(B, L, C)
        return self.proj_dropout(self.proj(out_BLC))


class FeedForward(nn.Module):
    """GPT-2 MLP: Linear -> tanh-GELU -> Linear (VAR)."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.act(self.fc1(x_BLC))))


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose norms and residual gates are set by the class embedding.

    AdaLN (VAR): SiLU -> Linear(C -> 6C) gives gate/scale/shift for the attention and MLP branches:
    x += gate * branch(LN(x) * (1 + scale) + shift). LayerNorm has no affine of its own.
    """

    def __init__(
        self, width: int, heads: int, mlp_ratio: float, dropout: float, drop_path: float, eps: float
    ) -> None:
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.attn = SelfAttention(width, heads, dropout)
        self.mlp = FeedForward(width, round(width * mlp_ratio), dropout)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.drop_path = DropPath(drop_path)

    def modulation(self, cond_BC: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The block's 6 AdaLN tensors (B, 1, C) for class embeddings ``cond_BC`` (B, C)."""
        modulation_B16C = self.ada_lin(cond_BC).view(-1, 1, 6, self.width)
        # Row order as in VAR: gates first (they get the tiny init), then scales, then shifts.
        return modulation_B16C.unbind(2)

    def forward(
        self,
        x_BLC: torch.Tensor,
        modulation: tuple[torch.Tensor, ...],
        attn_mask: Optional[torch.Tensor],
        is_causal: bool,
        cache: Optional[LayerKVCache | _StaticLayerWrite],
    ) -> torch.Tensor:
        gate_attn, gate_mlp, scale_attn, scale_mlp, shift_attn, shift_mlp = modulation  # (B, 1, C) each
        h_BLC = self.norm(x_BLC) * (1 + scale_attn) + shift_attn  # (B, L, C)
        x_BLC = x_BLC + self.drop_path(self.attn(h_BLC, attn_mask, is_causal, cache) * gate_attn)
        h_BLC = self.norm(x_BLC) * (1 + scale_mlp) + shift_mlp
        return x_BLC + self.drop_path(self.mlp(h_BLC) * gate_mlp)


class AdaLNHead(nn.Module):
    """Output head: AdaLN (scale, shift from the class embedding) + LN + Linear(C -> V) (VAR)."""

    def __init__(self, width: int, vocab_size: int, eps: float) -> None:
        super().__init__()
        self.width = width
        self.norm = nn.LayerNorm(width, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.linear = nn.Linear(width, vocab_size)

    def modulation(self, cond_BC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and shift (B, 1, C) for class embeddings ``cond_BC`` (B, C)."""
        scale_B1C, shift_B1C = self.ada_lin(cond_BC).view(-1, 1, 2, self.width).unbind(2)
        return scale_B1C, shift_B1C

    def forward(self, x_BLC: torch.Tensor, modulation: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale_B1C, shift_B1C = modulation
        return self.linear(self.norm(x_BLC) * (1 + scale_B1C) + shift_B1C)  # (B, L, V)


# --------------------------------------------------------------------------------------- model


class SpectralGPT(nn.Module):
    """Class-conditional GPT over N spectral token ids (paper §3.3), k tokens per step.

    Training: ``forward(ids, labels)`` (teacher forcing). Sampling (see ``sampling.generate``):
    ``class_condition`` and ``modulation`` once, then per step ``sequence_inputs`` of the new
    positions -> ``forward_cached`` with a :class:`KVCache`; or ``logits_from_prefix`` to recompute
    the whole prefix.
    """

    def __init__(self, config: GeneratorConfig) -> None:
        super().__init__()
        self.config = config
        width = config.resolved_width
        self.class_embedding = nn.Embedding(config.num_classes + 1, width)  # last row: null class
        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.position_embedding = nn.Parameter(torch.zeros(config.num_tokens, width))
        rates = _linear_drop_path_rates(config.resolved_drop_path_rate, config.depth)
        self.blocks = nn.ModuleList(
            AdaLNBlock(
                width, config.resolved_heads, config.mlp_ratio, config.dropout, rate, config.norm_eps
            )
            for rate in rates
        )
        self.head = AdaLNHead(width, config.vocab_size, config.norm_eps)
        self.init_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def per_image_parameters(self) -> int:
        """Parameters applied once per image, not once per token: the AdaLN projections, which map
        the image's class embedding to gates, scales and shifts shared by all of its positions."""
        projections = [block.ada_lin for block in self.blocks] + [self.head.ada_lin]
        return sum(p.numel() for projection in projections for p in projection.parameters())

    # ---- weights

    @torch.no_grad()
    def init_weights(self) -> None:
        """VAR's init (its code): trunc-normal std sqrt(1/(3C)) for every Linear/Embedding
        and the position embedding, zero biases; head x0.02; attention projection and fc2 divided
        by sqrt(2 * depth) (GPT-2 residual scaling); AdaLN gate rows x1e-5 so every block starts
        near the identity, the other AdaLN rows x0.5."""
        width = self.config.resolved_width
        std = math.sqrt(1.0 / (3.0 * width))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                # torch's default bounds (+-2 absolute), exactly as VAR calls it.
                nn.init.trunc_normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                module.bias.zero_()
        nn.init.trunc_normal_(self.position_embedding, std=std)
        self.head.linear.weight.mul_(_INIT_HEAD)
        self.head.ada_lin[-1].weight.mul_(_INIT_ADALN)
        residual_scale = math.sqrt(2.0 * self.config.depth)
        for block in self.blocks:
            block.attn.proj.weight.div_(residual_scale)
            block.mlp.fc2.weight.div_(residual_scale)
            block.ada_lin[-1].weight[: 2 * width].mul_(_INIT_ADALN_GATE)  # gate rows
            block.ada_lin[-1].weight[2 * width :].mul_(_INIT_ADALN)  # scale and shift rows
            block.attn.log_scale.fill_(math.log(4.0))

    # ---- inputs

    def drop_labels(
        self, labels_B: torch.Tensor, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Replace labels by the null class with prob. class_dropout, in training mode only (CFG)."""
        if not self.training or self.config.class_dropout == 0.0:
            return labels_B
        draws_B = torch.rand(labels_B.shape, generator=generator, device=labels_B.device)
        return torch.where(draws_B < self.config.class_dropout, self.null_class, labels_B)

    def class_condition(self, labels_B: torch.Tensor) -> torch.Tensor:
        """Class embedding (B, C): the AdaLN condition and the start token. Null class allowed."""
        if labels_B.ndim != 1 or labels_B.dtype != torch.long:
            raise ValueError(f"labels must be a 1-D LongTensor, got {labels_B.dtype} {tuple(labels_B.shape)}")
        require_in_range(labels_B, 0, self.null_class, f"labels must lie in [0, {self.null_class}] (last = null class)")
        return self.class_embedding(labels_B)  # (B, C)

    def sequence_inputs(self, cond_BC: torch.Tensor, ids_BT: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Input embeddings (B, T + k - start, C) of positions start..T+k-1 for known tokens
        t_0..t_{T-1}: [start x k; embed(ids)] + pos. A sampling step passes ``start`` = the cached
        length, so it embeds only the positions it feeds."""
        k = self.config.tokens_per_step
        B, T = ids_BT.shape
        if not 0 <= start <= T + k:
            raise ValueError(f"start must lie in [0, {T + k}], got {start}")
        if cond_BC.shape[0] != B:
            raise ValueError(f"cond batch {cond_BC.shape[0]} != ids batch {B}")
        if T + k > self.config.num_tokens:
            raise ValueError(f"ids has {T} tokens; at most num_tokens - k = {self.config.num_tokens - k}")
        require_in_range(ids_BT, 0, self.config.vocab_size - 1, f"ids must lie in [0, {self.config.vocab_size})")
        tokens_BLC = self.token_embedding(ids_BT[:, max(start - k, 0) :])
        if start < k:  # the range includes start-group positions
            start_BLC = cond_BC[:, None, :].expand(B, k - start, cond_BC.shape[1])
            tokens_BLC = torch.cat((start_BLC, tokens_BLC), dim=1)  # (B, T + k - start, C)
        return tokens_BLC + self.position_embedding[start : T + k]

    # ---- training

    def forward(
        self,
        ids_BN: torch.Tensor,
        labels_B: torch.Tensor,
        generator: Optional[torch.Generator] = None,
    ) -> torch.Tensor:
        """Teacher-forced logits (B, L, V); logits[:, p] predicts ids[:, p] from ids[:, : p // k * k].

        ``ids_BN`` has L tokens, k <= L <= N and L divisible by k (normally L = N). In training mode
        labels are dropped to the null class with probability class_dropout (``generator`` seeds it).
        """
        k, n = self.config.tokens_per_step, self.config.num_tokens
        if ids_BN.ndim != 2 or not k <= ids_BN.shape[1] <= n or ids_BN.shape[1] % k:
            raise ValueError(
                f"ids must be (B, L) with {k} <= L <= {n} and L divisible by {k}, got {tuple(ids_BN.shape)}"
            )
        if labels_B.shape != ids_BN.shape[:1]:
            raise ValueError(f"labels must have shape ({ids_BN.shape[0]},), got {tuple(labels_B.shape)}")
        cond_BC = self.class_condition(self.drop_labels(labels_B, generator))
        return self.logits_from_prefix(cond_BC, ids_BN[:, : ids_BN.shape[1] - k])

    def logits_from_prefix(self, cond_BC: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
        """Logits (B, T + k, V) of positions 0..T+k-1 given tokens t_0..t_{T-1}; no cache."""
        k = self.config.tokens_per_step
        if ids_BT.shape[1] % k:
            raise ValueError(f"ids length {ids_BT.shape[1]} must be divisible by tokens_per_step {k}")
        x_BLC = self.sequence_inputs(cond_BC, ids_BT)
        modulation = self.modulation(cond_BC)
        if k == 1:  # plain causal: no mask, so SDPA can use its flash kernel
            return self._run(x_BLC, modulation, attn_mask=None, is_causal=True, cache=None)
        mask_LL = block_causal_mask(0, x_BLC.shape[1], x_BLC.shape[1], k, x_BLC.device)
        return self._run(x_BLC, modulation, attn_mask=mask_LL, is_causal=False, cache=None)

    # ---- inference

    def modulation(self, cond_BC: torch.Tensor) -> Modulation:
        """AdaLN tensors of every block and the head for class embeddings ``cond_BC`` (B, C)."""
        return Modulation(
            blocks=tuple(block.modulation(cond_BC) for block in self.blocks),
            head=self.head.modulation(cond_BC),
        )

    def new_kv_cache(self) -> KVCache:
        return KVCache(self.config.depth, self.config.num_tokens)

    def forward_cached(
        self, x_BLC: torch.Tensor, modulation: Modulation, cache: KVCache
    ) -> torch.Tensor:
        """Logits (B, L, V) of the next L positions, whose inputs ``x_BLC`` (rows of
        ``sequence_inputs``) follow the cache.length positions already cached; appends to the cache.
        ``modulation`` is ``self.modulation(cond_BC)``, computed once per sampling run."""
        start, length = cache.length, x_BLC.shape[1]
        if start + length > self.config.num_tokens:
            raise ValueError(
                f"cache holds {start} positions; {length} more exceed num_tokens {self.config.num_tokens}"
            )
        k = self.config.tokens_per_step
        if start == 0 and k == 1:
            return self._run(x_BLC, modulation, attn_mask=None, is_causal=True, cache=cache)
        if (start + length - 1) // k <= start // k:
            # The new positions lie in one group (the usual step): they see every key, no mask.
            return self._run(x_BLC, modulation, attn_mask=None, is_causal=False, cache=cache, step=True)
        mask_LK = block_causal_mask(start, length, start + length, k, x_BLC.device)
        return self._run(x_BLC, modulation, attn_mask=mask_LK, is_causal=False, cache=cache)

    def new_static_kv_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> StaticKVCache:
        attn = self.blocks[0].attn
        return StaticKVCache(self.config.depth, batch, attn.heads, self.config.num_tokens, attn.head_dim,
                             device, dtype)

    def forward_static(
        self, x_BLC: torch.Tensor, modulation: Modulation, cache: StaticKVCache, positions_L: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, L, V) of positions ``positions_L`` (L consecutive positions from a group's start,
        as a tensor on the model's device), whose inputs ``x_BLC`` are rows of ``sequence_inputs``;
        writes their keys and values into ``cache`` and attends block-causally over all N positions,
        so the positions not yet written (all in later groups) are masked. The same logits as
        :meth:`forward_cached`; with L = k every step has the same shapes (``sampling.generate``'s
        ``compiled`` path traces this method once)."""
        k = self.config.tokens_per_step
        # block_causal_mask's rule, from the positions tensor: an int start would make a trace per step.
        key_group_N = torch.arange(self.config.num_tokens, device=x_BLC.device) // k
        visible_LN = key_group_N[None, :] <= (positions_L // k)[:, None]  # True = may attend
        with sdpa_kernel(attention_backends(x_BLC.device)):
            for index, block in enumerate(self.blocks):
                write = _StaticLayerWrite(cache.keys[index], cache.values[index], positions_L)
                x_BLC = block(x_BLC, modulation.blocks[index], visible_LN, False, write)
        return self.head(x_BLC, modulation.head)  # (B, L, V)

    def _run(
        self,
        x_BLC: torch.Tensor,
        modulation: Modulation,
        attn_mask: Optional[torch.Tensor],
        is_causal: bool,
        cache: Optional[KVCache],
        step: bool = False,
    ) -> torch.Tensor:
        """The blocks and the head; ``step``: ``x_BLC`` is one group of new positions over a cache."""
        with sdpa_kernel(attention_backends(x_BLC.device, step)):
            for index, block in enumerate(self.blocks):
                layer_cache = None if cache is None else cache.layers[index]
                x_BLC = block(x_BLC, modulation.blocks[index], attn_mask, is_causal, layer_cache)
        return self.head(x_BLC, modulation.head)  # (B, L, V)


def _linear_drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """0 at the first block rising linearly to max_rate at the last (VAR); plain Python so the
    model can be built on the meta device."""
    if depth == 1:
        return [0.0]
    return [max_rate * index / (depth - 1) for index in range(depth)]
