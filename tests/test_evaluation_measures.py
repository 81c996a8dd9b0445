"""Tests for spectralar.evaluation.measures (PSNR, codebook statistics) and .headline."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from spectralar.evaluation.measures import MIN_MSE, codebook_statistics, per_image_mse, psnr, psnr_from_mse

# --------------------------------------------------------------------------------------------
# PSNR
# --------------------------------------------------------------------------------------------

def test_psnr_is_measured_on_the_zero_one_scale():
    original = torch.zeros(2, 3, 4, 4)
    # An error of 0.2 on the [-1, 1] scale is 0.1 on [0, 1]: MSE 0.01, 20 dB.
    torch.testing.assert_close(psnr(original + 0.2, original), torch.full((2,), 20.0))
    torch.testing.assert_close(per_image_mse(original - 0.2, original), torch.full((2,), 0.01))


def test_psnr_of_a_perfect_reconstruction_is_finite():
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    expected = -10 * math.log10(MIN_MSE)
    assert torch.equal(psnr(images, images), torch.full((3,), expected))


def test_psnr_is_per_image_and_composes_from_mse():
    generator = torch.Generator().manual_seed(0)
    original = torch.rand(5, 3, 8, 8, generator=generator) * 2 - 1
    noise_scale = torch.tensor([0.01, 0.05, 0.1, 0.2, 0.4]).view(5, 1, 1, 1)
    reconstruction = original + noise_scale * torch.randn(5, 3, 8, 8, generator=generator)
    per_image = psnr(reconstruction, original)
    assert per_image.shape == (5,) and (per_image.diff() < 0).all()  # more noise, lower PSNR
    assert torch.equal(per_image, psnr_from_mse(per_image_mse(reconstruction, original)))
    for i in range(5):  # each image's PSNR ignores the rest of the batch
        torch.testing.assert_close(per_image[i:i + 1], psnr(reconstruction[i:i + 1], original[i:i + 1]))
    # The reported mean is the mean of per-image PSNRs, not the PSNR of the pooled MSE.
    pooled = psnr_from_mse(per_image_mse(reconstruction, original).mean())
    assert per_image.mean() > pooled


# --------------------------------------------------------------------------------------------
# Codebook statistics
# --------------------------------------------------------------------------------------------

def test_codebook_statistics_of_known_distributions():
    single = codebook_statistics(torch.zeros(4, 8, 8, dtype=torch.long), codebook_size=16)
    assert single == {"codebook_usage": 1 / 16, "codebook_perplexity": pytest.approx(1.0),
                      "codebook_entropy_bits": pytest.approx(0.0)}
    uniform = codebook_statistics(torch.arange(16).repeat(3).view(3, 4, 4), codebook_size=16)
    assert uniform == {"codebook_usage": 1.0, "codebook_perplexity": pytest.approx(16.0),
                       "codebook_entropy_bits": pytest.approx(4.0)}
    half = codebook_statistics(torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), codebook_size=8)
    assert half == {"codebook_usage": 0.5, "codebook_perplexity": pytest.approx(4.0),
                    "codebook_entropy_bits": pytest.approx(2.0)}
    two_of_four = codebook_statistics(torch.tensor([[0, 0], [1, 1]]), codebook_size=4)
    assert two_of_four == {"codebook_usage": 0.5, "codebook_perplexity": pytest.approx(2.0),
                           "codebook_entropy_bits": pytest.approx(1.0)}


@pytest.mark.parametrize("exp_on_host", [True, False])
def test_codebook_perplexity_and_entropy_agree(exp_on_host: bool):
    ids = (torch.rand(5000, generator=torch.Generator().manual_seed(1)).pow(3) * 100).long()  # skewed
    stats = codebook_statistics(ids, codebook_size=128, exp_on_host=exp_on_host)
    assert 1 < stats["codebook_perplexity"] < 100 and stats["codebook_usage"] == 100 / 128
    assert stats["codebook_entropy_bits"] == pytest.approx(math.log2(stats["codebook_perplexity"]), rel=1e-12)
    other = codebook_statistics(ids, codebook_size=128, exp_on_host=not exp_on_host)
    assert other == pytest.approx(stats, rel=1e-14)  # the two exp paths differ at most in the last bit


@pytest.mark.parametrize("ids, codebook_size", [
    (torch.tensor([0, 16]), 16),  # out of range
    (torch.tensor([-1, 0]), 16),
    (torch.tensor([0.0, 1.0]), 16),  # not integer ids
    (torch.zeros(0, dtype=torch.long), 16),  # empty
    (torch.tensor([0]), 0),
])
def test_codebook_statistics_rejects(ids: torch.Tensor, codebook_size: int):
    with pytest.raises(ValueError, match="ids|codebook_size"):
        codebook_statistics(ids, codebook_size)


# --------------------------------------------------------------------------------------------
# Headline metrics
# --------------------------------------------------------------------------------------------

def test_headline_metrics_load_without_torch():
    """The Snakefile imports spectralar.sweep, which reads the list: it must not pull in torch."""
    script = ("import sys, spectralar.sweep, spectralar.evaluation.headline; "
              "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script]).returncode == 0
