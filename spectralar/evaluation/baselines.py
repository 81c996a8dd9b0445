"""Reference codes beside the tokenizer's per-prefix PSNR table: the DCT ceiling and equal-bits PCA.

* :func:`dct_ceiling_psnr`: PSNR of the band-limited target I'_i = IDCT(DCT(I) ∘ 1_ω) against the
  image I itself, what a prefix that reproduced its own target exactly would score against I.
* :func:`pca_equal_bits_psnr`: a linear code with the bit budget of i tokens of a K-code codebook
  (i·log2 K bits): the first ``floor(i·log2 K / bits)`` principal components (fitted on training
  images), each coefficient uniformly quantised to ``bits`` bits over its training range.

A learned tokenizer that does not beat the PCA code of its own size has not learnt anything a
linear transform would not give. Both use the project's PSNR convention (``measures.psnr``: images
in [-1, 1], MSE on the [0, 1] scale, per image, then averaged), in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from spectralar.evaluation.measures import psnr
from spectralar.spectral import band_limit


def dct_ceiling_psnr(images_BCHW: torch.Tensor, omega: int) -> float:
    """Mean PSNR of I'_ω (the top-left ω×ω DCT block kept) against the images themselves."""
    images = images_BCHW.double()
    return float(psnr(band_limit(images, omega), images).mean())


@dataclass(frozen=True)
class PCABasis:
    """Mean (D,), principal directions (K, D) as rows, and each coefficient's training range (K,)."""

    mean_D: torch.Tensor
    components_KD: torch.Tensor
    low_K: torch.Tensor
    high_K: torch.Tensor

    @property
    def max_components(self) -> int:
        return self.components_KD.shape[0]


def fit_pca(train_images_BCHW: torch.Tensor, max_components: int) -> PCABasis:
    """PCA of flattened training images (float64, exact SVD of the centred data)."""
    data_BD = train_images_BCHW.double().flatten(1)
    if not 1 <= max_components <= min(data_BD.shape):
        raise ValueError(f"max_components must lie in [1, {min(data_BD.shape)}], got {max_components}")
    mean_D = data_BD.mean(0)
    _, _, vh_DD = torch.linalg.svd(data_BD - mean_D, full_matrices=False)
    components_KD = vh_DD[:max_components]  # (K, D) orthonormal rows
    coefficients_BK = (data_BD - mean_D) @ components_KD.T
    return PCABasis(mean_D, components_KD, coefficients_BK.min(0).values, coefficients_BK.max(0).values)


def pca_reconstruct(basis: PCABasis, images_BCHW: torch.Tensor, components: int,
                    bits: int | None = 8) -> torch.Tensor:
    """Project onto the first ``components`` directions, quantise each coefficient to ``bits`` bits
    (uniform over its training range, clamped; None = no quantisation), reconstruct (float64)."""
    if not 0 <= components <= basis.max_components:
        raise ValueError(f"components must lie in [0, {basis.max_components}], got {components}")
    data_BD = images_BCHW.double().flatten(1)
    if components == 0:
        return basis.mean_D.expand_as(data_BD).reshape(images_BCHW.shape)
    directions_kD = basis.components_KD[:components]
    coefficients_Bk = (data_BD - basis.mean_D) @ directions_kD.T  # (B, k)
    if bits is not None:
        low_k, high_k = basis.low_K[:components], basis.high_K[:components]
        step_k = (high_k - low_k).clamp_min(1e-12) / (2 ** bits - 1)
        index_Bk = ((coefficients_Bk.clamp(low_k, high_k) - low_k) / step_k).round()
        coefficients_Bk = low_k + index_Bk * step_k
    return (basis.mean_D + coefficients_Bk @ directions_kD).reshape(images_BCHW.shape)


def equal_bits_components(num_tokens: int, codebook_size: int, bits: int = 8) -> int:
    """How many ``bits``-bit PCA coefficients fit in the bits of ``num_tokens`` tokens."""
    return int(num_tokens * math.log2(codebook_size) // bits)


def pca_equal_bits_psnr(basis: PCABasis, images_BCHW: torch.Tensor, components: int, bits: int = 8) -> float:
    """Mean PSNR of the PCA code with ``components`` coefficients of ``bits`` bits each."""
    reconstruction = pca_reconstruct(basis, images_BCHW, components, bits)
    return float(psnr(reconstruction, images_BCHW.double()).mean())
