"""Mask policies M(x_q, r_i): which channels of each group a client of capacity r keeps.

Policies run on the server, from the capacity a client reports, so the downlink carries
only the slices. All but ``random`` are *nested*: a smaller capacity keeps a subset of what a
larger one keeps, which keeps the always-covered core as large as possible (high C*).
Index maps that depend only on (size, capacity) are computed once and cached, HeteroFL-style.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Mapping

import numpy as np
import torch

from .submodel import Layout, kept_count


@lru_cache(maxsize=4096)
def _prefix(size: int, k: int) -> torch.Tensor:
    return torch.arange(k)


@lru_cache(maxsize=4096)
def _window(size: int, k: int, offset: int) -> torch.Tensor:
    return torch.sort((offset + torch.arange(k)) % size).values


class MaskPolicy:
    """Chooses kept indices of one channel group. Subclasses override ``indices``."""

    name = "base"

    def begin_round(self, iteration: int, tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout]) -> None:
        """Hook for policies that look at the current global model (importance)."""

    def indices(self, group: str, size: int, capacity: float, iteration: int, client: int) -> torch.Tensor:
        raise NotImplementedError


class FullMask(MaskPolicy):
    """Masking off: every client trains all of this side (e.g. hyperparameters)."""

    name = "off"

    def indices(self, group, size, capacity, iteration, client):
        return _prefix(size, size)


class StaticMask(MaskPolicy):
    """The first ceil(r * C) channels, always (HeteroFL)."""

    name = "static"

    def indices(self, group, size, capacity, iteration, client):
        return _prefix(size, kept_count(capacity, size))


class RollingMask(MaskPolicy):
    """A window that advances ``step`` channels a round and wraps around (FedRolex).

    All clients share the round's offset, so windows are nested across capacities and
    every channel is trained by the large clients within size/step rounds.
    """

    name = "rolling"

    def __init__(self, step: int = 1):
        self.step = step

    def indices(self, group, size, capacity, iteration, client):
        return _window(size, kept_count(capacity, size), (iteration * self.step) % size)


class StaggeredMask(MaskPolicy):
    """Client i keeps the window starting at i * ceil(r * C): placement that sets the coverage.

    With equal capacities r = 1/k, clients 0..k-1 hold disjoint windows (C* = 1) and 2k clients
    hold every window twice (C* = 2): the controlled placement of the paper's C_x* study.
    """

    name = "staggered"

    def indices(self, group, size, capacity, iteration, client):
        k = kept_count(capacity, size)
        return _window(size, k, (client * k) % size)


class RandomMask(MaskPolicy):
    """A fresh random subset per round, client and group, seeded so runs repeat."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def indices(self, group, size, capacity, iteration, client):
        entropy = [self.seed, iteration, client, zlib.crc32(group.encode())]
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(entropy).generate_state(1)[0]))
        return torch.sort(torch.randperm(size, generator=gen)[: kept_count(capacity, size)]).values


class ImportanceMask(MaskPolicy):
    """Top channels by the L2 norm of every weight slice that touches them (nested ranking)."""

    name = "importance"

    def __init__(self):
        self._ranking: dict[str, torch.Tensor] = {}

    def begin_round(self, iteration, tensors, layouts):
        scores: dict[str, torch.Tensor] = {}
        for layout in layouts.values():
            for name, dim_groups in layout.dims.items():
                t = tensors[name].detach().float()
                for dim, group in enumerate(dim_groups):
                    if group is None:
                        continue
                    other = [d for d in range(t.ndim) if d != dim]
                    s = t.pow(2).sum(dim=other) if other else t.pow(2)
                    scores[group] = scores.get(group, 0) + s
        # stable descending order: ties keep the lower index first
        self._ranking = {g: torch.sort(-s, stable=True).indices for g, s in scores.items()}

    def indices(self, group, size, capacity, iteration, client):
        ranking = self._ranking.get(group)
        if ranking is None:
            ranking = torch.arange(size)
        return torch.sort(ranking[: kept_count(capacity, size)]).values


POLICIES = {cls.name: cls for cls in (FullMask, StaticMask, RollingMask, StaggeredMask, RandomMask, ImportanceMask)}


def make_policy(name: str, seed: int = 0, rolling_step: int = 1) -> MaskPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown mask policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "random":
        return RandomMask(seed)
    if name == "rolling":
        return RollingMask(rolling_step)
    return POLICIES[name]()


def build_plan(
    layouts: Mapping[str, Layout],
    policies: Mapping[str, MaskPolicy],
    capacity: float,
    iteration: int,
    client: int,
) -> dict[str, torch.Tensor]:
    """One client's submodel: kept indices for every group, each side by its own policy."""
    plan: dict[str, torch.Tensor] = {}
    for side, layout in layouts.items():
        for group, size in layout.groups.items():
            plan[group] = policies[side].indices(group, size, capacity, iteration, client)
    return plan

