"""Backbone registry: scenario name -> constructor."""

from __future__ import annotations

from torch import nn

from .conv4 import Conv4
from .resnet12 import ResNet12
from .resnet18 import ResNet18

BACKBONES = {"conv4": Conv4, "resnet12": ResNet12, "resnet18": ResNet18}


def build_backbone(name: str, in_channels: int, width: int) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels=in_channels, width=width)
