"""Images <-> spectral token ids: the tokenizer plus the proxy decoder, the API later stages use."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from spectralar.data.loader import to_uint8
from spectralar.models.proxy_vq import ProxyVQModel
from spectralar.models.tokenizer import NestedSpectralTokenizer
from spectralar.spectral import band_limit


class SpectralCodec(nn.Module):
    """encode: images (B, C, H, W) in [-1, 1] -> ids (B, N); decode: ids or any prefix -> images.

    Decoding follows TiTok's two stages: the tokenizer predicts proxy-code logits at every
    position; ``soft`` mixes the proxy codebook with their softmax (stage 2, the fine-tuned path),
    otherwise the argmax codes are decoded (stage 1). A tokenizer with ``decoder_head: pixels``
    predicts the pixels itself; the proxy (kept for a uniform model file) and ``soft`` are unused.
    """

    def __init__(self, tokenizer: NestedSpectralTokenizer, proxy: ProxyVQModel, omegas: tuple[int, ...],
                 soft: bool = True) -> None:
        super().__init__()
        self.tokenizer, self.proxy = tokenizer, proxy
        self.omegas = tuple(omegas)
        self.soft = soft

    @property
    def num_tokens(self) -> int:
        return self.tokenizer.config.num_tokens

    @torch.no_grad()
    def encode(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.tokenizer.encode_ids(images_BCHW)  # (B, N)

    @property
    def pixel_head(self) -> bool:
        return self.tokenizer.config.decoder_head == "pixels"

    @property
    def decode_mode(self) -> str:
        """How decoder outputs become images: pixels (pixel head), soft or argmax (proxy codes)."""
        return "pixels" if self.pixel_head else "soft" if self.soft else "argmax"

    def logits_to_images(self, logits_BVhw: torch.Tensor) -> torch.Tensor:
        """The decoder's output -> images (B, C, H, W); identity for a pixel-head tokenizer."""
        if self.pixel_head:
            return logits_BVhw.float()
        if self.soft:
            return self.proxy.probs_to_images(logits_BVhw.float().softmax(dim=1))  # (B, C, H, W)
        return self.proxy.codes_to_images(logits_BVhw.argmax(dim=1))

    @torch.no_grad()
    def decode(self, ids_Bn: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Ids (B, n <= N) -> images (B, C, H, W) in [-1, 1]; n ids decode the n-token prefix."""
        images = self.logits_to_images(self.tokenizer.decode_ids(ids_Bn, prefix_lengths))
        if self.tokenizer.config.band_limited_output:
            if prefix_lengths is None:
                prefix_lengths = torch.full((ids_Bn.shape[0],), ids_Bn.shape[1], dtype=torch.long)
            images = self.band_limit_prefix(images, prefix_lengths)
        return images.clamp(-1, 1)

    def band_limit_prefix(self, images_BCHW: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """Project each sample's image onto the ω_i block of its prefix i (prefix 0: unchanged)."""
        lengths_B = prefix_lengths.to(images_BCHW.device).long()
        omegas_B = torch.tensor(self.omegas, device=images_BCHW.device)[(lengths_B - 1).clamp_min(0)]
        projected = band_limit(images_BCHW, omegas_B)
        return torch.where((lengths_B > 0)[:, None, None, None], projected, images_BCHW)


def decode_uint8(codec: SpectralCodec, ids_Bn: torch.Tensor, batch_size: int) -> np.ndarray:
    """Images uint8 (B, H, W, C) decoded from the ids' prefix (all n given tokens)."""
    parts = [to_uint8(codec.decode(ids_Bn[start:start + batch_size])).permute(0, 2, 3, 1).cpu().numpy()
             for start in range(0, len(ids_Bn), batch_size)]
    return np.concatenate(parts)
