"""ResNet18, CIFAR variant (3x3 stem, no max-pool), prunable per channel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..submodel import Layout
from .layout import ModuleLayout
from .units import ConvBN, each_batch

STAGE_MULTIPLIERS = (1, 2, 4, 8)  # 64-128-256-512 at width 64
STAGE_STRIDES = (1, 2, 2, 2)
BLOCKS_PER_STAGE = 2


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus a shortcut, then ReLU (He et al., 2016).

    The shortcut is the identity when shapes match, else a strided conv1x1-BN.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.unit1 = ConvBN(in_channels, out_channels, 3, stride)
        self.unit2 = ConvBN(out_channels, out_channels, 3)
        self.shortcut = ConvBN(in_channels, out_channels, 1, stride) if stride != 1 or in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.unit2(F.relu(self.unit1(x)))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))

    def describe(self, spec: ModuleLayout, name: str, group: str, in_group: str) -> str:
        """Returns the block's output group. With an identity shortcut that is ``in_group``
        itself: the sum adds input channel c to output channel c, so both keep the same
        indices; a conv shortcut gives the output a group of its own, shared with conv2."""
        inner = spec.group(f"{group}.conv1", self.unit1.out_channels)
        out = in_group if self.shortcut is None else spec.group(group, self.unit2.out_channels)
        self.unit1.describe(spec, f"{name}.unit1", inner, in_group)
        self.unit2.describe(spec, f"{name}.unit2", out, inner)
        if self.shortcut is not None:
            self.shortcut.describe(spec, f"{name}.shortcut", out, in_group)
        return out


class ResNet18(nn.Module):
    """Stem conv3x3-BN-ReLU, four stages of two BasicBlocks, global average pooling.

    Identity shortcuts chain the stem and all of stage 1 into one group; each later stage's
    first block (strided, conv shortcut) opens the group the rest of that stage shares.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, prefix: str = "backbone"):
        super().__init__()
        self.prefix = prefix
        self.widths = [m * width for m in STAGE_MULTIPLIERS]
        self.stem = ConvBN(in_channels, width, 3)
        stages, channels = [], width
        for w, stride in zip(self.widths, STAGE_STRIDES):
            blocks = [BasicBlock(channels, w, stride)] + [BasicBlock(w, w, 1) for _ in range(BLOCKS_PER_STAGE - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)

    @property
    def out_group(self) -> str:
        """Found by describing the model, since identity shortcuts pass groups along."""
        return self.describe(ModuleLayout(self.prefix))

    @property
    def out_features(self) -> int:
        return self.widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Features of one batch ``(n, C, H, W)``, or of E batches ``(E, n, C, H, W)`` apart."""
        if images.ndim == 5:
            return each_batch(self, images)
        return self.pool(self.stages(F.relu(self.stem(images)))).flatten(1)

    def describe(self, spec: ModuleLayout, name: str = "") -> str:
        """Add this model's tensors (names prefixed by ``name``) to ``spec``, whose prefix must
        be this model's; returns the output group."""
        group = spec.group("stem", self.stem.out_channels)
        self.stem.describe(spec, f"{name}stem", group, None)
        for s, stage in enumerate(self.stages):
            for b, block in enumerate(stage):
                group = block.describe(spec, f"{name}stages.{s}.{b}", f"stage{s}.block{b}", group)
        return group

    def layout(self) -> Layout:
        spec = ModuleLayout(self.prefix)
        self.describe(spec)
        return spec.build()
