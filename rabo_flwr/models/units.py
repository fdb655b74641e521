"""Building blocks shared by the prunable models."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
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


# Input elements from which max_pool2 takes the channels-last kernel: below it the layout copies
# and the Python autograd node cost more than that kernel saves (measured, see max_pool2).
CHANNELS_LAST_POOL_MIN = 50_000
FOLD_BELOW = 8  # channels under which _channels_last_pool folds the batch into the channels


def max_pool2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` with the same bits in the output, the gradient and the double
    backward, faster on a CPU for large inputs.

    PyTorch's CPU kernel for NCHW max-pooling walks one window at a time in scalar code; its
    channels-last kernel vectorises over channels. Both pick, in each window, the first position
    (row by row) whose value is greater than every earlier one, or the last NaN: the same test
    (``val > max || isnan(val)``, max starting at -inf), so the same index for every input, ties
    (ReLU's zeros, the blank background's equal values) included. tests/test_pooling.py checks
    every 2x2 window over signed zeros, infinities and NaN; a pooling that picked another of tied
    maxima would change 16 to 18 of a Table II client's 39 checked results. Only the output and the
    indices come from the channels-last kernel (copied back to NCHW); the backward is the NCHW
    one, ``max_pool2d_with_indices_backward`` with those indices, as ``F.max_pool2d``'s own
    autograd node calls it, so the gradient is NCHW (BatchNorm's backward reduces in the same
    order) and its double backward is the same operation as before.

    On a Table II client's real activations (1 thread, this project's 2-core AMD EPYC with AVX2;
    benchmarks/README.md, "Item 2, fourth pass"), a pooling call's forward, backward and
    double backward were 1.03 to 1.8 times faster from 54,000 elements on (95 queries at 4 channels and 28x28: 1.71 against 1.19 ms; at 64 channels 27.9 against
    22.8 ms, the copies to and from channels-last taking most of the gain at 28x28). Below
    :data:`CHANNELS_LAST_POOL_MIN` elements (small support sets, the late stages of narrow
    clients; at 27,000 to 31,000 elements it lost 10%) the copies and the Python node cost more
    than the kernel saves, and the plain call is kept; so do GPU tensors, inputs that are not
    NCHW-contiguous (the plain kernel keeps their layout) and other shapes.
    """
    if x.numel() < CHANNELS_LAST_POOL_MIN or x.ndim != 4 or x.device.type != "cpu" or not x.is_contiguous():
        return F.max_pool2d(x, 2)
    if not (torch.is_grad_enabled() and x.requires_grad):
        return _channels_last_pool(x, indices=False)[0]
    return _ChannelsLastMaxPool2.apply(x)


def _channels_last_pool(x: torch.Tensor, indices: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """2x2 max-pooling of NCHW ``x`` by the channels-last kernel: the output and (if asked) the
    indices, NCHW.

    The kernel vectorises over channels, 8 floats at a time (AVX2), and runs fewer than 8 in
    scalar code, so below :data:`FOLD_BELOW` channels (a capacity-1/16 Conv4 has 4) every
    (image, channel) plane is made a channel of one image instead: the kernel then vectorises
    over n * c: the forward for 95 queries at 4 channels took half the time of the unfolded
    route (the indices address a plane's own pixels either way). From 8 channels on, folding
    was slower than the plain channels-last copy.
    """
    n, c, h, w = x.shape
    if c >= FOLD_BELOW:
        last = x.contiguous(memory_format=torch.channels_last)
    else:
        last = x.reshape(n * c, h * w).t().contiguous().view(1, h, w, n * c).permute(0, 3, 1, 2)
    out, where = F.max_pool2d_with_indices(last, 2)
    shape = (n, c, *out.shape[2:])
    return _nchw(out).view(shape), _nchw(where).view(shape) if indices else None


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """``t`` copied with NCHW strides, also where channels-last ones pass as contiguous (1x1 maps)."""
    return t.clone(memory_format=torch.contiguous_format)


class _ChannelsLastMaxPool2(torch.autograd.Function):
    """The autograd node of :func:`max_pool2`: what ``F.max_pool2d``'s node saves and calls."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out, indices = _channels_last_pool(x, indices=True)
        ctx.save_for_backward(x, indices)  # NCHW, as the NCHW backward and its double backward read them
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        x, indices = ctx.saved_tensors
        return torch.ops.aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)


class MaxPool2(nn.Module):
    """``nn.MaxPool2d(2)`` through :func:`max_pool2`: no parameters, the same results."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return max_pool2(x)
