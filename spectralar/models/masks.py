"""Attention masks of the Nested Spectral Tokenizer: the spectral causal mask (paper §3.2).

Convention: boolean, True = the query (row) may attend to the key (column), as in
`torch.nn.functional.scaled_dot_product_attention` and the ViT blocks' `attn_mask` (vit.py).

"This spectral causal mask restricts each token s_i to only attend to tokens that represent
lower frequencies" (paper §3.2), in both the encoder E and the decoder D. Beyond what the paper
spells out, the image-side tokens (patches, mask tokens) must be masked too, or information from
a later token reaches an earlier one through them one layer later.
"""

from __future__ import annotations

from typing import Optional

import torch

from spectralar.models.checks import require_in_range


def encoder_mask(
    num_patches: int,
    num_tokens: int,
    causal: bool,
    device: Optional[torch.device] = None,
) -> Optional[torch.Tensor]:
    """Mask for the encoder sequence [P (num_patches patch tokens); S0 (num_tokens queries)].

    With `causal` (spectral causal mask, paper §3.2):
      * patch token -> every patch token, no spectral token (a patch that saw s_j would hand
        s_j's information to every s_i, i < j, in the next layer);
      * spectral token s_i -> every patch token and s_j for j <= i.
    Without `causal`: everyone attends to everyone; returned as None so that attention takes
    its unmasked fast path (flash attention on CUDA).

    Returns:
        (L, L) bool tensor with L = num_patches + num_tokens, or None when not causal.
    """
    _check_sizes(num_patches, num_tokens)
    if not causal:
        return None
    length = num_patches + num_tokens
    allowed_LL = torch.zeros(length, length, dtype=torch.bool, device=device)  # (L, L)
    allowed_LL[:, :num_patches] = True  # everybody sees all patches
    tokens_causal_NN = torch.ones(num_tokens, num_tokens, dtype=torch.bool, device=device).tril()
    allowed_LL[num_patches:, num_patches:] = tokens_causal_NN  # s_i sees s_j, j <= i
    return allowed_LL


def decoder_mask(
    num_patches: int,
    num_tokens: int,
    prefix_lengths: torch.Tensor,
    causal: bool,
) -> torch.Tensor:
    """Per-sample mask for the decoder sequence [M (num_patches mask tokens); S' (num_tokens slots)].

    Sample b decodes from its own prefix s_1..s_i, i = prefix_lengths[b] (paper eq. 6, Alg. 1):
    slots j > i are padding and no query attends to them. A padding slot attends only to itself,
    so its softmax row is never empty (no NaN); its output is never read.

    With `causal` (spectral causal mask, paper §3.2):
      * mask token -> every mask token and s_1..s_i;
      * prefix token s_j (j <= i) -> s_k for k <= j only, no mask token (mask tokens carry
        information from the whole prefix, which would leak s_k, k > j, into s_j).
    Without `causal`:
      * mask token and prefix token -> every mask token and s_1..s_i.

    Args:
        prefix_lengths: (B,) integer tensor with values in [0, num_tokens].

    Returns:
        (B, 1, L, L) bool tensor, L = num_patches + num_tokens, on prefix_lengths' device
        (the singleton axis broadcasts over attention heads).
    """
    _check_sizes(num_patches, num_tokens)
    _check_prefix_lengths(prefix_lengths, num_tokens)
    device = prefix_lengths.device
    length = num_patches + num_tokens
    positions_L = torch.arange(length, device=device)  # (L,)
    slot_L = positions_L - num_patches  # (L,) token slot index, negative for mask tokens
    is_mask_L = slot_L < 0  # (L,)
    # A key is visible if it is a mask token or a slot inside the sample's prefix.
    valid_BL = is_mask_L[None, :] | (slot_L[None, :] < prefix_lengths[:, None])  # (B, L)
    query_valid_BL1 = valid_BL[:, :, None]  # (B, L, 1)
    key_valid_B1L = valid_BL[:, None, :]  # (B, 1, L)
    if causal:
        # Mask-token rows see every valid key; token rows see only earlier-or-equal token slots.
        token_causal_LL = (~is_mask_L[None, :]) & (slot_L[None, :] <= slot_L[:, None])  # (L, L)
        pattern_LL = is_mask_L[:, None] | token_causal_LL  # (L, L)
        allowed_BLL = pattern_LL[None] & key_valid_B1L & query_valid_BL1  # (B, L, L)
    else:
        allowed_BLL = key_valid_B1L & query_valid_BL1  # (B, L, L)
    self_LL = torch.eye(length, dtype=torch.bool, device=device)  # (L, L)
    padding_rows_BL1 = ~query_valid_BL1  # (B, L, 1)
    allowed_BLL = allowed_BLL | (padding_rows_BL1 & self_LL[None])  # (B, L, L)
    return allowed_BLL[:, None]  # (B, 1, L, L)


def _check_sizes(num_patches: int, num_tokens: int) -> None:
    if num_patches < 1:
        raise ValueError(f"num_patches must be >= 1, got {num_patches}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")


def _check_prefix_lengths(prefix_lengths: torch.Tensor, num_tokens: int) -> None:
    if prefix_lengths.ndim != 1 or prefix_lengths.dtype.is_floating_point or prefix_lengths.dtype == torch.bool:
        raise ValueError(f"prefix_lengths must be a 1-D integer tensor (B,), got "
                         f"shape {tuple(prefix_lengths.shape)} dtype {prefix_lengths.dtype}")
    require_in_range(prefix_lengths, 0, num_tokens, f"prefix_lengths must lie in [0, {num_tokens}]")
