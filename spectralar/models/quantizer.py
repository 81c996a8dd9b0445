"""Vector quantizer Q of the Nested Spectral Tokenizer (paper eq. 3, S = Q(Ŝ)).

Follows TiTok's quantizer (REFERENCE §2): latents z and codebook entries are L2-normalised,
nearest-code lookup and both loss terms run in float32 even under autocast, and gradients pass
the quantisation step with the straight-through estimator (VQ-VAE, van den Oord et al. 2017).
The loss is the ‖Ŝ − S‖² term of eq. 4, split as in VQ-VAE into a codebook term and a weighted
commitment term; TiTok uses no entropy loss, so neither do we.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with straight-through gradients.

    Args:
        codebook_size: number of codes K (TiTok-B64: 4096).
        code_dim: dimension D of each code (TiTok-B64: 12).
        commitment_weight: β in loss = ‖sg(z) − e‖² + β·‖z − sg(e)‖² (VQ-VAE; TiTok uses 0.25).
        normalize: L2-normalise z and codes before lookup (TiTok "use_l2_norm"; cosine-similarity
            lookup keeps codebook usage high with a tiny 12-d code space).
    """

    def __init__(
        self,
        codebook_size: int,
        code_dim: int,
        commitment_weight: float = 0.25,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if codebook_size < 1:
            raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
        if code_dim < 1:
            raise ValueError(f"code_dim must be >= 1, got {code_dim}")
        if commitment_weight < 0:
            raise ValueError(f"commitment_weight must be >= 0, got {commitment_weight}")
        self.codebook_size = codebook_size
        self.code_dim = code_dim
        self.commitment_weight = commitment_weight
        self.normalize = normalize
        # Named "embedding" like TiTok so name-based weight-decay grouping leaves it undecayed.
        self.embedding = nn.Embedding(codebook_size, code_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """TiTok's init: uniform in ±1/K (scale is irrelevant once codes are normalised)."""
        bound = 1.0 / self.codebook_size
        nn.init.uniform_(self.embedding.weight, -bound, bound)

    def _codebook(self) -> torch.Tensor:
        codebook_KD = self.embedding.weight.float()  # (K, D)
        return F.normalize(codebook_KD, dim=-1) if self.normalize else codebook_KD

    def forward(self, z_BND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantise latents.

        Args:
            z_BND: continuous latents Ŝ, shape (B, N, D).

        Returns:
            z_q: quantised latents (B, N, D), equal in value to the (normalised) chosen codes,
                with straight-through gradient to z; same dtype as the input.
            ids: chosen code indices (B, N), long.
            loss: scalar float32 VQ loss (codebook term + commitment_weight · commitment term).
        """
        if z_BND.ndim != 3 or z_BND.shape[-1] != self.code_dim:
            raise ValueError(f"z must have shape (B, N, {self.code_dim}), got {tuple(z_BND.shape)}")
        input_dtype = z_BND.dtype
        # fp32 lookup (TiTok): low-precision distances pick wrong codes among 4096 close ones.
        with torch.autocast(device_type=z_BND.device.type, enabled=False):
            z_BND = z_BND.float()
            if self.normalize:
                z_BND = F.normalize(z_BND, dim=-1)
            codebook_KD = self._codebook()  # (K, D)
            ids_BN = _nearest_code(z_BND, codebook_KD)  # (B, N)
            codes_BND = codebook_KD[ids_BN]  # (B, N, D)
            codebook_loss = F.mse_loss(codes_BND, z_BND.detach())
            commitment_loss = F.mse_loss(z_BND, codes_BND.detach())
            loss = codebook_loss + self.commitment_weight * commitment_loss
            # Straight-through: forward value = code, backward = identity to z.
            z_q_BND = z_BND + (codes_BND - z_BND).detach()  # (B, N, D)
        return z_q_BND.to(input_dtype), ids_BN, loss

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up codes for ids of any shape (...,) -> (..., D), normalised if `normalize`."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.codebook_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self._codebook()[ids.long()]  # (..., D)


def _nearest_code(z_BND: torch.Tensor, codebook_KD: torch.Tensor) -> torch.Tensor:
    """Index of the closest code in squared Euclidean distance, ‖z‖² − 2 z·e + ‖e‖²."""
    distances_BNK = (
        z_BND.pow(2).sum(-1, keepdim=True)
        - 2.0 * z_BND @ codebook_KD.t()
        + codebook_KD.pow(2).sum(-1)
    )  # (B, N, K)
    return distances_BNK.argmin(dim=-1)  # (B, N)


def codebook_stats(ids: torch.Tensor, codebook_size: int) -> dict[str, float]:
    """Codebook health over a batch of ids of any shape.

    Returns:
        usage: fraction of the K codes that occur at least once.
        perplexity: exp(entropy) of the empirical code distribution, between 1 (one code) and
            min(K, number of ids) (uniform use).
    """
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    flat_ids = ids.reshape(-1).long()
    if flat_ids.numel() == 0:
        raise ValueError("ids must not be empty")
    if int(flat_ids.min()) < 0 or int(flat_ids.max()) >= codebook_size:
        raise ValueError(f"ids must lie in [0, {codebook_size})")
    counts_K = torch.bincount(flat_ids, minlength=codebook_size).double()  # (K,)
    probabilities_K = counts_K / counts_K.sum()
    nonzero = probabilities_K[probabilities_K > 0]
    entropy = float(-(nonzero * nonzero.log()).sum())
    return {
        "usage": float((counts_K > 0).sum()) / codebook_size,
        "perplexity": math.exp(entropy),
    }
