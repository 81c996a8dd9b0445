"""Tests for the MaskGIT-VQGAN-style proxy VQ model (spectralar/models/proxy_vq.py)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from spectralar.models.proxy_vq import (
    ProxyConfig,
    ProxyQuantizer,
    ProxyVQModel,
    ResBlock,
    load_maskgit_checkpoint,
)
from spectralar.models.quantizer import SpectralTokenQuantizer

# The official MaskGIT-VQGAN checkpoint's state-dict keys and shapes (listed from the released file)
KEYS_FILE = Path(__file__).parent / "data" / "maskgit-vqgan-state-dict-keys.txt"


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """One intra-op thread: on the shared 2-core machine, OpenMP spin-waiting under load made a
    30-step test take minutes instead of ~3 s. Restored afterwards for other test modules."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _parse_keys_file() -> tuple[dict[str, tuple[int, ...]], int, float]:
    """(key -> shape, tensor count, params in millions) from the official keys file."""
    if not KEYS_FILE.is_file():
        pytest.skip(f"official state-dict keys file not found at {KEYS_FILE}")
    lines = KEYS_FILE.read_text().splitlines()
    header = re.search(r"(\d+) tensors, ([\d.]+)M params", lines[0])
    assert header, f"unexpected header line: {lines[0]!r}"
    shapes = {}
    for line in lines[1:]:
        if not line.strip():
            continue
        match = re.fullmatch(r"(\S+) \(([\d, ]*)\)", line.strip())
        assert match, f"unparsable line: {line!r}"
        shapes[match[1]] = tuple(int(x) for x in match[2].split(",") if x.strip())
    return shapes, int(header[1]), float(header[2])


def _small_model(seed: int = 0, **overrides) -> ProxyVQModel:
    torch.manual_seed(seed)
    return ProxyVQModel(ProxyConfig(**overrides))


def _smooth_images(batch: int, config: ProxyConfig, seed: int = 0) -> torch.Tensor:
    """Low-frequency images in [-1, 1] (upsampled noise), so a tiny model can learn them quickly."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, config.in_channels, 4, 4, generator=generator) * 2 - 1
    return F.interpolate(coarse, size=config.image_size, mode="bilinear", align_corners=False)


# ---------------------------------------------------------------- official configuration / checkpoint


def test_official_config_state_dict_matches_keys_file() -> None:
    shapes, tensor_count, millions = _parse_keys_file()
    with torch.device("meta"):  # no memory, no init cost
        model = ProxyVQModel(ProxyConfig.maskgit_imagenet())
    model_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(model_shapes) == sorted(shapes)
    assert len(shapes) == tensor_count == 168
    mismatched = {k: (model_shapes[k], shapes[k]) for k in shapes if model_shapes[k] != shapes[k]}
    assert not mismatched
    file_total = sum(math.prod(s) for s in shapes.values())
    assert round(file_total / 1e6, 2) == millions == 54.52
    assert sum(p.numel() for p in model.parameters()) == file_total


def test_official_config_shapes_on_meta_device() -> None:
    # Shape propagation only: meta tensors carry no data, so this is not a 256 px forward.
    config = ProxyConfig.maskgit_imagenet()
    assert (config.downsample_factor, config.grid_size) == (16, 16)
    with torch.device("meta"):
        model = ProxyVQModel(config)
        latents = model.encoder(torch.empty(2, 3, 256, 256))
        assert tuple(latents.shape) == (2, 256, 16, 16)
        assert tuple(model.decoder(latents).shape) == (2, 3, 256, 256)
        assert tuple(model.quantize.mix(torch.empty(2, 1024, 16, 16)).shape) == (2, 256, 16, 16)


def test_synthetic_official_checkpoint_loads_strictly(tmp_path: Path) -> None:
    shapes, _, _ = _parse_keys_file()
    generator = torch.Generator().manual_seed(1)
    # Built from the parsed file, not from the model, so a naming drift in the model cannot hide.
    synthetic = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    path = tmp_path / "maskgit-vqgan-imagenet-f16-256.bin"
    torch.save(synthetic, path)
    model = ProxyVQModel(ProxyConfig.maskgit_imagenet())
    load_maskgit_checkpoint(model, path)
    loaded = model.state_dict()
    for key in ("quantize.embedding.weight", "encoder.down.2.block.0.nin_shortcut.weight",
                "decoder.up.3.upsample_conv.bias", "decoder.conv_out.weight"):
        assert torch.equal(loaded[key], synthetic[key]), key


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model"])
def test_checkpoint_wrappers_are_accepted(tmp_path: Path, wrapper: str | None) -> None:
    source = _small_model(seed=1)
    payload = source.state_dict() if wrapper is None else {wrapper: source.state_dict(), "step": 7}
    torch.save(payload, tmp_path / "ckpt.bin")
    target = _small_model(seed=2)
    load_maskgit_checkpoint(target, tmp_path / "ckpt.bin")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_checkpoint_with_missing_key_fails_naming_it(tmp_path: Path) -> None:
    state = _small_model().state_dict()
    del state["decoder.up.1.upsample_conv.weight"]
    state["encoder.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "ckpt.bin")
    with pytest.raises(ValueError) as error:
        load_maskgit_checkpoint(_small_model(), tmp_path / "ckpt.bin")
    assert "missing keys: decoder.up.1.upsample_conv.weight" in str(error.value)
    assert "unexpected keys: encoder.extra.weight" in str(error.value)


def test_checkpoint_with_wrong_shape_fails_naming_it(tmp_path: Path) -> None:
    state = _small_model().state_dict()
    state["quantize.embedding.weight"] = torch.zeros(255, 32)
    torch.save(state, tmp_path / "ckpt.bin")
    expected = r"shape mismatches: quantize\.embedding\.weight: checkpoint \(255, 32\)"
    with pytest.raises(ValueError, match=expected):
        load_maskgit_checkpoint(_small_model(), tmp_path / "ckpt.bin")


def test_missing_checkpoint_file_names_file_and_param(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.bin"
    with pytest.raises(FileNotFoundError) as error:
        load_maskgit_checkpoint(_small_model(), path)
    message = str(error.value)
    assert str(path) in message
    assert "maskgit-vqgan-imagenet-f16-256.bin" in message
    assert "proxy.checkpoint" in message


# ---------------------------------------------------------------- config


def test_config_derived_values_and_validation() -> None:
    default = ProxyConfig()
    assert (default.downsample_factor, default.grid_size) == (4, 8)
    official = ProxyConfig.maskgit_imagenet()
    assert (official.image_size, official.in_channels, official.base_channels) == (256, 3, 128)
    assert official.channel_multipliers == (1, 1, 2, 2, 4)
    assert (official.codebook_size, official.code_dim, official.norm_groups) == (1024, 256, 32)
    assert ProxyConfig(channel_multipliers=[1, 2]).channel_multipliers == (1, 2)  # YAML lists
    with pytest.raises(ValueError, match="image_size"):
        ProxyConfig(image_size=30)  # not divisible by 4
    with pytest.raises(ValueError, match="norm_groups"):
        ProxyConfig(base_channels=12)  # 12 not divisible by 8
    with pytest.raises(ValueError, match="channel_multipliers"):
        ProxyConfig(channel_multipliers=())
    with pytest.raises(ValueError, match="pixel_range"):
        ProxyConfig(pixel_range="0-255")


# ---------------------------------------------------------------- small model behaviour


def test_method_shapes_and_id_range() -> None:
    model = _small_model()
    config = model.config
    images = _smooth_images(3, config)
    reconstruction, ids, vq_loss = model(images)
    assert reconstruction.shape == images.shape
    assert ids.shape == (3, 8, 8) and ids.dtype == torch.int64
    assert vq_loss.ndim == 0 and vq_loss.dtype == torch.float32
    encoded = model.encode_ids(images)
    assert torch.equal(encoded, ids)
    assert int(encoded.min()) >= 0 and int(encoded.max()) < config.codebook_size
    assert model.codes_to_images(encoded).shape == images.shape
    probs = torch.softmax(torch.randn(3, config.codebook_size, 8, 8), dim=1)
    assert model.probs_to_images(probs).shape == images.shape


def test_encode_ids_is_brute_force_nearest_code() -> None:
    model = _small_model()
    images = _smooth_images(2, model.config)
    with torch.no_grad():
        latents = model.encoder(images)  # (B, D, h, w)
        # Independent reference: explicit (z - e)^2 over every (position, code) pair, no expansion.
        z = latents.permute(0, 2, 3, 1)[..., None, :]  # (B, h, w, 1, D)
        # Spread the codebook so that the nearest code is not decided by rounding.
        model.quantize.embedding.weight.normal_()
        expected = (z - model.quantize.embedding.weight).pow(2).sum(-1).argmin(-1)  # (B, h, w)
    assert torch.equal(model.encode_ids(images), expected)


def test_vq_loss_weights_codebook_and_commitment_terms() -> None:
    torch.manual_seed(0)
    quantizer = ProxyQuantizer(codebook_size=16, code_dim=4, commitment_weight=0.25)
    quantizer.embedding.weight.data.normal_()
    latents = torch.randn(2, 4, 3, 3, requires_grad=True)
    quantized, ids, vq_loss = quantizer(latents)
    codes = quantizer.embedding.weight[ids].permute(0, 3, 1, 2).detach()  # (B, D, h, w)
    assert torch.allclose(quantized, codes)  # forward value is the code
    assert torch.allclose(vq_loss, 1.25 * F.mse_loss(latents, codes))
    vq_loss.backward()
    # d/dz of 0.25*mean((z - sg e)^2) is 0.25 * 2 (z - e) / N: the commitment weight is on the encoder side.
    assert torch.allclose(latents.grad, 0.25 * 2 * (latents - codes) / latents.numel(), atol=1e-7)
    assert quantizer.embedding.weight.grad.abs().sum() > 0


def test_quantisation_stays_float32_under_autocast() -> None:
    # Two codes 2**-9 apart: identical in bfloat16, distinct in float32. z sits exactly on code 1.
    quantizer = ProxyQuantizer(codebook_size=2, code_dim=1, commitment_weight=0.25)
    quantizer.embedding.weight.data = torch.tensor([[1.0], [1.0 + 2.0 ** -9]])
    latents = torch.full((1, 1, 2, 2), 1.0 + 2.0 ** -9)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        _, ids, vq_loss = quantizer(latents)
        mixed = quantizer.mix(torch.tensor([0.0, 1.0]).view(1, 2, 1, 1))
    assert torch.equal(ids, torch.ones(1, 2, 2, dtype=torch.long))
    assert vq_loss.dtype == torch.float32 and mixed.dtype == torch.float32
    assert mixed.item() == 1.0 + 2.0 ** -9


def test_straight_through_gradients_reach_encoder_not_codebook() -> None:
    model = _small_model()
    reconstruction, _, vq_loss = model(_smooth_images(2, model.config))
    reconstruction.square().mean().backward(retain_graph=True)
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.decoder.conv_out.weight.grad.abs().sum() > 0
    # The reconstruction reaches the codebook only through the VQ loss (straight-through estimator).
    codebook_grad = model.quantize.embedding.weight.grad
    assert codebook_grad is None or codebook_grad.abs().sum() == 0
    vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_few_steps_reduce_reconstruction_loss() -> None:
    model = _small_model(seed=3)
    images = _smooth_images(4, model.config, seed=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        reconstruction, _, vq_loss = model(images)
        reconstruction_loss = F.mse_loss(reconstruction, images)
        optimizer.zero_grad()
        (reconstruction_loss + vq_loss).backward()
        optimizer.step()
        losses.append(reconstruction_loss.item())
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3, losses


def test_one_hot_probs_equal_hard_codes_and_probs_are_differentiable() -> None:
    model = _small_model()
    config = model.config
    ids = torch.randint(0, config.codebook_size, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    one_hot = F.one_hot(ids, config.codebook_size).permute(0, 3, 1, 2).float()  # (B, V, h, w)
    with torch.no_grad():
        assert torch.allclose(model.probs_to_images(one_hot), model.codes_to_images(ids), atol=1e-6)
    logits = torch.randn(2, config.codebook_size, 8, 8, requires_grad=True)
    model.probs_to_images(logits.softmax(dim=1)).mean().backward()
    assert logits.grad.abs().sum() > 0
    assert model.decoder.conv_in.weight.grad.abs().sum() > 0


def test_channel_changing_res_block_adds_shortcut_of_its_own_output() -> None:
    torch.manual_seed(0)
    block = ResBlock(in_channels=8, out_channels=16, norm_groups=4)
    x = torch.randn(2, 8, 5, 5)
    h = block.conv1(F.silu(F.group_norm(x, 4, block.norm1.weight, block.norm1.bias, eps=1e-6)))
    h = block.conv2(F.silu(F.group_norm(h, 4, block.norm2.weight, block.norm2.bias, eps=1e-6)))
    expected = h + F.conv2d(h, block.nin_shortcut.weight)  # out = h + W·h (official quirk)
    assert block.nin_shortcut.weight.shape == (16, 16, 1, 1)
    assert torch.allclose(block(x), expected, atol=1e-6)
    same = ResBlock(in_channels=8, out_channels=8, norm_groups=4)
    assert same.nin_shortcut is None
    h = same.conv2(F.silu(same.norm2(same.conv1(F.silu(same.norm1(x))))))
    assert torch.allclose(same(x), x + h, atol=1e-6)


def test_zero_one_pixel_range_converts_at_the_boundary() -> None:
    model = _small_model(pixel_range="zero_one")
    images = _smooth_images(2, model.config)
    with torch.no_grad():
        latents = model.encoder((images + 1) / 2)
        assert torch.equal(model.encode_ids(images), model.quantize.nearest_ids(latents))
        ids = model.encode_ids(images)
        expected = model.decoder(model.quantize.lookup(ids)) * 2 - 1
        assert torch.allclose(model.codes_to_images(ids), expected, atol=1e-6)


def test_same_seed_same_model_and_outputs() -> None:
    images = _smooth_images(2, ProxyConfig())
    first, second = _small_model(seed=5), _small_model(seed=5)
    with torch.no_grad():
        assert torch.equal(first(images)[0], second(images)[0])
        assert torch.equal(first.encode_ids(images), second.encode_ids(images))


def test_bad_inputs_raise_value_errors_naming_the_argument() -> None:
    model = _small_model()
    with pytest.raises(ValueError, match="images"):
        model.encode_ids(torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="images"):
        model(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="ids"):
        model.codes_to_images(torch.full((1, 8, 8), 256))
    with pytest.raises(ValueError, match="ids"):
        model.codes_to_images(torch.zeros(1, 8, 8))  # float ids
    with pytest.raises(ValueError, match="probs"):
        model.probs_to_images(torch.zeros(1, 255, 8, 8))


def test_proxy_and_token_quantizers_share_their_maths() -> None:
    """Without normalisation the tokenizer's quantizer is the same VQ as the proxy's, channels last."""
    torch.manual_seed(0)
    proxy = ProxyQuantizer(codebook_size=32, code_dim=6, commitment_weight=0.25)
    proxy.embedding.weight.data.normal_()
    tokens = SpectralTokenQuantizer(codebook_size=32, code_dim=6, commitment_weight=0.25, normalize=False)
    tokens.load_state_dict(proxy.state_dict())
    latents_BDhw = torch.randn(2, 6, 3, 5)
    quantized_BDhw, ids_Bhw, proxy_loss = proxy(latents_BDhw)
    z_q_BND, ids_BN, token_loss = tokens(latents_BDhw.flatten(2).transpose(1, 2))  # (B, h*w, D)
    assert torch.equal(ids_BN, ids_Bhw.flatten(1))
    assert torch.equal(z_q_BND, quantized_BDhw.flatten(2).transpose(1, 2))
    torch.testing.assert_close(token_loss, proxy_loss)
