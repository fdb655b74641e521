"""Classifier heads (the lower-level variable y in hyper-representation learning)."""

from __future__ import annotations

import torch
from torch import nn

from ..submodel import Layout
from .layout import ModuleLayout


class LinearHead(nn.Module):
    """A linear classifier over the backbone's features; its inputs follow the backbone's mask."""

    def __init__(self, in_features: int, num_classes: int, in_group: str | None, prefix: str = "head"):
        super().__init__()
        self.prefix = prefix
        self.in_group = in_group
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def layout(self) -> Layout:
        spec = ModuleLayout(self.prefix)
        spec.linear("fc", None, self.in_group)
        return spec.build()


class MLPHead(nn.Module):
    """Linear -> ReLU -> linear; its hidden units form a group of its own, pruned with y."""

    def __init__(self, in_features: int, num_classes: int, in_group: str | None, hidden: int = 64, prefix: str = "head"):
        super().__init__()
        self.prefix = prefix
        self.in_group = in_group
        self.hidden = hidden
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)))

    def layout(self) -> Layout:
        spec = ModuleLayout(self.prefix)
        hidden = spec.group("hidden", self.hidden)
        spec.linear("fc1", hidden, self.in_group)
        spec.linear("fc2", None, hidden)
        return spec.build()


def build_head(kind: str, in_features: int, num_classes: int, in_group: str | None, hidden: int = 64) -> nn.Module:
    if kind == "linear":
        return LinearHead(in_features, num_classes, in_group)
    if kind == "mlp":
        return MLPHead(in_features, num_classes, in_group, hidden)
    raise ValueError(f"unknown head {kind!r}; choose 'linear' or 'mlp'")
