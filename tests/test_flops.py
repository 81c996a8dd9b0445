"""The generator's FLOP count (used for MFU) against torch's own FLOP counter.

``torch.utils.flop_counter.FlopCounterMode`` counts matrix products only (mm, addmm, bmm and the
fused attention kernels it knows); bias additions, norms, activations, softmax and embedding lookups
cost it nothing. PaLM's accounting (``spectralar.training.meter``) counts 2 FLOPs per parameter per
token forward, biases included, plus the attention products 4·L·T²·C. So the two agree exactly on the
Linear weights, and the full count exceeds the counter by the bias share, ≈ 1/C of the parameters.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from spectralar.models.generator import GeneratorConfig, SpectralGPT
from spectralar.stages.train_generator import flops_per_image, matmul_parameters
from spectralar.training import model_flops_per_sample

BATCH = 3


def small_model(tokens_per_step: int) -> SpectralGPT:
    torch.manual_seed(0)
    config = GeneratorConfig(depth=2, width=128, heads=2, vocab_size=64, num_tokens=16, num_classes=5,
                             tokens_per_step=tokens_per_step)
    return SpectralGPT(config).eval()


def counted_forward_flops(model: SpectralGPT) -> int:
    """Matmul FLOPs of one teacher-forced forward of BATCH images. SDPA is restricted to the math
    backend, whose products the counter sees as bmm (it has no entry for PyTorch's CPU flash kernel)."""
    config = model.config
    ids_BN = torch.randint(0, config.vocab_size, (BATCH, config.num_tokens))
    labels_B = torch.arange(BATCH)
    with sdpa_kernel([SDPBackend.MATH]), FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids_BN, labels_B)
    return counter.get_total_flops()


def linear_weights(modules) -> int:
    return sum(module.weight.numel() for module in modules if isinstance(module, nn.Linear))


@pytest.mark.parametrize("tokens_per_step", [1, 4])
def test_forward_flops_match_the_counter_on_linear_weights(tokens_per_step: int) -> None:
    """Exact: the AdaLN projections once per image, every other Linear once per token, attention in
    full (the counter, like PaLM, counts the masked half of causal attention too). Training = 3x forward."""
    model = small_model(tokens_per_step)
    adaln = [block.ada_lin for block in model.blocks] + [model.head.ada_lin]
    per_image = linear_weights(m for projection in adaln for m in projection.modules())
    per_token = linear_weights(model.modules()) - per_image
    config = model.config
    training = model_flops_per_sample(per_token, config.num_tokens, layers=config.depth,
                                      width=config.resolved_width, per_sample_parameters=per_image)
    assert counted_forward_flops(model) == BATCH * training / 3


@pytest.mark.parametrize("tokens_per_step", [1, 4])
def test_flops_per_image_is_the_counter_plus_biases(tokens_per_step: int) -> None:
    """flops_per_image (what MFU uses) counts biases as PaLM does: above the counter by the bias share
    (under 1/C of the parameters: 0.5% at C = 128), never below it. Counting the AdaLN projections
    per token, as before, gave 1.52x here and 1.48-1.50x at the default, d16, d20 and d24 configs."""
    model = small_model(tokens_per_step)
    counted = counted_forward_flops(model) / BATCH
    ours = flops_per_image(model) / 3
    assert 1.0 <= ours / counted < 1.01
    config = model.config
    per_token_adaln = model_flops_per_sample(matmul_parameters(model), config.num_tokens, layers=config.depth,
                                             width=config.resolved_width) / 3
    assert per_token_adaln / counted > 1.4


def test_per_sample_parameters_are_counted_once_per_sample() -> None:
    assert model_flops_per_sample(1000, 10, per_sample_parameters=500) == 10 * 6 * 1000 + 6 * 500
    with pytest.raises(ValueError, match="per_sample_parameters"):
        model_flops_per_sample(1000, 10, per_sample_parameters=-1)


def test_per_image_parameters_are_the_adaln_projections() -> None:
    """d16: every block's Linear(C, 6C) and the head's Linear(C, 2C), weights and biases."""
    with torch.device("meta"):
        model = SpectralGPT(GeneratorConfig.d16())
    width = 1024
    assert model.per_image_parameters() == 16 * (6 * width * width + 6 * width) + 2 * width * width + 2 * width
