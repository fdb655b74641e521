"""Conv4: the standard few-shot backbone, four 3x3 conv blocks of equal width."""

from __future__ import annotations

import torch
from torch import nn

from ..submodel import Layout
from .layout import ModuleLayout
from .units import ConvBN


class Conv4(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> max-pool 2, four times, then global average pooling.

    BatchNorm always normalises with the batch's own statistics (``track_running_stats=False``),
    the usual transductive choice in few-shot learning: there are no running statistics to
    aggregate across submodels, and double backward through the batch statistics is exact.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, prefix: str = "backbone"):
        super().__init__()
        self.prefix = prefix
        self.width = width
        blocks = []
        channels = in_channels
        for _ in range(4):
            blocks.append(
                nn.Sequential(ConvBN(channels, width, 3), nn.ReLU(), nn.MaxPool2d(2))
            )
            channels = width
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)  # a no-op at 28x28; keeps features = channels elsewhere

    @property
    def out_group(self) -> str:
        return f"{self.prefix}.block3"

    @property
    def out_features(self) -> int:
        return self.width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(images)).flatten(1)

    def layout(self) -> Layout:
        spec = ModuleLayout(self.prefix)
        previous = None
        for i in range(4):
            group = spec.group(f"block{i}", self.width)
            self.blocks[i][0].describe(spec, f"blocks.{i}.0", group, previous)
            previous = group
        return spec.build()
