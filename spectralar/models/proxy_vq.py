"""MaskGIT-VQGAN-style proxy VQ model: conv encoder / decoder around a 2D codebook.

TiTok trains its 1D tokenizer in two stages with "proxy codes" (TiTok's two-stage recipe; paper §4.1 follows
TiTok exactly): a frozen MaskGIT-VQGAN (Chang et al., 2022) turns every target image into a grid of
code ids; stage 1 trains the tokenizer's decoder to predict those ids by cross-entropy; stage 2
softmaxes the tokenizer's logits, mixes this codebook with the probabilities and runs this decoder.
One method per consumer (the VAR quantizer's habit):

- ``forward``          training a proxy from scratch (straight-through estimator, VQ loss);
- ``encode_ids``       proxy-code extraction for stage 1 targets;
- ``codes_to_images``  decoding hard ids (previews, rFID of the proxy itself);
- ``probs_to_images``  stage 2: soft mixing of the codebook, differentiable in the probabilities.

The module tree reproduces the official state dict (``maskgit-vqgan-imagenet-f16-256.bin``; the tests
hold it to the release's key list) so that it loads with ``strict=True``:

- encoder: ``conv_in`` (3x3, no bias) -> ``down.{i}.block.{j}`` -> 2x2 average pool after every level
  but the last (the keys file has no parameters for it) -> ``mid.{j}`` -> ``norm_out`` -> SiLU ->
  ``conv_out`` (1x1, bias) to ``code_dim``.
- decoder: ``conv_in`` (3x3, bias) -> ``mid.{j}`` -> ``up.{i}`` run from the coarsest level down, each
  with res-blocks then, for ``i > 0``, nearest 2x upsampling and ``upsample_conv`` (3x3, bias) ->
  ``norm_out`` -> SiLU -> ``conv_out`` (3x3, bias).
- res-block convolutions carry no bias; GroupNorm uses eps 1e-6 (Flax's default, kept by the port the
  official weights were converted with); no attention anywhere.

Every public method takes and returns images in [-1, 1]. The official weights were trained on [0, 1]
images (TiTok clamps their decodings to [0, 1]); ``ProxyConfig.pixel_range`` records the range the
network itself works in and the model converts at its boundary.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spectralar.models.quantizer import nearest_code_ids, straight_through_vq
from spectralar.spectral.dct import float32_region

logger = logging.getLogger(__name__)

CHECKPOINT_FILE_NAME = "maskgit-vqgan-imagenet-f16-256.bin"
# Flax GroupNorm default; the official weights were trained with it.
GROUP_NORM_EPSILON = 1e-6
_PIXEL_RANGES = ("minus_one_one", "zero_one")


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


PREPARED_MANIFEST = "the prepared dataset's manifest (prepare: data.resolution, the images' channels)"


@dataclass(frozen=True)
class ProxyConfig:
    """Shape of the proxy VQ model; the defaults are a tiny 32 px grayscale model for tests and CPU.

    ``pixel_range`` is the range the *network* was trained on; public methods always speak [-1, 1].
    """

    # Derived (spectralar.config.DERIVED_FROM): filled in by train_proxy from the prepared dataset.
    image_size: int = field(default=32, metadata={"derived_from": PREPARED_MANIFEST})
    in_channels: int = field(default=1, metadata={"derived_from": PREPARED_MANIFEST})
    base_channels: int = 32
    channel_multipliers: tuple[int, ...] = (1, 2, 2)
    res_blocks: int = 2
    codebook_size: int = 256
    code_dim: int = 32
    norm_groups: int = 8
    commitment_weight: float = 0.25
    pixel_range: Literal["minus_one_one", "zero_one"] = "minus_one_one"

    def __post_init__(self) -> None:
        # A YAML loader hands lists; keep the dataclass hashable and immutable.
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        for name in ("image_size", "in_channels", "base_channels", "res_blocks", "codebook_size",
                     "code_dim", "norm_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProxyConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.channel_multipliers or min(self.channel_multipliers) < 1:
            raise ValueError("ProxyConfig.channel_multipliers must be a non-empty tuple of ints >= 1, "
                             f"got {self.channel_multipliers}")
        if self.commitment_weight < 0:
            raise ValueError(f"ProxyConfig.commitment_weight must be >= 0, got {self.commitment_weight}")
        if self.pixel_range not in _PIXEL_RANGES:
            raise ValueError(f"ProxyConfig.pixel_range must be one of {_PIXEL_RANGES}, "
                             f"got {self.pixel_range!r}")
        if self.image_size % self.downsample_factor:
            raise ValueError(f"ProxyConfig.image_size ({self.image_size}) must be divisible by the "
                             f"downsample factor 2**(len(channel_multipliers)-1) = {self.downsample_factor}")
        for channels in self.level_channels:
            if channels % self.norm_groups:
                raise ValueError(f"ProxyConfig.norm_groups ({self.norm_groups}) must divide every level's "
                                 f"channels base_channels*channel_multipliers = {self.level_channels}")

    @classmethod
    def maskgit_imagenet(cls) -> ProxyConfig:
        """The official MaskGIT-VQGAN (ImageNet 256, f16, codebook 1024 x 256) that TiTok trains against."""
        return cls(image_size=256, in_channels=3, base_channels=128, channel_multipliers=(1, 1, 2, 2, 4),
                   res_blocks=2, codebook_size=1024, code_dim=256, norm_groups=32,
                   commitment_weight=0.25, pixel_range="zero_one")

    @property
    def downsample_factor(self) -> int:
        """One 2x average pool between consecutive levels."""
        return 2 ** (len(self.channel_multipliers) - 1)

    @property
    def grid_size(self) -> int:
        """Side of the code grid (16 for the official model)."""
        return self.image_size // self.downsample_factor

    @property
    def level_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_multipliers)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=GROUP_NORM_EPSILON, affine=True)


class ResBlock(nn.Module):
    """norm-SiLU-conv twice, plus a residual.

    Quirk of the official MaskGIT-VQGAN (and of the weights): when the block changes the channel count,
    the 1x1 ``nin_shortcut`` is applied to the block's own output h, not to its input, so the block
    returns h + W·h and the input never reaches the output directly. Reproduced on purpose: the
    official ``nin_shortcut`` weights are (out, out, 1, 1), which only fits this form.
    """

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(norm_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _group_norm(norm_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.nin_shortcut: Optional[nn.Conv2d] = None
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        h_BOHW = self.conv1(F.silu(self.norm1(x_BCHW)))  # (B, out, H, W)
        h_BOHW = self.conv2(F.silu(self.norm2(h_BOHW)))  # (B, out, H, W)
        if self.nin_shortcut is not None:
            return h_BOHW + self.nin_shortcut(h_BOHW)  # quirk: shortcut of h, not of x
        return x_BCHW + h_BOHW


def _res_blocks(in_channels: int, out_channels: int, count: int, norm_groups: int) -> nn.ModuleList:
    """``count`` blocks; only the first may change the channel count."""
    return nn.ModuleList(
        ResBlock(in_channels if j == 0 else out_channels, out_channels, norm_groups) for j in range(count))


class DownLevel(nn.Module):
    """One encoder level: res-blocks, then a parameter-free 2x2 average pool unless it is the last."""

    def __init__(self, in_channels: int, out_channels: int, res_blocks: int, norm_groups: int,
                 downsample: bool) -> None:
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, res_blocks, norm_groups)
        self.downsample = downsample

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        for res_block in self.block:
            x_BCHW = res_block(x_BCHW)
        if self.downsample:
            x_BCHW = F.avg_pool2d(x_BCHW, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
        return x_BCHW


class UpLevel(nn.Module):
    """One decoder level: res-blocks, then nearest 2x upsampling + 3x3 conv unless it is level 0."""

    def __init__(self, in_channels: int, out_channels: int, res_blocks: int, norm_groups: int,
                 upsample: bool) -> None:
        super().__init__()
        self.block = _res_blocks(in_channels, out_channels, res_blocks, norm_groups)
        self.upsample_conv: Optional[nn.Conv2d] = None
        if upsample:
            self.upsample_conv = nn.Conv2d(out_channels, out_channels, 3, padding=1)

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        for res_block in self.block:
            x_BCHW = res_block(x_BCHW)
        if self.upsample_conv is not None:
            x_BCHW = F.interpolate(x_BCHW, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
            x_BCHW = self.upsample_conv(x_BCHW)
        return x_BCHW


class Encoder(nn.Module):
    """Images (native pixel range) -> continuous latents (B, code_dim, h, w)."""

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        channels = config.level_channels
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.in_channels, config.base_channels, 3, padding=1, bias=False)
        self.down = nn.ModuleList(
            DownLevel(config.base_channels if i == 0 else channels[i - 1], channels[i], config.res_blocks,
                      config.norm_groups, downsample=i < last)
            for i in range(len(channels)))
        self.mid = _res_blocks(channels[-1], channels[-1], config.res_blocks, config.norm_groups)
        self.norm_out = _group_norm(config.norm_groups, channels[-1])
        self.conv_out = nn.Conv2d(channels[-1], config.code_dim, 1)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(images_BCHW)  # (B, base, H, W)
        for level in self.down:
            x = level(x)  # (B, C_i, H_i, W_i), halved after every level but the last
        for res_block in self.mid:
            x = res_block(x)  # (B, C_top, h, w)
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, D, h, w)


class Decoder(nn.Module):
    """Code vectors (B, code_dim, h, w) -> images in the native pixel range (not clamped)."""

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        channels = config.level_channels
        last = len(channels) - 1
        self.conv_in = nn.Conv2d(config.code_dim, channels[-1], 3, padding=1)
        self.mid = _res_blocks(channels[-1], channels[-1], config.res_blocks, config.norm_groups)
        # Indexed by resolution level (0 = full resolution) as in the official keys; run from `last` to 0.
        self.up = nn.ModuleList(
            UpLevel(channels[min(i + 1, last)], channels[i], config.res_blocks, config.norm_groups,
                    upsample=i > 0)
            for i in range(len(channels)))
        self.norm_out = _group_norm(config.norm_groups, channels[0])
        self.conv_out = nn.Conv2d(channels[0], config.in_channels, 3, padding=1)

    def forward(self, codes_BDhw: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(codes_BDhw)  # (B, C_top, h, w)
        for res_block in self.mid:
            x = res_block(x)  # (B, C_top, h, w)
        for level in reversed(self.up):
            x = level(x)  # (B, C_i, H_i, W_i), doubled after every level but 0
        return self.conv_out(F.silu(self.norm_out(x)))  # (B, C, H, W)


class ProxyQuantizer(nn.Module):
    """The proxy's quantizer: every position of a feature map (B, D, h, w) becomes its nearest code.

    No L2 normalisation of latents or codes: MaskGIT's VQGAN quantises raw vectors (unlike the
    tokenizer's ``SpectralTokenQuantizer``, TiTok's), and its codebook was trained that way, so
    normalising would change which code is nearest for the official weights. A class of its own
    because its layout (channels first), its extra consumer (``mix``, TiTok stage 2) and its
    parameter name (``embedding.weight`` under ``quantize``, as in the official checkpoint) differ;
    the nearest-code search and the VQ loss are the shared functions of ``spectralar.models.quantizer``.
    """

    def __init__(self, codebook_size: int, code_dim: int, commitment_weight: float) -> None:
        super().__init__()
        self.commitment_weight = commitment_weight
        self.embedding = nn.Embedding(codebook_size, code_dim)
        # Small uniform init as in taming-transformers / the MaskGIT PyTorch port.
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest_ids(self, latents_BDhw: torch.Tensor) -> torch.Tensor:
        """Id of the nearest code at every position, (B, h, w) int64."""
        batch, dim, height, width = latents_BDhw.shape
        with float32_region(latents_BDhw.device):
            z_ND = latents_BDhw.float().permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
            codebook_VD = self.embedding.weight.float()  # (V, D)
            return nearest_code_ids(z_ND, codebook_VD).view(batch, height, width)  # (B, h, w)

    def lookup(self, ids_Bhw: torch.Tensor) -> torch.Tensor:
        """Code vectors of ``ids``, channels first: (B, D, h, w)."""
        return self.embedding(ids_Bhw).permute(0, 3, 1, 2)  # (B, D, h, w)

    def mix(self, probs_BVhw: torch.Tensor) -> torch.Tensor:
        """Probability-weighted average of the codebook (TiTok stage 2), (B, D, h, w), float32."""
        with float32_region(probs_BVhw.device):
            return torch.einsum("bvhw,vd->bdhw", probs_BVhw.float(), self.embedding.weight.float())

    def forward(self, latents_BDhw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(straight-through quantised latents (B, D, h, w), ids (B, h, w), VQ loss), in float32.

        The VQ loss and straight-through estimator are VQ-VAE's (``straight_through_vq``).
        """
        ids_Bhw = self.nearest_ids(latents_BDhw)  # (B, h, w)
        with float32_region(latents_BDhw.device):
            z_BDhw = latents_BDhw.float()
            quantized_BDhw = self.lookup(ids_Bhw).float()  # (B, D, h, w)
            straight_through_BDhw, vq_loss = straight_through_vq(z_BDhw, quantized_BDhw, self.commitment_weight)
        return straight_through_BDhw, ids_Bhw, vq_loss


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


class ProxyVQModel(nn.Module):
    """MaskGIT-VQGAN-style VQ model; submodule names match the official state dict."""

    def __init__(self, config: ProxyConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.quantize = ProxyQuantizer(config.codebook_size, config.code_dim, config.commitment_weight)
        self.decoder = Decoder(config)

    # ---- pixel range at the boundary ----

    def _to_native(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.config.pixel_range == "zero_one":
            return (images_BCHW + 1.0) * 0.5
        return images_BCHW

    def _from_native(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        if self.config.pixel_range == "zero_one":
            return images_BCHW * 2.0 - 1.0
        return images_BCHW

    # ---- input checks ----

    def _check_images(self, images: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")

    def _check_ids(self, ids: torch.Tensor) -> None:
        grid = self.config.grid_size
        if ids.ndim != 3 or tuple(ids.shape[1:]) != (grid, grid):
            raise ValueError(f"ids must have shape (B, {grid}, {grid}), got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.codebook_size):
            raise ValueError(f"ids must lie in [0, {self.config.codebook_size}), "
                             f"got range [{int(ids.min())}, {int(ids.max())}]")

    def _check_probs(self, probs: torch.Tensor) -> None:
        cfg = self.config
        expected = (cfg.codebook_size, cfg.grid_size, cfg.grid_size)
        if probs.ndim != 4 or tuple(probs.shape[1:]) != expected:
            raise ValueError(f"probs must have shape (B, {expected[0]}, {expected[1]}, {expected[2]}), "
                             f"got {tuple(probs.shape)}")
        if not probs.is_floating_point():
            raise ValueError(f"probs must be a float tensor, got dtype {probs.dtype}")

    def _decode(self, codes_BDhw: torch.Tensor) -> torch.Tensor:
        """Decoder on code vectors (float32 from the quantizer), back on the [-1, 1] scale."""
        codes_BDhw = codes_BDhw.to(self.decoder.conv_in.weight.dtype)  # no-op unless weights were cast
        return self._from_native(self.decoder(codes_BDhw))  # (B, C, H, W)

    # ---- one method per consumer ----

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Training pass: (reconstruction (B, C, H, W) in [-1, 1] scale, ids (B, h, w), VQ loss)."""
        self._check_images(images)
        latents_BDhw = self.encoder(self._to_native(images))  # (B, D, h, w)
        quantized_BDhw, ids_Bhw, vq_loss = self.quantize(latents_BDhw)
        reconstruction_BCHW = self._decode(quantized_BDhw)  # (B, C, H, W)
        return reconstruction_BCHW, ids_Bhw, vq_loss

    @torch.no_grad()
    def encode_ids(self, images: torch.Tensor) -> torch.Tensor:
        """Proxy codes of images in [-1, 1]: (B, h, w) int64 (stage-1 targets)."""
        self._check_images(images)
        latents_BDhw = self.encoder(self._to_native(images))  # (B, D, h, w)
        return self.quantize.nearest_ids(latents_BDhw)  # (B, h, w)

    def codes_to_images(self, ids: torch.Tensor) -> torch.Tensor:
        """Decode hard ids (B, h, w) to images (B, C, H, W) on the [-1, 1] scale, not clamped."""
        self._check_ids(ids)
        return self._decode(self.quantize.lookup(ids.long()))  # (B, C, H, W)

    def probs_to_images(self, probs: torch.Tensor) -> torch.Tensor:
        """TiTok stage 2: decode per-position code probabilities (B, V, h, w) to images (B, C, H, W).

        The codebook is mixed with ``probs`` (expected to sum to 1 over V, e.g. a softmax; not checked)
        and run through the decoder; differentiable w.r.t. ``probs`` and the decoder.
        """
        self._check_probs(probs)
        return self._decode(self.quantize.mix(probs))  # (B, C, H, W)


# --------------------------------------------------------------------------------------------------
# Official checkpoint
# --------------------------------------------------------------------------------------------------


def _unwrap_state_dict(loaded: object, path: Path) -> Mapping[str, torch.Tensor]:
    """Accept a raw state dict or one nested under "state_dict" / "model"."""
    if not isinstance(loaded, Mapping):
        raise ValueError(f"checkpoint {path} holds a {type(loaded).__name__}, not a state dict")
    for wrapper in ("state_dict", "model"):
        if isinstance(loaded.get(wrapper), Mapping):
            return loaded[wrapper]
    return loaded


def _mismatch_report(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                     shown: int = 5) -> list[str]:
    """Human-readable lines for missing keys, unexpected keys and shape mismatches (first few each)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    wrong_shape = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
                   for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    lines = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                         ("shape mismatches", wrong_shape)):
        if items:
            more = f" (+{len(items) - shown} more)" if len(items) > shown else ""
            lines.append(f"{len(items)} {label}: {', '.join(items[:shown])}{more}")
    return lines


def load_maskgit_checkpoint(model: ProxyVQModel, path: str | Path) -> None:
    """Load the official MaskGIT-VQGAN weights into ``model`` (strict: same keys, same shapes).

    Raises FileNotFoundError when ``path`` does not exist, ValueError on any key or shape mismatch.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"proxy checkpoint not found: {path}. Expected the MaskGIT-VQGAN weights "
            f"'{CHECKPOINT_FILE_NAME}' from the MaskGIT/TiTok release; the param `proxy.checkpoint` "
            "points to it (it cannot be downloaded at run time).")
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    state_dict = _unwrap_state_dict(loaded, path)
    problems = _mismatch_report(model.state_dict(), state_dict)
    if problems:
        raise ValueError(f"checkpoint {path} does not match ProxyVQModel({model.config}): "
                         + "; ".join(problems))
    model.load_state_dict(state_dict, strict=True)
    logger.info("loaded proxy VQ checkpoint %s (%d tensors)", path, len(state_dict))
