"""ResNet12: the few-shot ResNet of MetaOptNet / RFS (without DropBlock), prunable per conv."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..submodel import Layout
from .layout import ModuleLayout
from .units import ConvBN, MaxPool2, each_batch

WIDTH_MULTIPLIERS = (1.0, 2.5, 5.0, 10.0)  # 64-160-320-640 at width 64


class ResNet12Block(nn.Module):
    """Three conv3x3-BN units (LeakyReLU between) plus a conv1x1-BN shortcut, LeakyReLU, max-pool 2."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.unit1 = ConvBN(in_channels, out_channels, 3)
        self.unit2 = ConvBN(out_channels, out_channels, 3)
        self.unit3 = ConvBN(out_channels, out_channels, 3)
        self.shortcut = ConvBN(in_channels, out_channels, 1)
        self.pool = MaxPool2()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.unit1(x), 0.1)
        out = F.leaky_relu(self.unit2(out), 0.1)
        out = self.unit3(out) + self.shortcut(x)
        return self.pool(F.leaky_relu(out, 0.1))

    def describe(self, spec: ModuleLayout, name: str, group: str, in_group: str | None) -> str:
        """conv1 and conv2 prune independently; conv3 and the shortcut are summed, so they share
        the block's output group. Returns that group."""
        conv1 = spec.group(f"{group}.conv1", self.unit1.out_channels)
        conv2 = spec.group(f"{group}.conv2", self.unit2.out_channels)
        out = spec.group(group, self.unit3.out_channels)
        self.unit1.describe(spec, f"{name}.unit1", conv1, in_group)
        self.unit2.describe(spec, f"{name}.unit2", conv2, conv1)
        self.unit3.describe(spec, f"{name}.unit3", out, conv2)
        self.shortcut.describe(spec, f"{name}.shortcut", out, in_group)
        return out


class ResNet12(nn.Module):
    """Four ResNet12 blocks of widths [1, 2.5, 5, 10] * width, then global average pooling.

    Each block halves the resolution: 28x28 Omniglot ends at 1x1, 84x84 images at 5x5.
    """

    def __init__(self, in_channels: int = 1, width: int = 64, prefix: str = "backbone"):
        super().__init__()
        self.prefix = prefix
        self.widths = [round(m * width) for m in WIDTH_MULTIPLIERS]
        blocks, channels = [], in_channels
        for w in self.widths:
            blocks.append(ResNet12Block(channels, w))
            channels = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def out_group(self) -> str:
        return f"{self.prefix}.block{len(self.widths) - 1}"

    @property
    def out_features(self) -> int:
        return self.widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one batch ``(n, C, H, W)``, or of E batches ``(E, n, C, H, W)`` apart."""
        if images.ndim == 5:
            return each_batch(self, images)
        return self.pool(self.blocks(images)).flatten(1)

    def layout(self) -> Layout:
        spec = ModuleLayout(self.prefix)
        group = None
        for i, block in enumerate(self.blocks):
            group = block.describe(spec, f"blocks.{i}", f"block{i}", group)
        return spec.build()
