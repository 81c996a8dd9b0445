"""Throughput, FLOP estimates, model FLOPs utilisation (MFU) and training histories.

Progress reporting is ``spectralar.log.progress`` (re-exported here for the training loops).

FLOP counts follow the PaLM paper's MFU accounting (Chowdhery et al. 2022, appendix B):
a training step costs 6 FLOPs per parameter per token (2 forward, 4 backward) plus
12·L·T·C per token for the attention score and value products (L layers, context T,
width C). Rematerialisation is not counted, so MFU is comparable across implementations.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Callable, Optional, Union

import torch

from spectralar.log import progress  # noqa: F401 -- the one progress helper, re-exported

logger = logging.getLogger("spectralar")


# Dense (no structured sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, FLOP/s.
# Matched in order against torch.cuda.get_device_name(), so "H100 PCIe" precedes "H100".
# H200 uses the same GH100 compute as H100 SXM (only memory differs).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


# --------------------------------------------------------------------------------------
# Throughput
# --------------------------------------------------------------------------------------


class Throughput:
    """Items (images or tokens) per second over the last ``window`` updates.

    Call :meth:`update` once per step with the number of items the step processed. On CUDA,
    kernels run asynchronously, so a rate over one step measures launch time; over a window
    of steps the queue cannot run ahead by more than a step or two and the rate is sound.
    """

    def __init__(self, window: int = 20, clock: Callable[[], float] = time.perf_counter):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self._clock = clock
        self._marks: collections.deque[tuple[float, int]] = collections.deque(maxlen=window + 1)
        self.total = 0
        self.reset()

    def reset(self) -> None:
        """Start timing from now (e.g. after compilation or the first, slow step)."""
        self._marks.clear()
        self._marks.append((self._clock(), self.total))

    def update(self, count: int) -> None:
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.total += count
        self._marks.append((self._clock(), self.total))

    @property
    def rate(self) -> float:
        """Items per second over the window; 0.0 before the first update."""
        (start_time, start_count), (end_time, end_count) = self._marks[0], self._marks[-1]
        elapsed = end_time - start_time
        return (end_count - start_count) / elapsed if elapsed > 0 else 0.0


# --------------------------------------------------------------------------------------
# FLOPs and MFU
# --------------------------------------------------------------------------------------


def transformer_flops_per_token(
    parameters: int, *, layers: int = 0, context: int = 0, width: int = 0
) -> float:
    """Training FLOPs per token: ``6·N + 12·L·T·C`` (PaLM appendix B).

    ``parameters`` (N) should exclude embedding tables, whose lookups cost no matmul FLOPs.
    Leave ``layers`` at 0 to drop the attention term (e.g. for non-transformer models).
    The attention term is counted in full even for causal attention, as PaLM does.
    """
    for name, value in (("parameters", parameters), ("layers", layers),
                        ("context", context), ("width", width)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return 6.0 * parameters + 12.0 * layers * context * width


def model_flops_per_sample(
    parameters: int, tokens: int, *, layers: int = 0, width: int = 0, per_sample_parameters: int = 0
) -> float:
    """Training FLOPs for one sample of ``tokens`` tokens: ``tokens · (6·N + 12·L·T·C) + 6·N_s``.

    ``parameters`` (N) act on every token; ``per_sample_parameters`` (N_s) act once per sample, as
    the AdaLN projections of a class-conditional generator do (VAR: they map the sequence's one
    class embedding to its gates, scales and shifts). Counting those per token would inflate the
    d16 generator's FLOPs ≈ 1.5x (its AdaLN is a third of its parameters).
    """
    if tokens < 0 or per_sample_parameters < 0:
        raise ValueError(f"tokens and per_sample_parameters must be >= 0, got {tokens}, {per_sample_parameters}")
    per_token = transformer_flops_per_token(
        parameters, layers=layers, context=tokens, width=width
    )
    return tokens * per_token + 6.0 * per_sample_parameters


def peak_flops_for_name(device_name: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s for a CUDA device name, or None when the GPU is not listed."""
    for fragment, flops in PEAK_BF16_FLOPS:
        if fragment.lower() in device_name.lower():
            return flops
    return None


def peak_flops(
    device: Union[str, torch.device], override: Optional[float] = None
) -> Optional[float]:
    """Peak bf16 FLOP/s of one device: ``override`` if given, else the table, else None.

    CPUs have no meaningful single figure here, so they give None unless ``override`` is set.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"override must be > 0, got {override}")
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    flops = peak_flops_for_name(name)
    if flops is None:
        logger.warning("no peak FLOP/s known for %r; MFU will not be reported", name)
    return flops


def mfu(
    flops_per_sample: float,
    samples_per_second: float,
    peak_flops_per_device: Optional[float],
    devices: int = 1,
) -> Optional[float]:
    """Achieved model FLOP/s over the job's peak, a fraction in [0, 1] for sane inputs.

    ``samples_per_second`` is the whole job's rate (all ``devices`` together). Returns None
    when the peak is unknown.
    """
    if peak_flops_per_device is None:
        return None
    if peak_flops_per_device <= 0 or devices < 1:
        raise ValueError(
            f"peak_flops_per_device must be > 0 and devices >= 1, got "
            f"{peak_flops_per_device}, {devices}"
        )
    return flops_per_sample * samples_per_second / (peak_flops_per_device * devices)


class HistoryRows:
    """The rows a training loop logs (its history.csv), checkpointed with the model so that a resumed
    run writes the same history as an uninterrupted one. Rows hold results only (losses, lr, grad
    norms): wall-clock rates go to the log and MLflow, never into a history a rerun must reproduce."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))

    def state_dict(self) -> dict:
        return {"rows": [dict(row) for row in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        self.rows = [dict(row) for row in state["rows"]]
