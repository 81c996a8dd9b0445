"""Nested Spectral Tokenizer (paper §3.2, Algorithm 1): a TiTok-style 1D ViT tokenizer.

    Ŝ = E([P; S0]),  S = Q(Ŝ),  Î'_i = D([M; s_1..s_i])            (paper eq. 3 and eq. 6)

The encoder E reads hw patch tokens P and N learned spectral queries S0 and keeps the last N
outputs; Q is the vector quantizer; the decoder D reads hw mask tokens M and a prefix of the
quantised tokens and predicts, at each of the h×w positions, logits over the proxy codebook
(TiTok's stage-1 "proxy codes"). Every sample of a batch may use its own prefix
length i in one forward pass; the spectral causal mask (masks.py) keeps token s_i blind to s_j,
j > i, in E and D. Differences from TiTok: no cls token; the latent projection is a true
per-token Linear (TiTok's official weights reshape instead of permute, mixing tokens); the
proxy head is LayerNorm + Linear. Attention kernels: :func:`spectralar.models.attention.attention_backends`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn
from torch.nn.attention import sdpa_kernel

from spectralar.models.attention import attention_backends
from spectralar.models.masks import decoder_mask, encoder_mask
from spectralar.models.quantizer import SpectralTokenQuantizer
from spectralar.models.vit import Block


PREPARED_MANIFEST = "the prepared dataset's manifest (prepare: data.resolution, the images' channels)"


@dataclass(frozen=True)
class TokenizerConfig:
    """Architecture of the Nested Spectral Tokenizer. Defaults: a tiny model for 32 px grayscale."""

    # Derived (spectralar.config.DERIVED_FROM): filled in by the stages from their input artefacts.
    image_size: int = field(default=32, metadata={"derived_from": PREPARED_MANIFEST})
    in_channels: int = field(default=1, metadata={"derived_from": PREPARED_MANIFEST})
    patch_size: int = 4
    # The encoder's patch side; None = patch_size. The decoder's mask-token grid stays patch_size
    # (the proxy's code grid with decoder_head: proxy_codes): the encoder may read coarser patches,
    # a shorter sequence, without changing what the decoder predicts. TiTok: one patch size for both.
    encoder_patch_size: Optional[int] = None
    width: int = 128
    encoder_depth: int = 4
    decoder_depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    num_tokens: int = 16
    codebook_size: int = 256
    code_dim: int = 12
    commitment_weight: float = 0.25
    proxy_codebook_size: int = field(default=256, metadata={"derived_from": "the proxy model file (train_proxy)"})
    # Table 4's switches. spectral_supervision: prefix s_1..s_i reconstructs I'_i (off = plain
    # TiTok: all N tokens, full-image target). causal_mask: the spectral causal mask in E and D.
    # nonuniform_mapping: eq. 9's ω schedule generalised (off = uniform ω_i = round(i·H/N)).
    spectral_supervision: bool = True
    causal_mask: bool = True
    nonuniform_mapping: bool = True
    # What the decoder predicts at each of the h×w mask positions. proxy_codes (TiTok, the paper):
    # logits over the proxy codebook; stage 1 = cross-entropy to the proxy codes of I'_i and images
    # come from the proxy decoder. pixels: a linear head to the patch's pixels; stage 1 = L2 to I'_i
    # itself and no proxy at decode time (the small default: a 32 px proxy caps stage 1, README).
    decoder_head: Literal["proxy_codes", "pixels"] = "proxy_codes"
    # Initial patch / mask-token position embeddings: trunc_normal (ViT, std 0.02) or MAE's fixed
    # 2-D sin-cos table (still trained); sincos trains faster on short schedules.
    position_init: Literal["trunc_normal", "sincos"] = "trunc_normal"
    # Project the image decoded from prefix s_1..s_i onto the ω_i×ω_i DCT block, the space its target
    # I'_i lives in (SpectralCodec.decode and train_tokenizer): coarse prefixes need not learn to
    # output zero high frequencies. The identity at i = N (ω_N = H).
    band_limited_output: bool = False

    def __post_init__(self) -> None:
        positive = ("image_size", "in_channels", "patch_size", "width", "encoder_depth",
                    "decoder_depth", "heads", "num_tokens", "codebook_size", "code_dim",
                    "proxy_codebook_size") + (() if self.encoder_patch_size is None else ("encoder_patch_size",))
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TokenizerConfig.{name} must be a positive int, got {value!r}")
        for name in ("patch_size", "encoder_patch_size"):
            value = getattr(self, name)
            if value is not None and self.image_size % value != 0:
                raise ValueError(f"TokenizerConfig.image_size ({self.image_size}) must be divisible "
                                 f"by {name} ({value})")
        if self.width % self.heads != 0:
            raise ValueError(f"TokenizerConfig.width ({self.width}) must be divisible by "
                             f"heads ({self.heads})")
        if not self.mlp_ratio > 0:
            raise ValueError(f"TokenizerConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.decoder_head not in ("proxy_codes", "pixels"):
            raise ValueError(f"TokenizerConfig.decoder_head must be 'proxy_codes' or 'pixels', "
                             f"got {self.decoder_head!r}")
        if self.position_init not in ("trunc_normal", "sincos"):
            raise ValueError(f"TokenizerConfig.position_init must be 'trunc_normal' or 'sincos', "
                             f"got {self.position_init!r}")
        if self.position_init == "sincos" and self.width % 4 != 0:
            raise ValueError(f"TokenizerConfig.width ({self.width}) must be divisible by 4 for "
                             f"position_init 'sincos'")
        if not self.commitment_weight >= 0:
            raise ValueError(f"TokenizerConfig.commitment_weight must be >= 0, "
                             f"got {self.commitment_weight}")

    @property
    def omegas(self) -> tuple[int, ...]:
        """ω_1..ω_N: eq. 9 generalised to any N and H, or the uniform ablation (Table 4)."""
        from spectralar.spectral import frequency_schedule

        return frequency_schedule(self.num_tokens, self.image_size, "nonuniform" if self.nonuniform_mapping else "uniform")

    @classmethod
    def titok_b64(cls) -> TokenizerConfig:
        """TiTok-B64 (its released config): ViT-B encoder/decoder, 256 px, 64 tokens, 4096×12 codebook,
        proxy = MaskGIT-VQGAN codebook of 1024 on a 16×16 grid; with the spectral causal mask."""
        return cls(image_size=256, in_channels=3, patch_size=16, width=768, encoder_depth=12,
                   decoder_depth=12, heads=12, mlp_ratio=4.0, num_tokens=64, codebook_size=4096,
                   code_dim=12, commitment_weight=0.25, proxy_codebook_size=1024,
                   spectral_supervision=True, causal_mask=True, nonuniform_mapping=True)

    @property
    def grid_size(self) -> int:
        """h = w = image_size // patch_size; equals the proxy model's code grid."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """hw, the number of mask tokens M (decoder), and of patch tokens P without an encoder_patch_size."""
        return self.grid_size ** 2

    @property
    def encoder_patch(self) -> int:
        """The encoder's patch side: encoder_patch_size, or patch_size when that is None."""
        return self.patch_size if self.encoder_patch_size is None else self.encoder_patch_size

    @property
    def encoder_grid_size(self) -> int:
        """The encoder's patch grid side, image_size // encoder_patch."""
        return self.image_size // self.encoder_patch

    @property
    def encoder_num_patches(self) -> int:
        """The number of patch tokens P the encoder reads."""
        return self.encoder_grid_size ** 2


def _vit_blocks(config: TokenizerConfig, depth: int) -> nn.ModuleList:
    """Pre-LN ViT blocks as in ViT-B/TiTok: qkv bias, exact GELU, MLP ratio 4."""
    return nn.ModuleList(Block(config.width, config.heads, config.mlp_ratio) for _ in range(depth))


# --------------------------------------------------------------------------------------------
# Encoder E
# --------------------------------------------------------------------------------------------

class SpectralEncoder(nn.Module):
    """E([P; S0]) -> Ŝ (pre-quantisation latents), paper eq. 3."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.patch_projection = nn.Conv2d(config.in_channels, width, config.encoder_patch,
                                          stride=config.encoder_patch)
        self.patch_position_embedding = nn.Parameter(torch.empty(1, config.encoder_num_patches, width))
        # S0: one learned query per token slot; being per-slot it is also the slot's position
        # code, so no separate token position embedding is added here.
        self.spectral_query_tokens = nn.Parameter(torch.empty(config.num_tokens, width))
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = _vit_blocks(config, config.encoder_depth)
        self.norm_post = nn.LayerNorm(width)
        self.latent_projection = nn.Linear(width, config.code_dim)  # per token, no mixing

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> continuous latents Ŝ (B, N, code_dim)."""
        config = self.config
        expected = (config.in_channels, config.image_size, config.image_size)
        if images_BCHW.ndim != 4 or tuple(images_BCHW.shape[1:]) != expected:
            raise ValueError(f"images must have shape (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got {tuple(images_BCHW.shape)}")
        batch = images_BCHW.shape[0]
        patches_BPC = self.patch_projection(images_BCHW).flatten(2).transpose(1, 2)  # (B, P, C)
        patches_BPC = patches_BPC + self.patch_position_embedding  # (B, P, C)
        queries_BNC = self.spectral_query_tokens.expand(batch, -1, -1).to(patches_BPC.dtype)
        x_BLC = self.norm_pre(torch.cat([patches_BPC, queries_BNC], dim=1))  # (B, P+N, C)
        attn_mask = encoder_mask(config.encoder_num_patches, config.num_tokens, config.causal_mask,
                                 device=x_BLC.device)  # (L, L) or None
        with sdpa_kernel(attention_backends(x_BLC.device)):
            for block in self.blocks:
                x_BLC = block(x_BLC, attn_mask=attn_mask)  # (B, P+N, C)
        tokens_BNC = self.norm_post(x_BLC[:, config.encoder_num_patches:])  # (B, N, C)
        return self.latent_projection(tokens_BNC)  # (B, N, D)


# --------------------------------------------------------------------------------------------
# Decoder D
# --------------------------------------------------------------------------------------------

class SpectralDecoder(nn.Module):
    """D([M; s_1..s_i]) -> proxy-code logits at the h×w mask positions, paper eq. 6."""

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.code_projection = nn.Linear(config.code_dim, width)
        self.token_position_embedding = nn.Parameter(torch.empty(1, config.num_tokens, width))
        self.mask_token = nn.Parameter(torch.empty(1, 1, width))
        self.mask_position_embedding = nn.Parameter(torch.empty(1, config.num_patches, width))
        self.norm_pre = nn.LayerNorm(width)
        self.blocks = _vit_blocks(config, config.decoder_depth)
        self.norm_post = nn.LayerNorm(width)
        if config.decoder_head == "pixels":
            self.pixel_head = nn.Linear(width, config.patch_size ** 2 * config.in_channels)
        else:
            self.proxy_head = nn.Linear(width, config.proxy_codebook_size)

    def hidden_states(
        self, codes_BnD: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Last-block outputs (B, P + n, C) of [M; S'] with n = codes_BnD.shape[1] token slots.

        Slot j of sample b is used only if j < prefix_lengths[b] (default: all n slots).
        """
        config = self.config
        if codes_BnD.ndim != 3 or codes_BnD.shape[-1] != config.code_dim:
            raise ValueError(f"codes must have shape (B, n, {config.code_dim}), "
                             f"got {tuple(codes_BnD.shape)}")
        batch, num_slots = codes_BnD.shape[:2]
        if num_slots > config.num_tokens:
            raise ValueError(f"codes has {num_slots} token slots, more than num_tokens="
                             f"{config.num_tokens}")
        attn_mask = self._attention_mask(batch, num_slots, prefix_lengths, codes_BnD.device)
        codes_BnD = codes_BnD.to(self.code_projection.weight.dtype)
        slots_BnC = self.code_projection(codes_BnD) + self.token_position_embedding[:, :num_slots]
        masks_BPC = (self.mask_token + self.mask_position_embedding).expand(batch, -1, -1)
        x_BLC = self.norm_pre(torch.cat([masks_BPC.to(slots_BnC.dtype), slots_BnC], dim=1))
        with sdpa_kernel(attention_backends(x_BLC.device)):
            for block in self.blocks:
                x_BLC = block(x_BLC, attn_mask=attn_mask)  # (B, P+n, C)
        return x_BLC

    def forward(
        self, codes_BnD: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Quantised codes (B, n, D) -> logits (B, V_proxy, h, w) read at the mask positions, or
        with ``decoder_head: pixels`` images (B, C, H, W) in the [-1, 1] range (not clamped)."""
        config = self.config
        x_BLC = self.hidden_states(codes_BnD, prefix_lengths)
        masks_BPC = self.norm_post(x_BLC[:, :config.num_patches])  # (B, P, C)
        grid = config.grid_size
        if config.decoder_head == "pixels":
            patch, channels = config.patch_size, config.in_channels
            pixels_BPp = self.pixel_head(masks_BPC)  # (B, P, p*p*C), per patch (p, p, C) row-major
            pixels = pixels_BPp.reshape(-1, grid, grid, patch, patch, channels)  # (B, h, w, p, p, C)
            pixels = pixels.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
            return pixels.reshape(-1, channels, grid * patch, grid * patch)  # (B, C, H, W)
        logits_BPV = self.proxy_head(masks_BPC)  # (B, P, V)
        return logits_BPV.transpose(1, 2).reshape(x_BLC.shape[0], -1, grid, grid)  # (B, V, h, w)

    def _attention_mask(
        self, batch: int, num_slots: int, prefix_lengths: Optional[torch.Tensor],
        device: torch.device,
    ) -> Optional[torch.Tensor]:
        """(B, 1, L, L) decoder mask, or None (SDPA fast path) if nothing needs masking."""
        causal = self.config.causal_mask
        if prefix_lengths is None:
            if not causal:
                return None  # all slots used, bidirectional: fast path
            prefix_lengths = torch.full((batch,), num_slots, dtype=torch.long, device=device)
        elif prefix_lengths.shape != (batch,):
            raise ValueError(f"prefix_lengths must have shape ({batch},), "
                             f"got {tuple(prefix_lengths.shape)}")
        prefix_lengths = prefix_lengths.to(device)
        mask_B1LL = decoder_mask(self.config.num_patches, num_slots, prefix_lengths, causal)
        if (not causal and not torch.compiler.is_compiling() and prefix_lengths.device.type == "cpu"
                and bool((prefix_lengths == num_slots).all())):  # host sync only where it is free
            return None  # every prefix full and bidirectional: same result without a mask
        return mask_B1LL


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def sincos_2d_table(grid: int, width: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table (grid*grid, width), rows in raster order.

    The first half of the channels encodes the row y, the second half the column x, each as
    [sin(pos·f_k), cos(pos·f_k)] with f_k = 10000^(-k/(width/4)), k < width/4.
    """
    if width % 4 != 0:
        raise ValueError(f"width must be divisible by 4, got {width}")
    quarter = width // 4
    frequencies_K = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (K,)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")
    parts = []
    for position_P in (rows.flatten(), cols.flatten()):
        angle_PK = position_P[:, None] * frequencies_K[None]  # (P, K)
        parts += [angle_PK.sin(), angle_PK.cos()]
    return torch.cat(parts, dim=1).float()  # (P, width)


class NestedSpectralTokenizer(nn.Module):
    """Images -> N ordered spectral token ids; any prefix of them -> proxy-code logits.

    Parameter names: learned tokens and embeddings (and the codebook) contain "token" or
    "embed" in their names, weight matrices (patch_projection, code_projection, ...) do not,
    so a name-based optimizer grouping can exempt exactly the former from weight decay (TiTok).
    """

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = SpectralEncoder(config)
        self.quantizer = SpectralTokenQuantizer(config.codebook_size, config.code_dim,
                                                commitment_weight=config.commitment_weight,
                                                normalize=True)
        self.decoder = SpectralDecoder(config)
        self._init_weights()

    def _init_weights(self) -> None:
        """ViT init (trunc-normal 0.02) for matrices and position embeddings; learned tokens
        width**-0.5 · randn as in TiTok; LayerNorm (1, 0). The quantizer keeps its own init."""
        for module in (self.encoder, self.decoder):
            for submodule in module.modules():
                if isinstance(submodule, (nn.Linear, nn.Conv2d)):
                    nn.init.trunc_normal_(submodule.weight, std=0.02)
                    if submodule.bias is not None:
                        nn.init.zeros_(submodule.bias)
                elif isinstance(submodule, nn.LayerNorm):
                    nn.init.ones_(submodule.weight)
                    nn.init.zeros_(submodule.bias)
        for embedding in (self.encoder.patch_position_embedding,
                          self.decoder.token_position_embedding,
                          self.decoder.mask_position_embedding):
            nn.init.trunc_normal_(embedding, std=0.02)
        if self.config.position_init == "sincos":
            config = self.config
            with torch.no_grad():
                self.encoder.patch_position_embedding.copy_(
                    sincos_2d_table(config.encoder_grid_size, config.width)[None])
                self.decoder.mask_position_embedding.copy_(sincos_2d_table(config.grid_size, config.width)[None])
        token_scale = self.config.width ** -0.5
        with torch.no_grad():
            for token in (self.encoder.spectral_query_tokens, self.decoder.mask_token):
                token.copy_(token_scale * torch.randn_like(token))

    def encode_latents(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Continuous pre-quantisation latents Ŝ = E([P; S0]), shape (B, N, code_dim)."""
        return self.encoder(images_BCHW)

    def encode(self, images_BCHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images -> (z_q (B, N, D), ids (B, N), vq_loss scalar)."""
        return self.quantizer(self.encoder(images_BCHW))

    def encode_ids(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        """Images -> spectral token ids (B, N), the generator's ground-truth sequence."""
        return self.encode(images_BCHW)[1]

    def decode(
        self, codes_BnD: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Codes (B, n ≤ N, D) -> logits (B, V_proxy, h, w).

        Sample b decodes from s_1..s_{prefix_lengths[b]} (default: all n), all samples in one
        batched pass through the decoder mask. Passing only the first i codes (n = i) is the
        same as passing all N with prefix i, just cheaper.
        """
        return self.decoder(codes_BnD, prefix_lengths)

    def decode_ids(
        self, ids_Bn: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Token ids (B, n ≤ N) -> logits (B, V_proxy, h, w); n ids mean prefix n by default."""
        if ids_Bn.ndim != 2:
            raise ValueError(f"ids must have shape (B, n), got {tuple(ids_Bn.shape)}")
        return self.decode(self.quantizer.ids_to_codes(ids_Bn), prefix_lengths)

    def forward(
        self, images_BCHW: torch.Tensor, prefix_lengths: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Algorithm 1, lines 3-5: encode, quantise, decode each sample from its own prefix.

        Returns:
            logits (B, V_proxy, h, w), ids (B, N), vq_loss (scalar).
        """
        z_q_BND, ids_BN, vq_loss = self.encode(images_BCHW)
        return self.decode(z_q_BND, prefix_lengths), ids_BN, vq_loss
