"""Coverage-counted aggregation of client slices into the global tensors.

Every element is averaged over exactly the clients whose submodel holds it; an element no
client covers keeps its value. Scatter-adds are vectorised with ``index_put_(accumulate=True)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from .submodel import Layout, Plan, open_index


@dataclass(frozen=True)
class Coverage:
    """Coverage of one side in a phase: the minimum count over the elements it covered (the
    paper's min over s in K_q of C_q^s; 0 when it covered none), and the fraction it left uncovered."""

    min_covered: int
    uncovered_fraction: float
    elements: int

    def as_metrics(self, side: str) -> dict[str, float]:
        return {f"min_coverage_{side}": self.min_covered, f"uncovered_{side}": self.uncovered_fraction}


def coverage_mean(
    like: Mapping[str, torch.Tensor],
    layout: Layout,
    contributions: Iterable[tuple[Plan, Mapping[str, torch.Tensor]]],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Average each element over the clients covering it; return (mean, count).

    ``like``: the global tensors; the mean has their shapes and is summed in their floating dtype, at least
    float32 (so a float64 model's server step is as exact as its clients', a half-precision one's no worse
    than float32's).
    ``mean`` is zero where ``count`` is zero, so ``x - lr * mean`` leaves uncovered elements alone.
    """
    sums = {n: torch.zeros(like[n].shape, dtype=torch.promote_types(like[n].dtype, torch.float32)
                           if like[n].is_floating_point() else torch.float32) for n in layout.dims}
    counts = {n: torch.zeros(like[n].shape) for n in layout.dims}
    for plan, values in contributions:
        for name, dim_groups in layout.dims.items():
            value = values[name].detach().to(sums[name].dtype).cpu()
            if sums[name].ndim == 0:
                sums[name] += value
                counts[name] += 1
                continue
            index = open_index(dim_groups, like[name].shape, plan)
            sums[name].index_put_(index, value, accumulate=True)
            counts[name].index_put_(index, torch.ones(value.shape), accumulate=True)
    means = {n: sums[n] / counts[n].clamp(min=1) for n in layout.dims}
    return means, counts


def coverage_of(counts: Mapping[str, torch.Tensor]) -> Coverage:
    flat = torch.cat([c.reshape(-1) for c in counts.values()]) if counts else torch.zeros(0)
    covered = flat[flat > 0]
    return Coverage(
        min_covered=int(covered.min()) if covered.numel() else 0,
        uncovered_fraction=int((flat == 0).sum()) / flat.numel() if flat.numel() else 0.0,
        elements=int(flat.numel()),
    )


def apply_step(
    tensors: Mapping[str, torch.Tensor], direction: Mapping[str, torch.Tensor], lr: float
) -> dict[str, torch.Tensor]:
    """``t - lr * direction`` for every tensor (direction is zero where nobody covered)."""
    return {n: t - lr * direction[n].to(t.dtype) for n, t in tensors.items()}
