"""A backbone and a linear layer to the classes as one module (one side of the bilevel problem)."""

from __future__ import annotations

import torch
from torch import nn

from ..submodel import Layout


class Classifier(nn.Module):
    """Backbone features, then a linear layer whose inputs follow the features' group.

    Used where one variable is a whole network (y in loss tuning); the class outputs are never pruned.
    """

    def __init__(self, features: nn.Module, num_classes: int):
        super().__init__()
        self.features = features
        self.fc = nn.Linear(features.out_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))

    def layout(self) -> Layout:
        inner = self.features.layout()
        dims = {f"features.{name}": groups for name, groups in inner.dims.items()}
        dims["fc.weight"] = (None, self.features.out_group)
        dims["fc.bias"] = (None,)
        return Layout(groups=dict(inner.groups), dims=dims)
