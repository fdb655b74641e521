"""Building blocks shared by the prunable models."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .layout import ModuleLayout


class ConvBN(nn.Module):
    """A bias-free conv and the BatchNorm after it: the unit every ResNet here is built from.

    The conv needs no bias because the BatchNorm's shift replaces it. Like Conv4, BatchNorm
    always uses the batch's own statistics, so the unit holds no buffers to aggregate.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, track_running_stats=False)

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def describe(self, spec: ModuleLayout, name: str, out_group: str, in_group: str | None) -> None:
        """The conv's output channels and the BatchNorm's affine parameters are one group."""
        spec.conv(f"{name}.conv", out_group, in_group)
        spec.norm(f"{name}.bn", out_group)


def each_batch(forward: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """``forward`` on each of E batches ``(E, n, C, H, W)`` (each with its own BatchNorm statistics),
    stacked: ``(E, n, features)``."""
    return torch.stack([forward(batch) for batch in images])
