"""Exponential moving average of model weights (TiTok trains with EMA 0.999).

The shadow copy is kept in float32 even when the model trains in bf16: with decay 0.999
each update moves the average by 1e-3 of the difference, which bf16's 8-bit mantissa
would round away.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional, Union

import torch
from torch import nn

from spectralar.training.distributed import unwrap_model


def _named_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters then buffers, by name, in registration order."""
    model = unwrap_model(model)
    state = {name: parameter for name, parameter in model.named_parameters()}
    state.update({name: buffer for name, buffer in model.named_buffers()})
    return state


class EMA:
    """Float32 moving average of a model's parameters and floating-point buffers.

    ``shadow = decay_t * shadow + (1 - decay_t) * current`` at every :meth:`update`.
    With ``warmup=True``, ``decay_t = min(decay, (1 + t) / (10 + t))`` where ``t`` is the
    number of updates already applied (0 at the first call): the first update uses 0.1,
    so the average is not dominated by the random initialisation for the first ~1/(1-decay)
    steps (the ``num_updates`` rule of TensorFlow's ExponentialMovingAverage). Without
    warmup, ``decay_t = decay`` throughout. Integer and bool buffers (counters, masks) are
    copied rather than averaged.
    """

    def __init__(
        self,
        model: nn.Module,
        decay: float,
        *,
        warmup: bool = False,
        device: Optional[Union[str, torch.device]] = None,
    ) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, tensor in _named_state(model).items():
                target_device = tensor.device if device is None else torch.device(device)
                dtype = torch.float32 if torch.is_floating_point(tensor) else tensor.dtype
                self.shadow[name] = tensor.detach().to(target_device, dtype, copy=True)

    def current_decay(self) -> float:
        """The decay the next :meth:`update` will use."""
        if not self.warmup:
            return self.decay
        t = self.num_updates
        return min(self.decay, (1.0 + t) / (10.0 + t))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend the model's current weights into the shadow (call after optimizer.step())."""
        decay = self.current_decay()
        averaged: list[torch.Tensor] = []
        current: list[torch.Tensor] = []
        for name, tensor in self._matched(model):
            shadow = self.shadow[name]
            if torch.is_floating_point(shadow):
                averaged.append(shadow)
                current.append(tensor.detach().to(shadow.device, torch.float32))
            else:
                shadow.copy_(tensor)
        if averaged:
            # lerp: shadow + (1 - decay) * (current - shadow) = decay*shadow + (1-decay)*current
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        self.num_updates += 1

    def _matched(self, model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        state = _named_state(model)
        if state.keys() != self.shadow.keys():
            missing = sorted(self.shadow.keys() - state.keys())
            unexpected = sorted(state.keys() - self.shadow.keys())
            raise ValueError(
                f"model does not match the EMA: missing {missing}, unexpected {unexpected}"
            )
        return iter(state.items())

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the averages (cast to the model's dtype)."""
        for name, tensor in self._matched(model):
            tensor.copy_(self.shadow[name])

    @contextlib.contextmanager
    def swapped(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averages into ``model`` (e.g. for evaluation), then restore.

        The training weights are backed up in their own dtype and restored even if the
        body raises.
        """
        backup = {name: tensor.detach().clone() for name, tensor in self._matched(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, tensor in _named_state(model).items():
                    tensor.copy_(backup[name])

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain Python only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
            "shadow": dict(self.shadow),
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore averages and update count; tensors stay on this EMA's device."""
        shadow = state["shadow"]
        if shadow.keys() != self.shadow.keys():
            raise ValueError(
                "EMA state does not match: missing "
                f"{sorted(self.shadow.keys() - shadow.keys())}, unexpected "
                f"{sorted(shadow.keys() - self.shadow.keys())}"
            )
        for name, tensor in shadow.items():
            if tensor.shape != self.shadow[name].shape:
                raise ValueError(
                    f"EMA state {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(self.shadow[name].shape)}"
                )
            self.shadow[name].copy_(tensor)
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])
