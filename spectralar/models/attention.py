"""Which SDPA kernels the models' attention runs on, chosen explicitly per device and kind of call.

Both models call ``torch.nn.functional.scaled_dot_product_attention`` (the generator from its own
blocks, the tokenizer from its ViT blocks in vit.py) inside ``sdpa_kernel(attention_backends(...))``.

Preferences (measured on a 2-core AMD EPYC with AVX512-BF16, torch 2.x, README "Benchmarks"):
* CUDA: flash, then memory-efficient, then math (fp32 with a mask).
* CPU, float32 sequences: PyTorch's fused flash kernel (1.2x math at 16-64 tokens).
* CPU under bf16 autocast: math. The fused kernel's bf16 backward took 45% of a default tokenizer
  training step (16 ms a call at 80 tokens, head dim 32), more than all its matmuls; with math the
  step is 1.5x faster than float32, the generator's 1.6x.
* A generator sampling step on CPU calls no SDPA kernel: its SelfAttention writes the product out (the
  fused kernel's query blocking has nothing to block over, and the math kernel rescales every cached
  key). Should one reach here it gets math.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

__all__ = ["attention_backends", "cpu_bf16_autocast"]

_PREFERRED_BACKENDS: dict[tuple[str, bool], tuple[SDPBackend, ...]] = {
    ("cuda", False): (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    ("cuda", True): (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH),
    ("cpu", False): (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH),
}
_CPU_BF16 = (SDPBackend.MATH,)
_BACKEND_ENABLED = {
    SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled,
    SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled,
    SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled,
    SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled,
}


def cpu_bf16_autocast() -> bool:
    """Whether a CPU bf16 autocast region is active (``spectralar.training.autocast`` with ``cpu_bf16``)."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def attention_backends(device: torch.device, step: bool = False) -> list[SDPBackend]:
    """SDPA backends a model allows on ``device`` for a whole sequence or a sampling ``step``: its
    preference (above; anything else, a CPU step included: math) restricted to the backends the
    caller left enabled, so an enclosing ``sdpa_kernel`` (e.g. a test allowing flash only, to make a
    fallback an error) still applies; if that leaves none, the caller's choice wins."""
    if device.type == "cpu" and cpu_bf16_autocast():
        preferred = _CPU_BF16
    else:
        preferred = _PREFERRED_BACKENDS.get((device.type, step), (SDPBackend.MATH,))
    if torch.compiler.is_compiling():  # the flags are host state dynamo does not trace: the preference
        return list(preferred)
    enabled = [backend for backend, is_enabled in _BACKEND_ENABLED.items() if is_enabled()]
    return [backend for backend in preferred if backend in enabled] or enabled
