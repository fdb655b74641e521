"""Server side of one RABO/RAFBO global iteration, in plain PyTorch.

The strategy (a Flower adapter) asks this class for each client's plan and slices, ships
them, and hands back whatever replies arrived; this class does the coverage-counted updates
y <- y - beta * avg(G) and x <- x - alpha * avg(H) and reports C_x*, C_y*.
"""

from __future__ import annotations

from dataclasses import dataclass
import math
import time
from typing import Mapping, Sequence

import numpy as np
import torch

from .aggregation import Coverage, apply_step, coverage_mean, coverage_of
from .masks import MaskPolicy, build_plan
from .submodel import Layout, Plan, slice_tensors, sliced_shape

Tensors = dict[str, torch.Tensor]


@dataclass
class Reply:
    """One client's answer in a phase: its plan (known to the server) and its update slices."""

    client: int
    update: Mapping[str, torch.Tensor]


def sample_clients(partitions: Sequence[int], fraction: float, seed: int, iteration: int) -> list[int]:
    """A seeded fraction of the partitions, at least one; the same for the same (seed, iteration)."""
    ordered = sorted(partitions)
    count = max(1, math.ceil(fraction * len(ordered)))
    chosen = np.random.default_rng([seed, iteration]).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(chosen)]


class BilevelServer:
    """Holds the global x and y and applies the two phases of every global iteration."""

    def __init__(self, layouts: Mapping[str, Layout], x: Tensors, y: Tensors,
                 policies: Mapping[str, MaskPolicy], alpha: float, beta: float):
        self.layouts = dict(layouts)
        self.tensors = {"x": dict(x), "y": dict(y)}
        self.policies = dict(policies)
        self.alpha = alpha
        self.beta = beta
        self.plans: dict[int, Plan] = {}

    @property
    def x(self) -> Tensors:
        return self.tensors["x"]

    @property
    def y(self) -> Tensors:
        return self.tensors["y"]

    def plan_iteration(self, iteration: int, capacities: Mapping[int, float]) -> dict[int, Plan]:
        """Submodels of this iteration's clients, from their reported capacities."""
        every = self.tensors["x"] | self.tensors["y"]
        for policy in self.policies.values():
            policy.begin_round(iteration, every, self.layouts)
        self.plans = {
            client: build_plan(self.layouts, self.policies, capacity, iteration, client)
            for client, capacity in capacities.items()
        }
        return self.plans

    def slices(self, client: int) -> dict[str, Tensors]:
        """What a client receives: its slices of the current x and y."""
        plan = self.plans[client]
        return {side: slice_tensors(self.tensors[side], self.layouts[side], plan) for side in ("x", "y")}

    def planned_coverage(self, side: str) -> Coverage:
        """Coverage of ``side`` if every planned client replies (reported for the side a phase does not update)."""
        shapes = {n: t.shape for n, t in self.tensors[side].items()}
        ones = ((plan, {n: torch.ones(s) for n, s in self._sliced_shapes(plan, side).items()}) for plan in self.plans.values())
        return coverage_of(coverage_mean(shapes, self.layouts[side], ones)[1])

    def _sliced_shapes(self, plan: Plan, side: str) -> dict[str, tuple[int, ...]]:
        layout = self.layouts[side]
        return {n: sliced_shape(t.shape, layout.dims[n], plan) for n, t in self.tensors[side].items()}

    def expected_shapes(self, client: int, side: str) -> dict[str, tuple[int, ...]]:
        """Shapes a client's update for ``side`` must have (used to reject malformed replies)."""
        return self._sliced_shapes(self.plans[client], side)

    def _apply(self, side: str, replies: list[Reply], lr: float) -> Coverage:
        shapes = {n: t.shape for n, t in self.tensors[side].items()}
        mean, counts = coverage_mean(
            shapes, self.layouts[side], ((self.plans[r.client], r.update) for r in replies)
        )
        self.tensors[side] = apply_step(self.tensors[side], mean, lr)
        return coverage_of(counts)

    def finish_phase(self, phase: str, iteration: int, replies: list[Reply], clients: list[dict],
                     sent: int, failures: int = 0, rejected: int = 0, started: float | None = None) -> dict:
        """Apply a phase's accepted replies and describe it as one metrics record.

        ``clients`` holds each accepted client's metrics (with ``bytes_down``/``bytes_up``); the
        record gives coverage of both sides (the updated one from the replies, the other as planned).
        """
        start = time.perf_counter()
        side, other = ("y", "x") if phase == "inner" else ("x", "y")
        replies = sorted(replies, key=lambda r: r.client)  # arrival order must not change the sums
        coverage = self.apply_inner(replies) if phase == "inner" else self.apply_outer(replies)
        loss_key = "lower_loss" if phase == "inner" else "upper_loss"
        return {
            "iteration": iteration,
            "phase": phase,
            "clients_sent": sent,
            "clients_aggregated": len(replies),
            "failures": failures,
            "rejected": rejected,
            loss_key: float(np.mean([c[loss_key] for c in clients])) if clients else float("nan"),
            **coverage.as_metrics(side),
            **self.planned_coverage(other).as_metrics(other),
            "bytes_down": sum(c["bytes_down"] for c in clients),
            "bytes_up": sum(c["bytes_up"] for c in clients),
            "flops": float(sum(c["flops"] for c in clients)) if all(c["flops"] >= 0 for c in clients) else -1.0,
            "client_wall_time_max": max((c["wall_time"] for c in clients), default=0.0),
            "aggregation_time": time.perf_counter() - start,
            "wall_time": time.perf_counter() - (started if started is not None else start),
            "clients": clients,
        }

    def apply_inner(self, replies: list[Reply]) -> Coverage:
        """y_{q+1} = y_q - beta * coverage-average of G_i; uncovered elements keep their value."""
        return self._apply("y", replies, self.beta)

    def apply_outer(self, replies: list[Reply]) -> Coverage:
        """x_{q+1} = x_q - alpha * coverage-average of H_i."""
        return self._apply("x", replies, self.alpha)


def check_update(update: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a client's update must not be aggregated (wrong names, shapes, dtype, non-finite), or None."""
    if set(update) != set(expected):
        missing, extra = sorted(set(expected) - set(update)), sorted(set(update) - set(expected))
        return f"wrong array names (missing {missing}, unexpected {extra})"
    for name, shape in expected.items():
        value = update[name]
        if not torch.is_floating_point(value):
            return f"{name}: dtype {value.dtype} is not floating point"
        if tuple(value.shape) != tuple(shape):
            return f"{name}: shape {tuple(value.shape)} != expected {tuple(shape)}"
        if not torch.isfinite(value).all():
            return f"{name}: contains NaN or infinite values"
    return None
