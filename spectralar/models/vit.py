"""The pre-LayerNorm ViT block of the tokenizer's encoder and decoder (ViT-B, as TiTok uses it).

    x = x + Attn(LN1(x)),   x = x + MLP(LN2(x)),   MLP = Linear(C, rC) -> exact GELU -> Linear(rC, C)

Multi-head self-attention with a bias on the fused qkv projection and on the output projection,
softmax(q k^T / sqrt(D)) through ``torch.nn.functional.scaled_dot_product_attention`` (its kernel chosen
by the caller's ``sdpa_kernel``); no dropout, drop-path or layer scale (TiTok trains without them).

The same computation, parameter names and construction order as ``timm.models.vision_transformer.Block``
built with ``qkv_bias=True, norm_layer=nn.LayerNorm`` and its defaults (fused attention): state dicts
load either way and the outputs agree bit for bit (``tests/test_vit.py`` checks both against timm).
Written out because importing timm costs a stage process about 3.5 s (it imports torchvision, which
imports ``torch._dynamo``) for a 40-line module, in every stage that builds the tokenizer.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    """Multi-head self-attention, 1/sqrt(head dim) scale, bias on qkv and the output projection."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, width // heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x_BLC: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        B, L, C = x_BLC.shape
        qkv_3BHLD = self.qkv(x_BLC).reshape(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_BHLD, k_BHLD, v_BHLD = qkv_3BHLD.unbind(0)
        out_BHLD = F.scaled_dot_product_attention(q_BHLD, k_BHLD, v_BHLD, attn_mask=attn_mask,
                                                  is_causal=is_causal)
        return self.proj(out_BHLD.transpose(1, 2).reshape(B, L, C))


class Mlp(nn.Module):
    """Linear -> exact GELU -> Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BLC)))


class Block(nn.Module):
    """Pre-LN transformer block. ``attn_mask``: bool (L, L) or (B, 1, L, L), True = may attend (SDPA's
    convention, as in ``spectralar.models.masks``)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x_BLC: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        x_BLC = x_BLC + self.attn(self.norm1(x_BLC), attn_mask=attn_mask, is_causal=is_causal)
        return x_BLC + self.mlp(self.norm2(x_BLC))
