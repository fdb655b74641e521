"""Conv4: the standard few-shot backbone, four 3x3 conv blocks of equal width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..submodel import Layout
from .layout import ModuleLayout
from .units import ConvBN, MaxPool2, each_batch


class Conv4(nn.Module):
    """conv3x3 -> BatchNorm -> ReLU -> max-pool 2, four times, then global average pooling.

    BatchNorm always normalises with the batch's own statistics (``track_running_stats=False``),
    the usual transductive choice in few-shot learning: there are no running statistics to
    aggregate across submodels, and double backward through the batch statistics is exact.

    Images ``(n, C, H, W)`` are one batch (training). Images ``(E, n, C, H, W)`` are E batches
    of n, e.g. the query sets of E evaluation episodes: each is normalised with its own
    statistics, as E calls on ``(n, C, H, W)`` would, by a faster arrangement of the same
    function (:meth:`_episodes`; tests/test_evaluation.py checks it against the plain one).
    """

    def __init__(self, in_channels: int = 1, width: int = 64, prefix: str = "backbone"):
        super().__init__()
        self.prefix = prefix
        self.width = width
        blocks = []
        channels = in_channels
        for _ in range(4):
            blocks.append(
                nn.Sequential(ConvBN(channels, width, 3), nn.ReLU(), MaxPool2())
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
        if images.ndim == 5:
            return self._episodes(images)
        return self.pool(self.blocks(images)).flatten(1)

    def _episodes(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``(E, n, width)`` of E batches ``(E, n, C, H, W)``, each normalised with its own statistics.

        The same function of the weights as E calls on ``(n, C, H, W)``, arranged for speed on a
        CPU: channels-last activations, the first conv as matrix products over 3x3 patches
        (faster than a conv with one input channel), max-pooling before the BatchNorm affine map
        and ReLU (:meth:`_pooled_block`), one batch at a time (its activations stay in the cache).
        """
        return each_batch(self._batch_fast, images)

    def _batch_fast(self, images: torch.Tensor) -> torch.Tensor:
        out = images
        for i, block in enumerate(self.blocks):
            out = self._pooled_block(block[0], out, first=i == 0)
        return out.mean((2, 3))

    @staticmethod
    def _pooled_block(unit: ConvBN, x: torch.Tensor, first: bool) -> torch.Tensor:
        """conv -> BatchNorm (the batch's statistics) -> ReLU -> max-pool 2, with the pooling first.

        Per channel, normalising by the unpooled activations' statistics and the affine map are
        increasing where gamma >= 0 and decreasing where gamma < 0, and ReLU is increasing, so
        max-pooling commutes with them once the decreasing channels are negated: the conv runs
        with its weights times s = sign(gamma) (giving s u for activations u), max-pooling s u
        gives s times the max or the min of u, and gamma s (s u - s mean) / std = gamma (u - mean) / std.
        The elementwise work after the statistics runs on a quarter of the activations. The
        statistics take two passes (mean, then the mean squared deviation; the first block's
        come from its patches, :func:`_pooled_patch_conv`), as accurate as BatchNorm's own.
        """
        conv, bn = unit.conv, unit.bn
        sign = torch.where(bn.weight < 0, -1.0, 1.0).to(bn.weight)
        weight = (conv.weight * sign[:, None, None, None]).flatten(1)
        if first:
            pooled, mean, var = _pooled_patch_conv(x, weight, conv)
        else:
            signed = F.conv2d(x, weight.view_as(conv.weight), None, conv.stride, conv.padding)
            rows = signed.permute(0, 2, 3, 1).reshape(-1, signed.shape[1])  # a view of channels-last activations
            mean = rows.mean(0)
            var = (rows - mean).square_().mean(0)
            pooled = F.max_pool2d(signed, 2)
        scale = bn.weight * sign * torch.rsqrt(var + bn.eps)  # |gamma| / std
        return (pooled * scale[:, None, None]).add_((bn.bias - mean * scale)[:, None, None]).relu_()

    def layout(self) -> Layout:
        spec = ModuleLayout(self.prefix)
        previous = None
        for i in range(4):
            group = spec.group(f"block{i}", self.width)
            self.blocks[i][0].describe(spec, f"blocks.{i}.0", group, previous)
            previous = group
        return spec.build()


# Images whose unpooled first-block output is computed at once: a few hundred KB, which stays in
# the cache while its four pooling positions are folded (a set of 95 at once ran at memory speed).
PATCH_CHUNK = 8


def _pooled_patch_conv(images: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``conv`` (stride 1, same padding) with ``weight`` (out channels, in channels * k * k; no
    bias) on ``images``, max-pooled 2, as matrix products of the input's patches with the weights
    (faster than a conv with few input channels); returns the pooled output, channels-last, and
    the per-channel mean and (biased) variance of the unpooled output over the batch and positions.

    Each of the four positions of a pooling window is one product, folded into the running
    maximum, :data:`PATCH_CHUNK` images at a time (their unpooled output stays in the cache and
    is never stored). The output is linear in the patches, so its statistics follow from the
    patches' mean m and covariance S: mean = W m and variance = diag(W S W^T), with S = E[p p^T] -
    m m^T from each image's sums and products of its patches in double precision, taken chunk by
    chunk as well (for bounded pixels double precision keeps every digit that float32 returns: the
    outputs are those of the centred two-pass form, bit for bit, on 800 real evaluation sets).
    """
    n, _, h, w = images.shape
    patches = F.unfold(images, conv.kernel_size, padding=conv.padding)  # (n, C*k*k, h * w) at stride 1
    size = patches.shape[1]
    windows = patches.view(n, size, h, w)[:, :, : h // 2 * 2, : w // 2 * 2]
    grid = windows.unflatten(3, (w // 2, 2)).unflatten(2, (h // 2, 2))  # (n, size, h/2, 2, w/2, 2)
    rows = grid.permute(0, 2, 4, 3, 5, 1).reshape(-1, 4, size)  # a window's four patches, window by window
    pooled = torch.empty(rows.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
    sums = torch.empty(n, size, dtype=torch.float64, device=patches.device)  # each image's patch sums
    grams = torch.empty(n, size, size, dtype=torch.float64, device=patches.device)  # and their products
    per_image = (h // 2) * (w // 2)  # windows
    for start in range(0, n, PATCH_CHUNK):
        window = slice(start * per_image, (start + PATCH_CHUNK) * per_image)
        block = rows[window]
        out = torch.mm(block[:, 0], weight.T, out=pooled[window])
        for position in range(1, 4):
            torch.maximum(out, block[:, position] @ weight.T, out=out)
        chunk = patches[start:start + PATCH_CHUNK].double()  # few rows: double precision costs little
        torch.sum(chunk, 2, out=sums[start:start + PATCH_CHUNK])
        torch.bmm(chunk, chunk.transpose(1, 2), out=grams[start:start + PATCH_CHUNK])
    count = n * patches.shape[2]
    patch_mean = sums.sum(0) / count
    covariance = grams.sum(0) / count - torch.outer(patch_mean, patch_mean)
    wide = weight.double()
    return (pooled.view(n, h // 2, w // 2, -1).permute(0, 3, 1, 2), (wide @ patch_mean).to(weight),
            ((wide @ covariance) * wide).sum(1).to(weight))
