"""Value checks inside model forwards that cost no host sync where one would hurt.

A check like ``if ids.max() >= vocab: raise`` reads a device value on the host: a stall on CUDA and
a graph break under ``torch.compile``. :func:`require_in_range` raises at once in eager CPU code
(tests, tiny runs: a clear error at the call) and otherwise hands the check to the device with
``torch._assert_async``, which fails the next synchronising call with the same message.
"""

from __future__ import annotations

import torch


def require_in_range(values: torch.Tensor, low: int, high: int, message: str) -> None:
    """``ValueError(message + the values' range)`` unless ``low <= values <= high`` everywhere."""
    if values.numel() == 0:
        return
    in_range = ((values >= low) & (values <= high)).all()
    if torch.compiler.is_compiling() or values.device.type != "cpu":
        torch._assert_async(in_range, message)
        return
    if not bool(in_range):
        raise ValueError(f"{message}, got range [{int(values.min())}, {int(values.max())}]")
