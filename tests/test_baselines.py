"""Known-answer tests for the reference codes of the tokenizer-quality table (DCT ceiling, PCA)."""
from __future__ import annotations

import pytest
import torch

from spectralar.evaluation.baselines import (dct_ceiling_psnr, equal_bits_components, fit_pca, pca_equal_bits_psnr,
                                             pca_reconstruct)
from spectralar.spectral import band_limit, dct2, idct2


def _images(count: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, 1, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1


def test_band_limited_image_equals_its_own_target():
    spectrum = dct2(_images(3))
    spectrum[..., 3:, :] = 0
    spectrum[..., :, 3:] = 0
    band_limited = idct2(spectrum)  # exactly 3x3-limited
    assert torch.allclose(band_limit(band_limited, 3), band_limited, atol=1e-12)
    assert dct_ceiling_psnr(band_limited, 3) == pytest.approx(100.0)  # MSE floor: identical images
    assert dct_ceiling_psnr(band_limited, 2) < 60.0
    assert dct_ceiling_psnr(_images(3), 8) == pytest.approx(100.0)  # ω = H keeps everything


def test_dct_ceiling_matches_the_energy_outside_the_block():
    """Parseval: the orthonormal DCT's dropped coefficients carry exactly the squared error."""
    images = _images(4, seed=3)
    spectrum = dct2(images)
    kept = torch.zeros_like(spectrum, dtype=torch.bool)
    kept[..., :5, :5] = True
    mse_B = (spectrum.masked_fill(kept, 0) / 2).pow(2).flatten(1).mean(1)  # [0, 1] scale
    expected = float((-10 * torch.log10(mse_B)).mean())
    assert dct_ceiling_psnr(images, 5) == pytest.approx(expected, abs=1e-9)


def test_pca_reconstructs_images_in_the_span_of_k_components_exactly():
    generator = torch.Generator().manual_seed(1)
    basis_kD = torch.linalg.qr(torch.randn(64, 3, generator=generator, dtype=torch.float64))[0].T  # (3, 64)
    mean_D = 0.1 * torch.randn(64, generator=generator, dtype=torch.float64)
    train = (mean_D + torch.randn(200, 3, generator=generator, dtype=torch.float64) @ basis_kD).reshape(200, 1, 8, 8)
    pca = fit_pca(train, max_components=5)
    test = train[:20]
    torch.testing.assert_close(pca_reconstruct(pca, test, components=3, bits=None), test, atol=1e-9, rtol=0)
    assert not torch.allclose(pca_reconstruct(pca, test, components=2, bits=None), test, atol=1e-3)
    # 8-bit coefficients: the error is at most half a quantisation step per coefficient
    quantised = pca_reconstruct(pca, test, components=3, bits=8)
    steps = (pca.high_K[:3] - pca.low_K[:3]) / 255
    assert float((quantised - test).flatten(1).norm(dim=1).max()) <= float(steps.norm()) / 2 + 1e-9
    assert pca_equal_bits_psnr(pca, test, 3) > pca_equal_bits_psnr(pca, test, 2)


def test_equal_bits_counts_whole_coefficients():
    assert equal_bits_components(16, 256) == 16  # 16 tokens x 8 bits = 16 8-bit coefficients
    assert equal_bits_components(1, 256) == 1
    assert equal_bits_components(3, 1024) == 3  # 30 bits -> 3 whole bytes
    assert equal_bits_components(1, 16) == 0  # 4 bits: not one whole coefficient (the mean image)
    pca = fit_pca(_images(100), max_components=4)
    with pytest.raises(ValueError):
        pca_reconstruct(pca, _images(2), components=5)
