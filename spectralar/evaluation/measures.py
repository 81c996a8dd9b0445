"""Measures shared by several stages: PSNR of reconstructions and codebook statistics.

One definition each, so a number with one name is computed one way in every metrics file
(train_proxy, train_tokenizer, dump_tokens, sample, evaluate). The float arithmetic is fixed:
the op order and dtypes below are what every written metric was computed with, so results stay
bit-identical to earlier runs.
"""

from __future__ import annotations

import math

import torch

# Floor on the per-image MSE: a perfect reconstruction scores 100 dB instead of +inf.
MIN_MSE = 1e-10


def per_image_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each image pair, (B,), for images in [-1, 1] measured on the [0, 1] scale."""
    return ((a - b) / 2).pow(2).flatten(1).mean(1)  # (B,)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """PSNR (dB) of per-image MSEs on the [0, 1] scale (peak 1), elementwise.

    Separate from :func:`psnr` because train_proxy gathers the MSEs of all its batches and converts
    them in one call; keeping that call keeps its written PSNR bit-identical without relying on an
    elementwise kernel giving the same last bit at every position, batch size and device.
    """
    return -10 * torch.log10(mse.clamp_min(MIN_MSE))


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB), (B,), of images (B, ...) in [-1, 1], on the [0, 1] scale.

    Averaged over images by the caller (``.mean()``), i.e. the mean of per-image PSNRs, not the
    PSNR of the pooled MSE.
    """
    return psnr_from_mse(per_image_mse(a, b))  # (B,)


def codebook_statistics(ids: torch.Tensor, codebook_size: int, *,
                        exp_on_host: bool = True) -> dict[str, float]:
    """How a vector quantizer uses its codebook, from the code ids (any shape) it chose.

    Returns the metrics under the names every stage writes them with:
        codebook_usage: fraction of the K codes chosen at least once (dead codes lower it).
        codebook_perplexity: exp(H) of the empirical code distribution, H in nats: from 1 (one code)
            to min(K, number of ids) (uniform use), the effective number of codes in use.
        codebook_entropy_bits: H in bits (log2 directly, not H / ln 2).

    Counts and entropies are float64 on the device of ``ids``. ``exp_on_host`` takes exp(H) with
    Python's ``math.exp`` (the same on every device) rather than ``torch.exp`` on that device; the
    two differ in the last bit for about 1 value in 200 (measured on CPU), and train_proxy's
    written perplexity was computed with ``torch.exp``, so it passes False to stay bit-identical.
    """
    if codebook_size < 1:
        raise ValueError(f"codebook_size must be >= 1, got {codebook_size}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.numel() == 0:
        raise ValueError(f"ids must be a non-empty integer tensor, "
                         f"got dtype {ids.dtype}, shape {tuple(ids.shape)}")
    flat_ids = ids.reshape(-1).long()
    if int(flat_ids.min()) < 0 or int(flat_ids.max()) >= codebook_size:
        raise ValueError(f"ids must lie in [0, {codebook_size}), "
                         f"got range [{int(flat_ids.min())}, {int(flat_ids.max())}]")
    counts_K = torch.bincount(flat_ids, minlength=codebook_size).double()  # (K,)
    probabilities_K = counts_K / counts_K.sum()  # (K,)
    used_M = probabilities_K[probabilities_K > 0]  # (M,) the codes that occur
    entropy_nats = -(used_M * used_M.log()).sum()
    perplexity = math.exp(float(entropy_nats)) if exp_on_host else float(entropy_nats.exp())
    return {
        "codebook_usage": float((counts_K > 0).double().mean()),
        "codebook_perplexity": perplexity,
        "codebook_entropy_bits": float(-(used_M * used_M.log2()).sum()),
    }
