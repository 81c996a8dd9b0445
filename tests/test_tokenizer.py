"""Tests for the Nested Spectral Tokenizer: masks, quantizer, causality, nested prefixes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from spectralar.models.masks import decoder_mask, encoder_mask
from spectralar.models.quantizer import SpectralTokenQuantizer
from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig
from spectralar.training import DeadCodeRestarts

TINY = TokenizerConfig(image_size=8, in_channels=1, patch_size=2, width=32, encoder_depth=2,
                       decoder_depth=2, heads=2, mlp_ratio=2.0, num_tokens=5, codebook_size=32,
                       code_dim=8, proxy_codebook_size=16, causal_mask=True)


pytestmark = pytest.mark.usefixtures("single_thread")


def make_model(causal: bool = True, seed: int = 0) -> NestedSpectralTokenizer:
    torch.manual_seed(seed)
    return NestedSpectralTokenizer(dataclasses.replace(TINY, causal_mask=causal)).eval()


@torch.no_grad()
def make_scrambled_model(causal: bool = True, seed: int = 0) -> NestedSpectralTokenizer:
    """Random O(1)-scale weights: ViT's small init (std 0.02) makes every cross-token signal,
    a leak included, tiny; with unit-gain weights a leak shows up as an O(0.1) change."""
    return scramble(make_model(causal, seed))


@torch.no_grad()
def scramble(model: NestedSpectralTokenizer) -> NestedSpectralTokenizer:
    """Replace every weight of the encoder and decoder with a random O(1)-scale one, in place."""
    for module in (model.encoder, model.decoder):
        for submodule in module.modules():
            if isinstance(submodule, (torch.nn.Linear, torch.nn.Conv2d)):
                fan_in = submodule.weight[0].numel()
                submodule.weight.normal_(0.0, fan_in ** -0.5)
                submodule.bias.normal_(0.0, 0.1)
            elif isinstance(submodule, torch.nn.LayerNorm):
                submodule.weight.normal_(1.0, 0.2)
                submodule.bias.normal_(0.0, 0.1)
        for name, parameter in module.named_parameters(recurse=False):
            parameter.normal_(0.0, 1.0)  # learned tokens and position embeddings
    return model


def random_images(batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TINY.in_channels, TINY.image_size, TINY.image_size,
                       generator=generator)


def random_codes(batch: int, num_slots: int, seed: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(batch, num_slots, TINY.code_dim, generator=generator), dim=-1)


# --------------------------------------------------------------------------------------------
# Mask tables (3 patches, 4 tokens), written out literally
# --------------------------------------------------------------------------------------------

def test_encoder_mask_causal_table() -> None:
    expected = torch.tensor([
        # p0 p1 p2 s1 s2 s3 s4
        [1, 1, 1, 0, 0, 0, 0],  # p0
        [1, 1, 1, 0, 0, 0, 0],  # p1
        [1, 1, 1, 0, 0, 0, 0],  # p2
        [1, 1, 1, 1, 0, 0, 0],  # s1
        [1, 1, 1, 1, 1, 0, 0],  # s2
        [1, 1, 1, 1, 1, 1, 0],  # s3
        [1, 1, 1, 1, 1, 1, 1],  # s4
    ], dtype=torch.bool)
    assert torch.equal(encoder_mask(3, 4, causal=True), expected)


def test_encoder_mask_bidirectional_is_none() -> None:
    assert encoder_mask(3, 4, causal=False) is None


def test_decoder_mask_causal_table() -> None:
    expected = torch.tensor([
        [  # prefix 2: slots s3, s4 are padding
            # m0 m1 m2 s1 s2 s3 s4
            [1, 1, 1, 1, 1, 0, 0],  # m0
            [1, 1, 1, 1, 1, 0, 0],  # m1
            [1, 1, 1, 1, 1, 0, 0],  # m2
            [0, 0, 0, 1, 0, 0, 0],  # s1
            [0, 0, 0, 1, 1, 0, 0],  # s2
            [0, 0, 0, 0, 0, 1, 0],  # s3 (padding: itself only)
            [0, 0, 0, 0, 0, 0, 1],  # s4 (padding: itself only)
        ],
        [  # prefix 4
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [1, 1, 1, 1, 1, 1, 1],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 0, 0],
            [0, 0, 0, 1, 1, 1, 0],
            [0, 0, 0, 1, 1, 1, 1],
        ],
    ], dtype=torch.bool)[:, None]
    mask = decoder_mask(3, 4, torch.tensor([2, 4]), causal=True)
    assert mask.shape == (2, 1, 7, 7)
    assert torch.equal(mask, expected)


def test_decoder_mask_bidirectional_table() -> None:
    expected = torch.tensor([
        [  # prefix 2
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 0],
            [0, 0, 0, 0, 0, 0, 1],
        ],
        [[1] * 7] * 7,  # prefix 4: everything
    ], dtype=torch.bool)[:, None]
    assert torch.equal(decoder_mask(3, 4, torch.tensor([2, 4]), causal=False), expected)


@pytest.mark.parametrize("prefix", [[-1, 2], [2, 5]])
def test_decoder_mask_rejects_bad_prefix(prefix: list[int]) -> None:
    with pytest.raises(ValueError, match="prefix_lengths"):
        decoder_mask(3, 4, torch.tensor(prefix), causal=True)


# --------------------------------------------------------------------------------------------
# Spectral causality as properties
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def _latents_after_query_change(model: NestedSpectralTokenizer, j: int) -> tuple[torch.Tensor, ...]:
    images = random_images(3)
    before_BND = model.encode_latents(images)
    model.encoder.spectral_query_tokens[j] += torch.randn(TINY.width)
    return before_BND, model.encode_latents(images)


@pytest.mark.parametrize("j", range(TINY.num_tokens))
def test_encoder_later_query_never_changes_earlier_latents(j: int) -> None:
    before_BND, after_BND = _latents_after_query_change(make_scrambled_model(causal=True), j)
    torch.testing.assert_close(after_BND[:, :j], before_BND[:, :j], atol=1e-6, rtol=0)
    assert (after_BND[:, j] - before_BND[:, j]).abs().max() > 1e-4  # token j itself changes


def test_encoder_without_causal_mask_leaks_backwards() -> None:
    before_BND, after_BND = _latents_after_query_change(make_scrambled_model(causal=False),
                                                         TINY.num_tokens - 1)
    assert (after_BND[:, 0] - before_BND[:, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("j", range(TINY.num_tokens))
@torch.no_grad()
def test_decoder_logits_ignore_codes_beyond_prefix(causal: bool, j: int) -> None:
    model = make_scrambled_model(causal)
    num_tokens = TINY.num_tokens
    prefix_lengths = torch.arange(num_tokens + 1)  # one sample per prefix 0..N
    codes_BND = random_codes(1, num_tokens).expand(num_tokens + 1, -1, -1).clone()
    before_BVhw = model.decode(codes_BND, prefix_lengths)
    codes_BND[:, j] = random_codes(num_tokens + 1, 1, seed=7)[:, 0]
    after_BVhw = model.decode(codes_BND, prefix_lengths)
    unaffected = prefix_lengths <= j  # prefixes s_1..s_i with i <= j never contain code j
    torch.testing.assert_close(after_BVhw[unaffected], before_BVhw[unaffected], atol=1e-6, rtol=0)
    difference_B = (after_BVhw[~unaffected] - before_BVhw[~unaffected]).flatten(1).abs().amax(1)
    assert (difference_B > 1e-5).all()


@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_decoder_token_states_causal_only_with_mask(causal: bool) -> None:
    model = make_scrambled_model(causal)
    codes_BND = random_codes(2, TINY.num_tokens)
    before_BLC = model.decoder.hidden_states(codes_BND)
    codes_BND[:, -1] = -codes_BND[:, -1]
    after_BLC = model.decoder.hidden_states(codes_BND)
    earlier_slots = slice(TINY.num_patches, TINY.num_patches + TINY.num_tokens - 1)
    slot_change = (after_BLC[:, earlier_slots] - before_BLC[:, earlier_slots]).abs().max()
    if causal:
        assert slot_change <= 1e-6
    else:
        assert slot_change > 1e-4


# --------------------------------------------------------------------------------------------
# Batched nested prefixes
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
@torch.no_grad()
def test_mixed_prefix_batch_equals_each_sample_alone(causal: bool) -> None:
    model = make_scrambled_model(causal)
    prefixes = [1, 3, TINY.num_tokens, 0, 2]
    codes_BND = random_codes(len(prefixes), TINY.num_tokens)
    batched_BVhw = model.decode(codes_BND, torch.tensor(prefixes))
    for b, prefix in enumerate(prefixes):
        alone_1Vhw = model.decode(codes_BND[b:b + 1, :prefix])  # exactly `prefix` slots, no mask
        torch.testing.assert_close(batched_BVhw[b:b + 1], alone_1Vhw, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_decode_ids_short_sequence_equals_prefix() -> None:
    model = make_scrambled_model(causal=True)
    generator = torch.Generator().manual_seed(3)
    ids_BN = torch.randint(TINY.codebook_size, (2, TINY.num_tokens), generator=generator)
    short = 3
    from_short_BVhw = model.decode_ids(ids_BN[:, :short])
    codes_BND = model.quantizer.ids_to_codes(ids_BN)
    from_prefix_BVhw = model.decode(codes_BND, torch.full((2,), short))
    torch.testing.assert_close(from_short_BVhw, from_prefix_BVhw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.decode_ids(ids_BN, torch.full((2,), short)),
                               from_prefix_BVhw, atol=1e-6, rtol=0)


def test_fast_path_only_when_bidirectional_and_full() -> None:
    full = torch.full((2,), TINY.num_tokens)
    bidirectional = make_model(causal=False).decoder
    assert bidirectional._attention_mask(2, TINY.num_tokens, None, torch.device("cpu")) is None
    assert bidirectional._attention_mask(2, TINY.num_tokens, full, torch.device("cpu")) is None
    assert bidirectional._attention_mask(2, TINY.num_tokens, full - 1, torch.device("cpu")) \
        is not None
    causal = make_model(causal=True).decoder
    assert causal._attention_mask(2, TINY.num_tokens, None, torch.device("cpu")) is not None


@torch.no_grad()
def test_forward_shapes_and_determinism() -> None:
    images = random_images(3)
    prefixes = torch.tensor([1, 2, TINY.num_tokens])
    logits, ids, vq_loss = make_model(seed=5)(images, prefixes)
    grid = TINY.grid_size
    assert logits.shape == (3, TINY.proxy_codebook_size, grid, grid)
    assert ids.shape == (3, TINY.num_tokens) and ids.dtype == torch.long
    assert vq_loss.ndim == 0
    logits_again, ids_again, _ = make_model(seed=5)(images, prefixes)
    assert torch.equal(logits, logits_again) and torch.equal(ids, ids_again)
    assert torch.equal(make_model(seed=5).encode_ids(images), ids)


def test_forward_under_bfloat16_autocast() -> None:
    model = make_model().train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, ids, vq_loss = model(random_images(3), torch.tensor([0, 2, TINY.num_tokens]))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert vq_loss.dtype == torch.float32  # quantisation stays in float32
    (logits.float().mean() + vq_loss).backward()
    assert torch.isfinite(model.encoder.patch_projection.weight.grad).all()


def test_decode_rejects_bad_input() -> None:
    model = make_model()
    codes_BND = random_codes(2, 3)
    with pytest.raises(ValueError, match="prefix_lengths"):
        model.decode(codes_BND, torch.tensor([1, 4]))  # prefix longer than the codes given
    with pytest.raises(ValueError, match="prefix_lengths"):
        model.decode(codes_BND, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="codes"):
        model.decode(random_codes(2, TINY.num_tokens + 1))
    with pytest.raises(ValueError, match="images"):
        model.encode(torch.zeros(1, 3, TINY.image_size, TINY.image_size))
    with pytest.raises(ValueError, match="ids"):
        model.decode_ids(torch.tensor([[TINY.codebook_size]]))


# --------------------------------------------------------------------------------------------
# Vector quantizer
# --------------------------------------------------------------------------------------------

def test_quantizer_matches_bruteforce_reference() -> None:
    torch.manual_seed(0)
    quantizer = SpectralTokenQuantizer(codebook_size=10, code_dim=4, commitment_weight=0.25)
    z_BND = torch.randn(3, 5, 4)
    z_q_BND, ids_BN, loss = quantizer(z_BND)
    # Independent reference in numpy: normalise, nearest by explicit pairwise distances.
    z = z_BND.numpy().reshape(-1, 4)
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    codebook = quantizer.embedding.weight.detach().numpy()
    codebook = codebook / np.linalg.norm(codebook, axis=1, keepdims=True)
    distances = ((z[:, None, :] - codebook[None, :, :]) ** 2).sum(-1)
    expected_ids = distances.argmin(1)
    np.testing.assert_array_equal(ids_BN.numpy().reshape(-1), expected_ids)
    expected_mse = ((codebook[expected_ids] - z) ** 2).mean()
    assert loss.item() == pytest.approx(1.25 * expected_mse, rel=1e-5)
    np.testing.assert_allclose(z_q_BND.detach().numpy().reshape(-1, 4),
                               codebook[expected_ids], atol=1e-6)


def test_quantizer_codes_ids_and_loss_properties() -> None:
    torch.manual_seed(0)
    quantizer = SpectralTokenQuantizer(codebook_size=16, code_dim=6)
    z_q_BND, ids_BN, loss = quantizer(torch.randn(4, 7, 6) * 3)
    assert ids_BN.min() >= 0 and ids_BN.max() < 16
    assert loss.item() >= 0 and loss.dtype == torch.float32
    torch.testing.assert_close(z_q_BND.norm(dim=-1), torch.ones(4, 7))
    codes = quantizer.ids_to_codes(torch.arange(16))
    torch.testing.assert_close(codes.norm(dim=-1), torch.ones(16))
    torch.testing.assert_close(quantizer.ids_to_codes(ids_BN), z_q_BND.detach())


def test_quantizer_runs_in_float32_under_autocast() -> None:
    torch.manual_seed(0)
    quantizer = SpectralTokenQuantizer(codebook_size=64, code_dim=8)
    z_BND = torch.randn(2, 9, 8)
    _, reference_ids, _ = quantizer(z_BND)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_q_BND, ids_BN, loss = quantizer(z_BND)
    assert loss.dtype == torch.float32 and z_q_BND.dtype == torch.float32
    assert torch.equal(ids_BN, reference_ids)


def test_straight_through_gradient_reaches_encoder_and_codebook() -> None:
    model = make_model().train()
    images = random_images(2)
    logits, _, vq_loss = model(images, torch.tensor([2, TINY.num_tokens]))
    target = torch.randint(TINY.proxy_codebook_size, logits.shape[:1] + logits.shape[2:])
    (F.cross_entropy(logits, target) + vq_loss).backward()
    for parameter in (model.encoder.patch_projection.weight, model.encoder.spectral_query_tokens,
                      model.encoder.latent_projection.weight, model.quantizer.embedding.weight):
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all()
        assert parameter.grad.abs().max() > 0


def test_straight_through_passes_reconstruction_gradient_alone() -> None:
    # Without the VQ loss, only the straight-through path can carry gradient into the encoder.
    model = make_model().train()
    logits, _, _ = model(random_images(2))
    logits.square().mean().backward()
    assert model.encoder.latent_projection.weight.grad.abs().max() > 0
    assert model.quantizer.embedding.weight.grad is None


@pytest.mark.parametrize("normalized", [True, False])
def test_dead_code_restarts_reseed_only_dead_codes_from_latents(normalized: bool) -> None:
    torch.manual_seed(0)
    quantizer = SpectralTokenQuantizer(codebook_size=16, code_dim=4, normalize=normalized)
    weight = quantizer.embedding.weight
    latents_MD = torch.randn(32, 4)  # encoder outputs of "this batch"
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-2)
    quantizer(latents_MD[None])[2].backward()
    optimizer.step()  # Adam moments exist for the used rows
    live = torch.tensor([0, 3, 5])
    restarts = DeadCodeRestarts(16, every=2, seed=7)
    restarts.observe(live.repeat(4, 1))  # ids of two steps: only codes 0, 3, 5 were used
    restarts.observe(live)
    assert not restarts.due(0) and restarts.due(1)
    dead = torch.ones(16, dtype=torch.bool)
    dead[live] = False
    before = weight.detach().clone()
    moments = {key: optimizer.state[weight][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    shadow = before + 1.0  # an EMA copy that differs from the live weights

    assert restarts.restart(1, weight, latents_MD, optimizer=optimizer, ema_shadow=shadow,
                            normalized=normalized) == 13
    after = weight.detach()
    # live codes, their Adam moments and their EMA rows are untouched
    assert torch.equal(after[live], before[live]) and torch.equal(shadow[live], before[live] + 1.0)
    for key, value in moments.items():
        assert torch.equal(optimizer.state[weight][key][live], value[live])
        assert optimizer.state[weight][key][dead].abs().max() == 0
    # every dead code now sits on (the direction of) an encoder output, in the model and its EMA
    assert torch.equal(shadow[dead], after[dead])
    if normalized:
        cosine_CM = F.normalize(after[dead], dim=-1) @ F.normalize(latents_MD, dim=-1).t()
        assert torch.allclose(cosine_CM.max(dim=1).values, torch.ones(13), atol=1e-6)
        live_norm = before[live].norm(dim=-1).mean()
        assert torch.allclose(after[dead].norm(dim=-1), live_norm.expand(13), rtol=1e-5)
    else:
        distance_CM = torch.cdist(after[dead], latents_MD)
        assert distance_CM.min(dim=1).values.max() < 1e-6
    # so the latents they were seeded from now quantise to them exactly
    seeded_M = (F.normalize(latents_MD, dim=-1) @ F.normalize(after[dead], dim=-1).t()
                if normalized else -torch.cdist(latents_MD, after[dead])).max(dim=1).values
    seeded_M = seeded_M > (1 - 1e-6 if normalized else -1e-6)
    ids = quantizer(latents_MD[None])[1][0]
    assert dead[ids[seeded_M]].all()
    assert restarts.counts.sum() == 0 and restarts.restarted == 13
    # deterministic in (seed, step), and the counts survive a checkpoint round trip
    again = DeadCodeRestarts(16, every=2, seed=7)
    again.observe(live)
    other = before.clone()
    again.restart(1, other, latents_MD, normalized=normalized)
    assert torch.equal(other, after)
    resumed = DeadCodeRestarts(16, every=2, seed=7)
    restarts.observe(torch.tensor([1, 1, 2]))
    resumed.load_state_dict(restarts.state_dict())
    assert torch.equal(resumed.counts, restarts.counts) and resumed.restarted == 13


def test_dead_code_restarts_off_and_nothing_dead() -> None:
    off = DeadCodeRestarts(8, every=0, seed=0)
    off.observe(torch.tensor([1, 2]))
    assert not off.enabled and not any(off.due(step) for step in range(10)) and off.counts.sum() == 0
    weight = torch.randn(4, 3)
    before = weight.clone()
    restarts = DeadCodeRestarts(4, every=1, seed=0)
    restarts.observe(torch.arange(4))
    assert restarts.restart(0, weight, torch.randn(5, 3), normalized=True) == 0
    assert torch.equal(weight, before)
    with pytest.raises(ValueError, match="every"):
        DeadCodeRestarts(4, every=-1, seed=0)


def test_dead_code_restarts_stop_after_until() -> None:
    # every 50 steps up to step 120 (1-based): windows ending at steps 50 and 100 restart, none later
    restarts = DeadCodeRestarts(8, every=50, seed=0, until=120)
    assert [step + 1 for step in range(400) if restarts.due(step)] == [50, 100]
    # the last window may end exactly at until; 0 keeps restarting to the end
    assert DeadCodeRestarts(8, every=50, seed=0, until=100).due(99)
    forever = DeadCodeRestarts(8, every=50, seed=0, until=0)
    assert [step + 1 for step in range(400) if forever.due(step)] == list(range(50, 401, 50))
    with pytest.raises(ValueError, match="until"):
        DeadCodeRestarts(4, every=1, seed=0, until=-1)


# --------------------------------------------------------------------------------------------
# Config and TiTok-B64 size
# --------------------------------------------------------------------------------------------

def test_config_validation() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        TokenizerConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="heads"):
        TokenizerConfig(width=130, heads=4)
    with pytest.raises(ValueError, match="num_tokens"):
        TokenizerConfig(num_tokens=0)
    config = TokenizerConfig.titok_b64()
    assert (config.grid_size, config.num_patches) == (16, 256)


def _titok_b64_parameter_count(c: TokenizerConfig) -> int:
    """Count from the architecture: pre-LN ViT block = LN + qkv + proj + LN + 2-layer MLP."""
    w, hidden = c.width, int(c.width * c.mlp_ratio)
    block = 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * w + (w * hidden + hidden) + (hidden * w + w)
    layer_norm = 2 * w
    encoder = (c.in_channels * c.patch_size ** 2 * w + w  # patch conv
               + c.num_patches * w + c.num_tokens * w  # patch positions, S0
               + 2 * layer_norm + c.encoder_depth * block
               + w * c.code_dim + c.code_dim)  # per-token latent projection
    quantizer = c.codebook_size * c.code_dim
    decoder = (c.code_dim * w + w + c.num_tokens * w  # code projection, slot positions
               + w + c.num_patches * w  # mask token, mask positions
               + 2 * layer_norm + c.decoder_depth * block
               + w * c.proxy_codebook_size + c.proxy_codebook_size)  # proxy head
    return encoder + quantizer + decoder


def test_titok_b64_parameter_count() -> None:
    config = TokenizerConfig.titok_b64()
    with torch.device("meta"):
        model = NestedSpectralTokenizer(config)
    total = sum(p.numel() for p in model.parameters())
    expected = _titok_b64_parameter_count(config)
    # 2 × 12 ViT-B blocks of 7,087,872 = 170,108,928, plus embeddings and heads: 172,053,772.
    assert expected == 172_053_772
    assert total == expected
    blocks = sum(p.numel() for n, p in model.named_parameters() if ".blocks." in n)
    assert blocks == 2 * 12 * 7_087_872


# --------------------------------------------------------------------------------------------
# Tiny overfit
# --------------------------------------------------------------------------------------------

def _overfit(model: torch.nn.Module, step_loss, steps: int, lr: float) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss, logged = step_loss()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(logged)
    return losses


def test_tiny_overfit_on_random_proxy_codes() -> None:
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(TINY).train()
    images = random_images(4)
    grid = TINY.grid_size
    targets = torch.randint(TINY.proxy_codebook_size, (4, grid, grid),
                            generator=torch.Generator().manual_seed(4))

    def step_loss() -> tuple[torch.Tensor, float]:
        logits, _, vq_loss = model(images)
        cross_entropy = F.cross_entropy(logits, targets)
        return cross_entropy + vq_loss, cross_entropy.item()

    losses = _overfit(model, step_loss, steps=60, lr=1e-2)
    assert losses[0] > 0.8 * np.log(TINY.proxy_codebook_size)  # starts near chance
    # Over 4 seeds (model, images, targets) this ends at 0.38-0.46 of the start. At init all 4 images map to the same ids (the
    # learned queries dominate ViT's small-init residual stream), so most of this drop is the
    # decoder learning per-position targets; the next test checks it uses the tokens.
    assert losses[-1] < 0.6 * losses[0]


def test_decoder_uses_tokens_beyond_position_marginals() -> None:
    # Each of 4 id sequences must map to its own constant target map; ignoring the tokens,
    # the best cross-entropy is ln 4 (one target per image at every position).
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(TINY).train()
    ids_BN = torch.randint(TINY.codebook_size, (4, TINY.num_tokens),
                           generator=torch.Generator().manual_seed(5))
    targets = torch.arange(4)[:, None, None].expand(4, TINY.grid_size, TINY.grid_size)

    def step_loss() -> tuple[torch.Tensor, float]:
        cross_entropy = F.cross_entropy(model.decode_ids(ids_BN), targets)
        return cross_entropy, cross_entropy.item()

    losses = _overfit(model.decoder, step_loss, steps=40, lr=1e-2)
    assert losses[-1] < 0.1 * np.log(4)  # ends at 0.004-0.007 over 4 seeds


# --------------------------------------------------------------------------------------------
# Pixel head (decoder_head: pixels) and sin-cos position init
# --------------------------------------------------------------------------------------------

PIXEL = dataclasses.replace(TINY, decoder_head="pixels")


@torch.no_grad()
def test_pixel_head_output_shape_and_patch_layout() -> None:
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(PIXEL).eval()
    assert not hasattr(model.decoder, "proxy_head")
    images, _, _ = model(random_images(2), torch.tensor([1, PIXEL.num_tokens]))
    assert images.shape == (2, PIXEL.in_channels, PIXEL.image_size, PIXEL.image_size)
    # the head's output k of mask token (r, c) lands at pixel (r*p + k // p, c*p + k % p)
    head = model.decoder.pixel_head
    head.weight.zero_()
    head.bias.copy_(torch.arange(PIXEL.patch_size ** 2, dtype=torch.float))
    images = model.decode(random_codes(1, PIXEL.num_tokens))
    p = PIXEL.patch_size
    expected = torch.arange(p * p, dtype=torch.float).reshape(p, p).repeat(PIXEL.grid_size, PIXEL.grid_size)
    torch.testing.assert_close(images[0, 0], expected)


@pytest.mark.parametrize("j", range(TINY.num_tokens))
@torch.no_grad()
def test_pixel_head_ignores_codes_beyond_prefix(j: int) -> None:
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(PIXEL).eval()
    prefix_lengths = torch.arange(PIXEL.num_tokens + 1)
    codes_BND = random_codes(1, PIXEL.num_tokens).expand(PIXEL.num_tokens + 1, -1, -1).clone()
    before = model.decode(codes_BND, prefix_lengths)
    codes_BND[:, j] = random_codes(PIXEL.num_tokens + 1, 1, seed=7)[:, 0]
    after = model.decode(codes_BND, prefix_lengths)
    unaffected = prefix_lengths <= j
    torch.testing.assert_close(after[unaffected], before[unaffected], atol=1e-6, rtol=0)


def test_pixel_head_regresses_a_band_limited_target() -> None:
    """A few dozen Adam steps on one image pair bring the pixel head's L2 well below the start."""
    from spectralar.spectral import band_limit

    torch.manual_seed(0)
    model = NestedSpectralTokenizer(PIXEL)
    images = random_images(2).clamp(-1, 1)
    target = band_limit(images, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        output, _, vq_loss = model(images, torch.tensor([2, 2]))
        loss = F.mse_loss(output, target)
        optimizer.zero_grad()
        (loss + vq_loss).backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.2 * losses[0]


def test_sincos_position_init() -> None:
    from spectralar.models.tokenizer import sincos_2d_table

    table = sincos_2d_table(4, 8)  # (16, 8): [sin y, cos y, sin x, cos x] with 2 frequencies each
    assert table.shape == (16, 8)
    rows, cols = torch.arange(16) // 4, torch.arange(16) % 4
    torch.testing.assert_close(table[:, 0], rows.float().sin())
    torch.testing.assert_close(table[:, 1], (rows * 0.01).float().sin())
    torch.testing.assert_close(table[:, 6], cols.float().cos())
    model = NestedSpectralTokenizer(dataclasses.replace(TINY, position_init="sincos"))
    expected = sincos_2d_table(TINY.grid_size, TINY.width)[None]
    torch.testing.assert_close(model.encoder.patch_position_embedding.data, expected)
    torch.testing.assert_close(model.decoder.mask_position_embedding.data, expected)
    with pytest.raises(ValueError, match="position_init"):
        dataclasses.replace(TINY, position_init="learned")
    with pytest.raises(ValueError, match="decoder_head"):
        dataclasses.replace(TINY, decoder_head="rgb")


@torch.no_grad()
def test_encoder_patch_size_changes_the_encoder_grid_only() -> None:
    """encoder_patch_size 4 on an 8 px image: the encoder reads a 2x2 grid of 4 px patches, the
    decoder keeps patch_size's 4x4 grid. The model is exactly a patch-4 encoder (the encoder of
    TINY with patch_size 4) in front of TINY's decoder, given the same weights."""
    config = dataclasses.replace(TINY, encoder_patch_size=4, position_init="sincos")
    assert (config.encoder_patch, config.encoder_grid_size, config.encoder_num_patches) == (4, 2, 4)
    assert (config.grid_size, config.num_patches) == (TINY.grid_size, TINY.num_patches)
    torch.manual_seed(0)
    model = scramble(NestedSpectralTokenizer(config).eval())
    assert model.encoder.patch_projection.weight.shape == (TINY.width, 1, 4, 4)
    assert model.encoder.patch_position_embedding.shape == (1, 4, TINY.width)
    assert model.decoder.mask_position_embedding.shape == (1, TINY.num_patches, TINY.width)
    from spectralar.models.tokenizer import sincos_2d_table

    torch.manual_seed(0)
    initial = NestedSpectralTokenizer(config)
    torch.testing.assert_close(initial.encoder.patch_position_embedding.data, sincos_2d_table(2, TINY.width)[None])
    torch.testing.assert_close(initial.decoder.mask_position_embedding.data,
                               sincos_2d_table(TINY.grid_size, TINY.width)[None])
    coarse = NestedSpectralTokenizer(dataclasses.replace(TINY, patch_size=4)).eval()
    fine = NestedSpectralTokenizer(TINY).eval()
    coarse.encoder.load_state_dict(model.encoder.state_dict())
    fine.decoder.load_state_dict(model.decoder.state_dict())
    fine.quantizer.load_state_dict(model.quantizer.state_dict())
    images = random_images(3)
    latents = model.encode_latents(images)
    torch.testing.assert_close(latents, coarse.encode_latents(images), atol=0, rtol=0)
    prefix = torch.tensor([1, 3, TINY.num_tokens])
    codes = model.quantizer(latents)[0]
    logits = model.decode(codes, prefix)
    assert logits.shape == (3, TINY.proxy_codebook_size, TINY.grid_size, TINY.grid_size)
    torch.testing.assert_close(logits, fine.decode(codes, prefix), atol=0, rtol=0)
    # the spectral causal mask still keeps s_j, j < k, blind to query k in the coarser encoder
    model.encoder.spectral_query_tokens[2] += torch.randn(TINY.width)  # (a constant would vanish in LayerNorm)
    changed = model.encode_latents(images)
    torch.testing.assert_close(changed[:, :2], latents[:, :2], atol=0, rtol=0)
    assert (changed[:, 2] - latents[:, 2]).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"divisible by encoder_patch_size \(3\)"):
        dataclasses.replace(TINY, encoder_patch_size=3)
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match=r"^TokenizerConfig\.encoder_patch_size must be a positive int, got "):
            dataclasses.replace(TINY, encoder_patch_size=bad)


@torch.no_grad()
def test_band_limited_output_projects_each_prefix_onto_its_omega_block() -> None:
    from spectralar.models.codec import SpectralCodec
    from spectralar.models.proxy_vq import ProxyConfig, ProxyVQModel
    from spectralar.spectral import band_limit

    omegas = (1, 2, 3, 4, 8)
    torch.manual_seed(0)
    plain = NestedSpectralTokenizer(PIXEL).eval()
    projected = NestedSpectralTokenizer(dataclasses.replace(PIXEL, band_limited_output=True)).eval()
    projected.load_state_dict(plain.state_dict())
    proxy = ProxyVQModel(ProxyConfig(image_size=8, channel_multipliers=(1, 2), res_blocks=1, base_channels=8))
    codec_plain = SpectralCodec(plain, proxy, omegas)
    codec_projected = SpectralCodec(projected, proxy, omegas)
    ids = torch.randint(0, PIXEL.codebook_size, (3, PIXEL.num_tokens))
    for i in (1, 3, PIXEL.num_tokens):
        expected = band_limit(plain.decode_ids(ids[:, :i]), omegas[i - 1]).clamp(-1, 1)
        torch.testing.assert_close(codec_projected.decode(ids[:, :i]), expected)
    lengths = torch.tensor([0, 2, PIXEL.num_tokens])  # per-sample prefixes in one call; 0 = unprojected
    mixed = codec_projected.decode(ids, lengths)
    torch.testing.assert_close(mixed[0], codec_plain.decode(ids, lengths)[0])
    torch.testing.assert_close(mixed[1], band_limit(plain.decode_ids(ids[1:2, :2]), 2)[0].clamp(-1, 1))
    # ω_N = H: the full prefix is unchanged
    torch.testing.assert_close(mixed[2], codec_plain.decode(ids[2:3])[0])


# --------------------------------------------------------------------------------------------
# Stage-1 prefix sampling (Algorithm 1 line 4 and its fine-weighted variants)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,floor", [("uniform", 1), ("linear", 1), ("mixed", 1), ("linear", 3), ("mixed", 3),
                                        ("linear", 8), ("uniform", 3)])
def test_prefix_sampling_frequencies(mode: str, floor: int) -> None:
    from spectralar.stages.train_tokenizer import sample_levels

    config = dataclasses.replace(TINY, num_tokens=8)
    n, draws = config.num_tokens, 200_000
    levels = sample_levels(draws, config, torch.Generator().manual_seed(0), mode, floor)
    assert levels.dtype == torch.long and int(levels.min()) >= 0 and int(levels.max()) <= n - 1
    # p(i) ∝ max(i, floor), written out: floor 3 of N = 8 weighs prefixes 1..8 as 3, 3, 3, 4, ..., 8
    weights = np.array([floor] * floor + list(range(floor + 1, n + 1)), dtype=float)
    expected = {"uniform": np.full(n, 1 / n), "linear": weights / weights.sum(),
                "mixed": 0.5 / n + 0.5 * weights / weights.sum()}[mode]
    observed = np.bincount(levels.numpy(), minlength=n) / draws
    # 200k draws: the standard error of each frequency is below 0.0012; 5 sigma
    np.testing.assert_allclose(observed, expected, atol=0.006)
    if mode == "linear" and floor == n:
        np.testing.assert_allclose(expected, np.full(n, 1 / n))  # a floor of N is uniform
    again = sample_levels(draws, config, torch.Generator().manual_seed(0), mode, floor)
    assert torch.equal(levels, again)  # seeded: resume draws the same prefixes


def test_prefix_sampling_without_spectral_supervision_is_always_the_full_prefix() -> None:
    from spectralar.stages.train_tokenizer import sample_levels

    config = dataclasses.replace(TINY, spectral_supervision=False)
    for mode in ("uniform", "linear", "mixed"):
        levels = sample_levels(64, config, torch.Generator().manual_seed(0), mode)
        assert levels.tolist() == [config.num_tokens - 1] * 64
