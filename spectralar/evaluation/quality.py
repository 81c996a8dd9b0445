"""Where a tokenizer's reconstruction quality goes: every prefix beside the simple codes of its size.

For each prefix length i (tokens s_1..s_i, ω_i from the schedule) the table holds
  * psnr_prefix: the prefix's reconstruction against its own target I'_i (what nested training asks);
  * psnr_prefix_vs_full_image: the same reconstruction against the image I;
  * dct_ceiling: I'_i against I, what a prefix that reproduced its target exactly would score against I;
  * pca_equal_bits: a PCA code with as many 8-bit coefficients as the i tokens have bits (i·log2 K);
  * proxy_ceiling: the proxy VQ's own reconstruction of I'_i against I'_i, the cap of TiTok's stage-1
    target (``decoder_head: proxy_codes``; with a pixel head the proxy is not on the decode path).
All are the mean of per-image PSNRs on the same val images (``measures.psnr`` convention).

The PCA code of the full code's bits (:meth:`EqualBitsPCA.images`) is also scored on every measure the
tokenizer's reconstructions get (rFID, class accuracy, FID / precision / recall like the samples): a
tokenizer must beat the simple code of its size on what a person sees too, not only on PSNR.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spectralar.data.loader import to_float, to_uint8
from spectralar.data.shards import ImageShards
from spectralar.evaluation.baselines import PCABasis, dct_ceiling_psnr, equal_bits_components, fit_pca, \
    pca_equal_bits_psnr, pca_reconstruct
from spectralar.evaluation.measures import psnr
from spectralar.spectral import band_limit

PCA_BITS = 8  # bits per PCA coefficient: a byte, the size of one token id of a 256-code codebook


def float_images(shards: ImageShards, index: np.ndarray) -> torch.Tensor:
    """Images of ``shards`` at ``index`` as float64 (B, C, H, W) in [-1, 1]."""
    images = torch.from_numpy(shards.images(index)).permute(0, 3, 1, 2)
    return to_float(images).double()


@dataclass(frozen=True)
class EqualBitsPCA:
    """The PCA code of every prefix's bit budget: ``components[i - 1]`` 8-bit coefficients for i tokens,
    all from one basis fitted on ``fit_images`` training images."""

    basis: PCABasis
    components: tuple[int, ...]
    fit_images: int

    def images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) through the code of all N tokens' bits, as uint8: what the tokenizer's
        full code is compared with on every measure, not only PSNR."""
        return to_uint8(pca_reconstruct(self.basis, to_float(images_uint8), self.components[-1], PCA_BITS).float())


def equal_bits_pca(train: ImageShards, num_tokens: int, codebook_size: int, fit_images: int) -> EqualBitsPCA:
    """Fit the PCA basis of the equal-bits code on ``fit_images`` training images spread over the split; a
    prefix whose bits do not make one whole coefficient gets the mean image (0 components)."""
    components = tuple(equal_bits_components(i, codebook_size, PCA_BITS) for i in range(1, num_tokens + 1))
    train_images = float_images(train, train.spread(fit_images))
    dimension = int(np.prod(train_images.shape[1:]))
    if max(components) > min(len(train_images), dimension):
        raise ValueError(f"the equal-bits PCA code needs {max(components)} components but {len(train_images)} "
                         f"training images of dimension {dimension} give at most "
                         f"{min(len(train_images), dimension)}: raise evaluate.baseline_images")
    return EqualBitsPCA(fit_pca(train_images, max(max(components), 1)), components, len(train_images))


def reference_codes(pca: EqualBitsPCA, val_images: torch.Tensor, omegas: Sequence[int]) -> dict[str, list]:
    """DCT ceiling and equal-bits PCA PSNR for every prefix length (float64)."""
    if len(omegas) != len(pca.components):
        raise ValueError(f"{len(omegas)} omegas for a PCA code of {len(pca.components)} prefix lengths")
    return {
        "dct_ceiling": [round(dct_ceiling_psnr(val_images, omega), 3) for omega in omegas],
        "pca_equal_bits": [round(pca_equal_bits_psnr(pca.basis, val_images, k, PCA_BITS), 3) for k in pca.components],
        "pca_components": list(pca.components),
        "pca_fit_images": pca.fit_images,
    }


@torch.no_grad()
def proxy_ceiling(proxy, val_images: torch.Tensor, omegas: Sequence[int], batch_size: int = 250) -> list[float]:
    """PSNR of the proxy VQ's reconstruction of I'_i against I'_i, for every prefix length i."""
    device = next(proxy.parameters()).device
    proxy.eval()
    totals = torch.zeros(len(omegas), dtype=torch.float64)
    for start in range(0, len(val_images), batch_size):
        x = val_images[start:start + batch_size].float().to(device)
        for i, omega in enumerate(omegas):
            target = band_limit(x, omega)
            reconstruction = proxy.codes_to_images(proxy.encode_ids(target)).clamp(-1, 1)
            totals[i] += psnr(reconstruction, target).double().sum().cpu()
    return [round(v, 3) for v in (totals / len(val_images)).tolist()]
