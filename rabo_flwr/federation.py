"""The server's state across a run, in plain PyTorch: global x and y, this iteration's submodels,
coverage-counted steps, and the checks a reply must pass before it may be aggregated.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from .aggregation import apply_step, coverage_mean
from .masks import MaskPolicy, begin_round, build_plan
from .protocol import PLAN, THRESHOLDS
from .submodel import Layout, Plan, held_layout, slice_tensors, sliced_shape

Tensors = dict[str, torch.Tensor]
SIDES = ("x", "y")


def sample_clients(partitions: Sequence[int], fraction: float, seed: int, iteration: int) -> list[int]:
    """A seeded fraction of the partitions, at least one; the same for the same (seed, iteration)."""
    ordered = sorted(partitions)
    count = max(1, math.ceil(fraction * len(ordered)))
    chosen = np.random.default_rng([seed, iteration]).choice(len(ordered), size=count, replace=False)
    return [ordered[i] for i in sorted(chosen)]


class ServerState:
    """Holds the global x and y, plans each iteration's submodels and applies coverage-counted steps.

    ``submodel`` (``algorithm.submodel``) decides what a client holds of its plan
    (:func:`~rabo_flwr.submodel.held_layout`): its slices of every side, its expected replies and the
    coverage counts follow that layout; under ``segment`` a client is also sent x and y whole.
    """

    def __init__(self, layouts: Mapping[str, Layout], x: Tensors, y: Tensors, policies: Mapping[str, MaskPolicy],
                 submodel: str = "sliced"):
        self.layouts = dict(layouts)  # x's and y's: what the mask policies plan
        self.submodel = submodel
        self.held = {side: held_layout(layout, submodel) for side, layout in layouts.items()}  # what a client holds
        self.tensors = {"x": dict(x), "y": dict(y)}
        self.policies = dict(policies)
        self.plans: dict[int, Plan] = {}
        self.follows: dict[str, str] = {}  # an algorithm's own side -> the side ("x" or "y") whose layout it has
        # decentralised methods' per-node variables: name -> tensor name -> tensor stacked over the nodes
        # (row i: partition i's copy); empty for the server-based ones (algorithms/sldbo.py)
        self.nodes: dict[str, Tensors] = {}

    def add_side(self, side: str, follows: str, tensors: Tensors | None = None) -> None:
        """A server variable shaped, sliced and aggregated like ``follows``; zeros unless ``tensors`` are given."""
        if side in self.tensors or follows not in SIDES:
            raise ValueError(f"side {side!r} following {follows!r}: names must be new and follow x or y")
        self.follows[side] = follows
        self.tensors[side] = dict(tensors) if tensors is not None else {}
        if tensors is None:
            self.reset_side(side)

    def reset_side(self, side: str) -> None:
        """Zeros of the followed side's shapes and dtypes."""
        self.tensors[side] = {n: torch.zeros_like(t) for n, t in self.tensors[self.follows[side]].items()}

    def layout(self, side: str) -> Layout:
        """What a client holds of ``side``: the held layout of x or y, or of the side it follows."""
        return self.held[self.follows.get(side, side)]

    @property
    def x(self) -> Tensors:
        return self.tensors["x"]

    @property
    def y(self) -> Tensors:
        return self.tensors["y"]

    def plan_iteration(self, iteration: int, capacities: Mapping[int, float]) -> dict[int, Plan]:
        """Submodels of this iteration's clients, from their capacities and the current global model."""
        begin_round(self.layouts, self.policies, iteration, self.x | self.y)
        self.plans = {
            client: build_plan(self.layouts, self.policies, capacity, iteration, client)
            for client, capacity in capacities.items()
        }
        return self.plans

    def slices(self, client: int, sides: Iterable[str] = SIDES) -> dict[str, Tensors]:
        """What a client receives: its slices of the current global tensors of ``sides``, and
        under ``THRESHOLDS`` the thresholds its mask policies give those tensors (FIARSE's).

        Under segment submodels x and y travel whole (the client forwards the full model and takes
        its held elements out itself) with the plan under ``PLAN``; the algorithm's own sides, which
        only the held elements' work reads, travel as held slices.
        """
        plan = self.plans[client]
        segment = self.submodel == "segment"
        arrays = {side: {n: t.clone() for n, t in self.tensors[side].items()} if segment and side in SIDES
                  else slice_tensors(self.tensors[side], self.layout(side), plan) for side in sides}
        thresholds = {name: t for side in sides if side in SIDES
                      for name, t in self.policies[side].thresholds(self.layouts[side], plan).items()}
        return arrays | ({THRESHOLDS: thresholds} if thresholds else {}) | ({PLAN: dict(plan)} if segment else {})

    def expected_shapes(self, client: int, side: str) -> dict[str, tuple[int, ...]]:
        """Shapes a client's update for ``side`` must have (used to reject malformed replies)."""
        layout = self.layout(side)
        return {n: sliced_shape(t.shape, layout.dims[n], self.plans[client]) for n, t in self.tensors[side].items()}

    def step(self, side: str, updates: Mapping[int, Mapping[str, torch.Tensor]], lr: float) -> dict[str, torch.Tensor]:
        """``side <- side - lr * coverage-mean(updates)``; uncovered elements keep their value.

        ``updates`` maps each contributing client to its update slices; returns the coverage
        counts per tensor. Clients are summed in a fixed order, so arrival order never changes
        the result.
        """
        mean, counts = self._coverage_mean(side, updates)
        self.tensors[side] = apply_step(self.tensors[side], mean, lr)
        return counts

    def assign(self, side: str, replies: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """``side <- coverage-mean(replies)`` where some client covers an element; the others keep their value.
        Returns the coverage counts per tensor, as :meth:`step` does."""
        mean, counts = self._coverage_mean(side, replies)
        self.tensors[side] = {n: torch.where(counts[n] > 0, mean[n].to(t.dtype), t) for n, t in self.tensors[side].items()}
        return counts

    def coverage(self, side: str, replies: Mapping[int, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The coverage counts of replies the server neither steps nor assigns (a gathered side): how many
        clients' replies hold each element, as :meth:`step` returns them."""
        return self._coverage_mean(side, replies)[1]

    def _coverage_mean(self, side: str, replies: Mapping[int, Mapping[str, torch.Tensor]]):
        return coverage_mean(self.tensors[side], self.layout(side), ((self.plans[c], replies[c]) for c in sorted(replies)))


def check_update(update: Mapping[str, torch.Tensor] | None, expected: Mapping[str, tuple[int, ...]]) -> str | None:
    """Why a client's update must not be aggregated (wrong names, shapes, dtype, non-finite), or None."""
    if update is None:
        return "missing update"
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


def update_rms(updates: Mapping[str, Mapping[str, torch.Tensor]]) -> float:
    """Root mean square over every element of a reply's updates: comparable across submodel sizes."""
    total = sum(float(t.double().pow(2).sum()) for side in updates.values() for t in side.values())
    count = sum(t.numel() for side in updates.values() for t in side.values())
    return math.sqrt(total / count) if count else 0.0


def divergent(rms: Mapping[int, float], factor: float) -> dict[int, float]:
    """Replies whose RMS exceeds ``factor`` times the phase's median RMS, with their ratio.

    The median is the lower median (with two replies, the smaller), so one divergent reply
    cannot drag the reference up with it; ``factor = 0`` turns the guard off.
    """
    if not factor or len(rms) < 2:
        return {}
    values = sorted(rms.values())
    reference = values[(len(values) - 1) // 2]
    if reference <= 0:  # most replies changed nothing: no scale to judge the others by
        return {}
    return {c: v / reference for c, v in rms.items() if v > factor * reference}
