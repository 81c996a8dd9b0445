"""Reconstruction quality of a trained tokenizer: every prefix against its own target and the image.

Nested spectral decoding (paper §3.2, Algorithm 1) asks the first i tokens to reconstruct
I'_i = IDCT(DCT(I) ∘ 1_{ω_i}); this measures how well they do, on val images spread over the split.
"""

from __future__ import annotations

import torch

from spectralar.data.loader import to_float
from spectralar.data.shards import ImageShards
from spectralar.evaluation.measures import codebook_statistics, psnr
from spectralar.log import progress
from spectralar.models.codec import SpectralCodec
from spectralar.spectral import band_limit


@torch.no_grad()
def prefix_psnr(codec: SpectralCodec, shards: ImageShards, count: int, device: torch.device) -> dict:
    """PSNR of every prefix length against its own target I'_i, and against the full image."""
    codec.eval()
    index = shards.spread(count)  # evenly over the split (ImageFolder splits are class-sorted)
    count = len(index)
    n = codec.num_tokens
    prefix_psnr, full_psnr, all_ids = torch.zeros(n), torch.zeros(n), []
    for start in progress(range(0, count, 100), desc="prefix PSNR", unit="batch", log_every=10):
        images = torch.from_numpy(shards.images(index[start:start + 100])).permute(0, 3, 1, 2)
        x = to_float(images.to(device))
        ids = codec.encode(x)
        all_ids.append(ids.cpu())
        for i in range(1, n + 1):
            reconstruction = codec.decode(ids[:, :i])
            prefix_psnr[i - 1] += psnr(reconstruction, band_limit(x, codec.omegas[i - 1])).sum().cpu()
            full_psnr[i - 1] += psnr(reconstruction, x).sum().cpu()
    codebook = codebook_statistics(torch.cat(all_ids), codec.tokenizer.config.codebook_size)
    return {
        "psnr_prefix": [round(v, 3) for v in (prefix_psnr / count).tolist()],
        "psnr_prefix_vs_full_image": [round(v, 3) for v in (full_psnr / count).tolist()],
        "psnr_full": round(float(full_psnr[-1] / count), 3),
        "codebook_usage": round(codebook["codebook_usage"], 4),
        "codebook_perplexity": round(codebook["codebook_perplexity"], 2),
        "codebook_entropy_bits": round(codebook["codebook_entropy_bits"], 3),
        "eval_images": count,
    }
