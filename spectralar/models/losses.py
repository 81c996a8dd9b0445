"""Stage-2 losses of the tokenizer (eq. 4): perceptual L_P and adversarial L_A (hinge + LeCam)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: strided convs to a map of real/fake logits (one per receptive field)."""

    def __init__(self, in_channels: int, width: int = 64, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(channels, channels * 2, 4, 2, 1), nn.GroupNorm(8, channels * 2), nn.LeakyReLU(0.2)]
            channels *= 2
        blocks.append(nn.Conv2d(channels, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self.net(images_BCHW)  # (B, 1, h, w) logits


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def lecam_regularizer(real_logits: torch.Tensor, fake_logits: torch.Tensor, ema: torch.Tensor,
                      decay: float = 0.999, means: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """LeCam regulariser (Tseng et al., 2021): keeps D(real) and D(fake) near each other's moving
    average. ``ema`` = [EMA of mean D(real), EMA of mean D(fake)]; returns (reg, updated ema).
    ``means`` = [mean D(real), mean D(fake)] to average in (default: these logits'; data-parallel
    training passes the global batch's, so every process keeps the same averages)."""
    if means is None:
        means = torch.stack([real_logits.mean(), fake_logits.mean()])
    ema = ema * decay + means.detach() * (1 - decay)
    reg = F.relu(real_logits - ema[1]).pow(2).mean() + F.relu(ema[0] - fake_logits).pow(2).mean()
    return reg, ema


class VGGPerceptual(nn.Module):
    """Perceptual distance in VGG16 feature space (relu1_2, relu2_2, relu3_3, relu4_3), each
    layer's features unit-normalised over channels as in LPIPS, squared error averaged."""

    LAYER_ENDS = (4, 9, 16, 23)  # indices after relu1_2, relu2_2, relu3_3, relu4_3 in vgg16.features

    def __init__(self, features: nn.Sequential) -> None:
        super().__init__()
        self.features = features[: self.LAYER_ENDS[-1]].eval()
        for p in self.features.parameters():
            p.requires_grad_(False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = (x + 1) / 2
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return (x - self.mean) / self.std

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        x, y = self._prep(a), self._prep(b)
        total, start = a.new_zeros(()), 0
        for end in self.LAYER_ENDS:
            block = self.features[start:end]
            x, y = block(x), block(y)
            fx = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            fy = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (fx - fy).pow(2).sum(1).mean()
            start = end
        return total


def build_perceptual(network: str, weights: str, param_name: str) -> Optional[nn.Module]:
    """The perceptual network, or None. Weights are never downloaded: a missing file is an error."""
    if network == "none":
        return None
    if network != "vgg16":
        raise ValueError(f"unknown perceptual network {network!r} (none | vgg16)")
    path = Path(weights) if weights else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"perceptual network vgg16 needs its ImageNet weights file {weights or '(unset)'}: set {param_name} to "
            f"torchvision's vgg16-397923af.pth (download.pytorch.org/models/vgg16-397923af.pth on a machine with "
            f"internet), or set the perceptual weight to 0 and the network to none"
        )
    from torchvision.models import vgg16

    model = vgg16(weights=None)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return VGGPerceptual(model.features)
