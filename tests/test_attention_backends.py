"""The SDPA kernels both models choose (``spectralar.models.attention``): the fused flash kernel for
float32 sequences on the CPU, the math kernel under CPU bf16 autocast (whose fused bf16 backward is slower
than the rest of a tokenizer step), and the chosen kernels agree with the math backend.

Speed is measured by benchmarks (README "Benchmarks"); these tests check which kernel runs and what it computes.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from spectralar.models.attention import attention_backends
from spectralar.models.generator import GeneratorConfig, SpectralGPT
from spectralar.models.tokenizer import NestedSpectralTokenizer, TokenizerConfig
from spectralar.stages.train_generator import TeacherForced
from tests.test_sampling_speed import attention_kernels

CPU = torch.device("cpu")
FLASH = "_scaled_dot_product_flash_attention_for_cpu.default"
CONFIG = TokenizerConfig(image_size=16, in_channels=1, patch_size=4, width=32, encoder_depth=2, decoder_depth=2,
                         heads=2, num_tokens=6, codebook_size=32, code_dim=8, decoder_head="pixels")


pytestmark = pytest.mark.usefixtures("single_thread")


def scrambled_tokenizer(causal: bool = True) -> NestedSpectralTokenizer:
    """O(1) weights (ViT's std-0.02 init makes attention nearly uniform): kernels then differ visibly if wrong."""
    torch.manual_seed(0)
    model = NestedSpectralTokenizer(dataclasses.replace(CONFIG, causal_mask=causal)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim >= 2 and "embedding.weight" not in name:
                parameter.normal_(0, parameter.shape[-1] ** -0.5)
    return model


def decode_from_prefixes(model: NestedSpectralTokenizer) -> torch.Tensor:
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    prefix_lengths = torch.tensor([1, 3, 5, 6])
    with torch.no_grad():
        return model(images, prefix_lengths)[0].float()


def test_preferences_per_device_and_precision():
    assert attention_backends(CPU) == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    assert attention_backends(CPU, step=True) == [SDPBackend.MATH]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention_backends(CPU) == [SDPBackend.MATH]
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # a caller's restriction still wins
            assert attention_backends(CPU) == [SDPBackend.FLASH_ATTENTION]
    with torch.autocast("cpu", dtype=torch.float16):  # only bf16 switches the CPU preference
        assert attention_backends(CPU) == [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]
    assert attention_backends(torch.device("cuda"))[0] == SDPBackend.FLASH_ATTENTION  # (no CUDA call is made)


@pytest.mark.parametrize("causal", [True, False])
def test_tokenizer_runs_flash_in_float32_and_math_under_cpu_bf16(causal):
    model = scrambled_tokenizer(causal)
    assert attention_kernels(lambda: decode_from_prefixes(model)) == {FLASH}  # no bmm outside attention
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels = attention_kernels(lambda: decode_from_prefixes(model))
    assert FLASH not in kernels and "bmm.default" in kernels, kernels


def test_generator_training_forward_runs_math_under_cpu_bf16():
    torch.manual_seed(0)
    model = SpectralGPT(GeneratorConfig(depth=2, width=64, heads=2, vocab_size=32, num_tokens=8, num_classes=5))
    net = TeacherForced(model)
    ids, labels = torch.randint(0, 32, (3, 8)), torch.tensor([0, 2, 5])
    assert attention_kernels(lambda: net(ids, labels)) == {FLASH}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernels = attention_kernels(lambda: net(ids, labels))
    assert FLASH not in kernels and "bmm.default" in kernels, kernels


@pytest.mark.parametrize("causal", [True, False])
def test_tokenizer_chosen_kernels_match_the_math_backend(causal):
    """float32: the fused kernel equals math to rounding; bf16 under the chosen (math) kernel stays near
    float32 (bf16 keeps 8 bits of mantissa: a wrong mask or cast would be off by O(1))."""
    model = scrambled_tokenizer(causal)
    chosen = decode_from_prefixes(model)
    with sdpa_kernel([SDPBackend.MATH]):
        math = decode_from_prefixes(model)
    torch.testing.assert_close(chosen, math, atol=1e-5, rtol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = decode_from_prefixes(model)
    relative = float((half - math).norm() / math.norm())
    assert relative < 0.05, relative


def test_tokenizer_bf16_gradients_follow_float32():
    """A CPU-bf16 training step's gradients point where float32's do (the backward through the math kernel)."""
    model = scrambled_tokenizer().train()
    images = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    prefix_lengths = torch.tensor([2, 3, 4, 6])

    def gradient(bf16: bool) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output, _, vq_loss = model(images, prefix_lengths)
        (torch.nn.functional.mse_loss(output.float(), images) + vq_loss).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    full, half = gradient(False), gradient(True)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    cosine = float(torch.nn.functional.cosine_similarity(full, half, dim=0))
    assert cosine > 0.99, cosine
