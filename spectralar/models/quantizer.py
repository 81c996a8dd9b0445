"""Vector quantizer Q of the Nested Spectral Tokenizer (paper eq. 3, S = Q(Ŝ)), and the VQ maths
it shares with the proxy's quantizer (``spectralar.models.proxy_vq.ProxyQuantizer``).

Follows TiTok's quantizer: latents z and codebook entries are L2-normalised, nearest-code lookup
and both loss terms run in float32 even under autocast, and gradients pass the quantisation step
with the straight-through estimator (VQ-VAE, van den Oord et al. 2017). The loss is the
‖Ŝ − S‖² term of eq. 4, split as in VQ-VAE into a codebook term and a weighted commitment term;
TiTok uses no entropy loss, so neither do we.

Why two quantizer classes and not one with options: they agree on the maths (the functions
below, used by both) but not on conventions. This one quantises a token sequence (B, N, D),
L2-normalised by default, and returns normalised codes; the proxy's quantises a feature map
(B, D, h, w) of raw vectors, decodes probability mixtures of its codebook (TiTok stage 2) and
must keep the official MaskGIT-VQGAN layout. One class would branch on layout and normalisation
in every method, and moving the proxy's loss to another layout would change its float sums.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spectralar.spectral.dct import float32_region


def nearest_code_ids(z: torch.Tensor, codebook_KD: torch.Tensor) -> torch.Tensor:
    """Index of the closest code to each row of z (..., D), shape (...): squared Euclidean distance
    expanded as ‖z‖² − 2 z·e + ‖e‖², so no (..., K, D) difference tensor is materialised."""
    distances = (
        z.pow(2).sum(-1, keepdim=True)
        - 2.0 * z @ codebook_KD.t()
        + codebook_KD.pow(2).sum(-1)
    )  # (..., K)
    return distances.argmin(dim=-1)  # (...)


def straight_through_vq(z: torch.Tensor, codes: torch.Tensor,
                        commitment_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes with the straight-through gradient to z, VQ loss) for codes chosen for z (same shape).

    VQ-VAE's loss (van den Oord et al. 2017, eq. 3): ‖sg[z] − e‖² moves the codebook,
    ``commitment_weight`` · ‖z − sg[e]‖² keeps the encoder close to its codes. The returned
    tensor equals the codes in value; its gradient flows to z unchanged (straight-through).
    """
    codebook_term = F.mse_loss(codes, z.detach())
    commitment_term = F.mse_loss(z, codes.detach())
    loss = codebook_term + commitment_weight * commitment_term
    return z + (codes - z).detach(), loss


class SpectralTokenQuantizer(nn.Module):
    """The tokenizer's quantizer: each of the N spectral tokens (B, N, D) becomes its nearest code.

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
        with float32_region(z_BND.device):
            z_BND = z_BND.float()
            if self.normalize:
                z_BND = F.normalize(z_BND, dim=-1)
            codebook_KD = self._codebook()  # (K, D)
            ids_BN = nearest_code_ids(z_BND, codebook_KD)  # (B, N)
            codes_BND = codebook_KD[ids_BN]  # (B, N, D)
            z_q_BND, loss = straight_through_vq(z_BND, codes_BND, self.commitment_weight)  # (B, N, D)
        return z_q_BND.to(input_dtype), ids_BN, loss

    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Look up codes for ids of any shape (...,) -> (..., D), normalised if `normalize`."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() > 0 and (int(ids.min()) < 0 or int(ids.max()) >= self.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.codebook_size}), got range "
                             f"[{int(ids.min())}, {int(ids.max())}]")
        return self._codebook()[ids.long()]  # (..., D)
