"""Backbone registry: scenario name -> constructor."""

from __future__ import annotations

from torch import nn

from .conv4 import Conv4

BACKBONES = {"conv4": Conv4}


def build_backbone(name: str, in_channels: int, width: int) -> nn.Module:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    return BACKBONES[name](in_channels=in_channels, width=width)
