"""The tokenizer's ViT block against timm's ``Block`` (the reference it was written from): the same
parameters from the same seed, bit-identical outputs and gradients with every kind of attention mask,
under CPU bf16 autocast too, and a whole tokenizer that is the same model either way. Building and
running the tokenizer imports neither timm nor torchvision (nor ``torch._dynamo``, which they import)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from spectralar.models import tokenizer as tokenizer_module
from spectralar.models.masks import decoder_mask, encoder_mask
from spectralar.models.tokenizer import NestedSpectralTokenizer
from spectralar.models.vit import Block
from tests.conftest import REPO
from tests.test_tokenizer import TINY

timm_vit = pytest.importorskip("timm.models.vision_transformer")

pytestmark = pytest.mark.usefixtures("single_thread")


def timm_block(width: int, heads: int, mlp_ratio: float = 4.0) -> nn.Module:
    """timm's block as the tokenizer built it before it had its own."""
    return timm_vit.Block(dim=width, num_heads=heads, mlp_ratio=mlp_ratio, qkv_bias=True, norm_layer=nn.LayerNorm)


def pair(width: int, heads: int, mlp_ratio: float, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    ours = Block(width, heads, mlp_ratio)
    torch.manual_seed(seed)
    return ours, timm_block(width, heads, mlp_ratio)


def masks(length: int, batch: int) -> dict[str, dict]:
    """The attention inputs the tokenizer passes: none, its encoder and decoder masks, and is_causal."""
    num_tokens = 3
    patches = length - num_tokens
    return {
        "none": {},
        "encoder_mask": {"attn_mask": encoder_mask(patches, num_tokens, causal=True)},
        "decoder_mask_per_sample": {"attn_mask": decoder_mask(patches, num_tokens, torch.tensor([1, 3, 0])[:batch],
                                                               causal=True)},
        "is_causal": {"is_causal": True},
    }


@pytest.mark.parametrize("width,heads,mlp_ratio", [(32, 2, 2.0), (48, 4, 4.0), (40, 5, 3.0)])
def test_same_parameters_from_the_same_seed(width, heads, mlp_ratio):
    ours, reference = pair(width, heads, mlp_ratio, seed=3)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    for name, value in ours_state.items():
        assert torch.equal(value, reference_state[name]), name
    # named_modules order decides the tokenizer's init order (it re-initialises by module walk)
    kinds = (nn.Linear, nn.LayerNorm)
    assert ([n for n, m in ours.named_modules() if isinstance(m, kinds)]
            == [n for n, m in reference.named_modules() if isinstance(m, kinds)])


@pytest.mark.parametrize("backend", [SDPBackend.MATH, SDPBackend.FLASH_ATTENTION])
@pytest.mark.parametrize("kind", ["none", "encoder_mask", "decoder_mask_per_sample", "is_causal"])
def test_outputs_and_gradients_are_bit_identical_to_timm(kind, backend):
    ours, reference = pair(32, 4, 4.0)
    with torch.no_grad():  # O(1) weights: the default init's small values would hide a difference
        for p_ours, p_ref in zip(ours.parameters(), reference.parameters()):
            p_ours.normal_(generator=torch.Generator().manual_seed(p_ours.numel()))
            p_ref.copy_(p_ours)
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(1))
    arguments = masks(7, 3)[kind]
    outputs = []
    for model in (ours, reference):
        x_model = x.clone().requires_grad_()
        with sdpa_kernel([backend]):
            out = model(x_model, **arguments)
        out.square().sum().backward()
        outputs.append((out.detach(), x_model.grad, [p.grad for p in model.parameters()]))
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = outputs
    assert torch.equal(out_a, out_b) and torch.equal(dx_a, dx_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_bit_identical_under_cpu_bf16_autocast():
    ours, reference = pair(32, 4, 4.0, seed=5)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2))
    mask = encoder_mask(6, 3, causal=True)
    with torch.autocast("cpu", dtype=torch.bfloat16), sdpa_kernel([SDPBackend.MATH]):
        out_a, out_b = ours(x, attn_mask=mask), reference(x, attn_mask=mask)
        assert ours.attn(x, attn_mask=mask).dtype == torch.bfloat16  # the matmuls ran in bf16
    assert out_a.dtype == out_b.dtype == torch.float32  # a float32 residual stream, as in training
    assert torch.equal(out_a, out_b)


def test_the_tokenizer_is_the_same_model_with_timms_blocks(monkeypatch):
    """Same seed -> same weights (construction and the tokenizer's init walk consume the generator the
    same way), and the same logits and ids: checkpoints trained with timm's blocks load unchanged."""
    config = dataclasses.replace(TINY, causal_mask=True)
    torch.manual_seed(0)
    ours = NestedSpectralTokenizer(config).eval()
    monkeypatch.setattr(tokenizer_module, "Block", timm_block)
    torch.manual_seed(0)
    reference = NestedSpectralTokenizer(config).eval()
    assert isinstance(reference.encoder.blocks[0], timm_vit.Block)
    ours_state, reference_state = ours.state_dict(), reference.state_dict()
    assert list(ours_state) == list(reference_state)
    assert all(torch.equal(value, reference_state[name]) for name, value in ours_state.items())
    ours.load_state_dict(reference_state)  # strict, with timm's module metadata (Identity, Dropout entries)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prefixes = torch.tensor([1, 5, 3])
    with torch.no_grad():
        logits_a, ids_a, _ = ours(images, prefixes)
        logits_b, ids_b, _ = reference(images, prefixes)
    assert torch.equal(ids_a, ids_b) and torch.equal(logits_a, logits_b)


def test_building_and_running_the_tokenizer_imports_no_vision_library():
    script = (
        "import json, sys, torch\n"
        "from spectralar.models.tokenizer import NestedSpectralTokenizer\n"
        "from tests.test_tokenizer import TINY\n"
        "model = NestedSpectralTokenizer(TINY)\n"
        "model(torch.zeros(2, 1, 8, 8), torch.tensor([1, 5]))[0].sum().backward()\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.strip().splitlines()[-1])
    assert not [m for m in modules if m.split(".")[0] in ("timm", "torchvision")]
    assert "torch._dynamo" not in modules
