"""Mask policies M(x_q, r_i): which channels of each group a client of capacity r keeps.

Policies run on the server, from the capacity a client reports, so the downlink carries
only the slices. ``static``, ``rolling``, ``importance`` and ``fiarse`` are *nested*: a smaller
capacity keeps a subset of what a larger one keeps, which keeps the always-covered core as
large as possible (high C*); ``placed``, ``oap`` and ``random`` spread clients of one capacity
over different channels. Index maps that depend only on (size, capacity) are cached.
"""

from __future__ import annotations

import math
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


def channel_norms(tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout]) -> dict[str, torch.Tensor]:
    """Per channel group, the squared L2 norm of every weight slice that touches each channel.

    A channel's slices are its rows in the tensors that produce it (conv, BatchNorm) and its
    columns in the tensors that read it (the next conv, a head), across both sides.
    """
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
    return scores


def output_magnitudes(tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout]) -> dict[str, torch.Tensor]:
    """Per channel group, the mean |w| of the weights each channel produces (conv/linear rows).

    This is FIARSE's importance |w| at channel granularity: a mean, not a sum, so that channels
    of layers with different fan-in compare on one scale under a global threshold.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for layout in layouts.values():
        for name, dim_groups in layout.dims.items():
            t = tensors[name].detach().float()
            group = dim_groups[0] if dim_groups else None
            if group is None or t.ndim < 2:  # BatchNorm and biases are not weights to rank (as in FIARSE)
                continue
            sums[group] = sums.get(group, 0) + t.abs().sum(dim=list(range(1, t.ndim)))
            counts[group] = counts.get(group, 0) + t[0].numel()
    return {g: sums[g] / counts[g] for g in sums}


class MaskPolicy:
    """Chooses kept indices of one channel group. Subclasses override ``indices``."""

    name = "base"

    def begin_round(self, iteration: int, tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout],
                    groups: Mapping[str, int]) -> None:
        """Hook for policies that look at the current global model; ``groups`` are the ones this policy decides."""

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


class PlacedMask(MaskPolicy):
    """Client i keeps window number ``placement[i]`` of width ceil(r * C): placement that sets the coverage.

    Windows are consecutive blocks, window w starting at channel w * ceil(r * C). With no
    placement given, client i keeps window i (staggered). With every capacity r = 1/k, clients
    holding windows 0..k-1 once each give C* = 1; holding each of them twice gives C* = 2: the
    controlled placement of the paper's C_x* study.
    """

    name = "placed"

    def __init__(self, placement: list[int] | None = None):
        self.placement = list(placement or [])

    def indices(self, group, size, capacity, iteration, client):
        k = kept_count(capacity, size)
        window = self.placement[client % len(self.placement)] if self.placement else client
        return _window(size, k, (window * k) % size)


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
    """Top channels by the L2 norm of every weight slice that touches them (nested ranking).

    RABO's and RAFBO's policy: the paper "first split[s] the model according to the weight
    importance", each client taking the submodel its capacity allows. The ranking is of the
    current global model, recomputed every round.
    """

    name = "importance"

    def __init__(self):
        self._ranking: dict[str, torch.Tensor] = {}

    def begin_round(self, iteration, tensors, layouts, groups):
        # stable descending order: ties keep the lower index first
        self._ranking = {g: torch.sort(-s, stable=True).indices for g, s in channel_norms(tensors, layouts).items()}

    def ranking(self, group: str, size: int) -> torch.Tensor:
        ranking = self._ranking.get(group)
        return torch.arange(size) if ranking is None else ranking

    def indices(self, group, size, capacity, iteration, client):
        return torch.sort(self.ranking(group, size)[: kept_count(capacity, size)]).values


class OnlineAdaptiveMask(ImportanceMask):
    """OAP (Zhou et al., NeurIPS 2023, "Every Parameter Matters"), at channel granularity.

    OAP prunes the current global model online, by magnitude, every round, and gives clients of
    the same capacity *different* masks so that more of the model is covered (its convergence
    rests on the minimum coverage index). Its released code does this on weights: every mask
    keeps the largest-magnitude quarter, and each client type adds its own other quartile(s).
    Here, per channel group and with the L2 ranking of :class:`ImportanceMask`, a client that
    keeps k channels takes the top ceil(k / 2) (the shared core) and fills the rest with a
    window of the remaining ranked channels placed by its index (client * (k - core), wrapping).
    Differences: channels instead of weights, and a core of half the client's budget instead
    of a fixed quarter of the model, so that clients below capacity 1/4 still keep both parts.
    """

    name = "oap"

    def indices(self, group, size, capacity, iteration, client):
        ranking = self.ranking(group, size)
        k = kept_count(capacity, size)
        core = math.ceil(k / 2)
        band, rest = k - core, size - core
        if band == 0 or rest == 0:
            return torch.sort(ranking[:k]).values
        picked = (core + (client * band + torch.arange(band)) % rest)
        return torch.sort(torch.cat([ranking[:core], ranking[picked]])).values


class ImportanceThresholdMask(MaskPolicy):
    """FIARSE (Wu et al., NeurIPS 2024), importance-aware extraction at channel granularity.

    FIARSE keeps the weights whose magnitude |w| in the current global model reaches a
    threshold set by the client's capacity, one threshold over the whole model (global top-k),
    so submodels are nested and layers keep different fractions. Here the importance of a
    channel is the mean |w| of the weights it produces (:func:`output_magnitudes`); a client of
    capacity r keeps, over all groups this policy decides, as many channels as a per-layer
    ceil(r * C) would (so its budget matches the other policies), chosen by one global ranking,
    with at least the top channel of every group. Differences: channels instead of weights, and
    a channel budget instead of a parameter budget. FIARSE's threshold-aware gradient scaling
    is applied by the single-level client (``rabo_flwr.algorithms.single_level``).
    """

    name = "fiarse"

    def __init__(self):
        self._scores: dict[str, torch.Tensor] = {}
        self._groups: dict[str, int] = {}
        self._kept: dict[float, dict[str, torch.Tensor]] = {}

    def begin_round(self, iteration, tensors, layouts, groups):
        self._scores = output_magnitudes(tensors, layouts)
        self._groups = dict(groups)
        self._kept = {}

    def _allocate(self, capacity: float) -> dict[str, torch.Tensor]:
        """Kept channels of every group for one capacity: each group's best, then the global top."""
        budget = sum(kept_count(capacity, size) for size in self._groups.values())
        entries = []  # (score, group, channel)
        kept: dict[str, list[int]] = {}
        for group, size in self._groups.items():
            scores = self._scores.get(group, torch.zeros(size))
            order = torch.sort(-scores, stable=True).indices.tolist()
            kept[group] = [order[0]]
            entries += [(-float(scores[c]), group, c) for c in order[1:]]
        entries.sort()
        for _, group, channel in entries[: budget - len(self._groups)]:
            kept[group].append(channel)
        return {g: torch.sort(torch.tensor(c)).values for g, c in kept.items()}

    def indices(self, group, size, capacity, iteration, client):
        if capacity not in self._kept:
            self._kept[capacity] = self._allocate(capacity)
        return self._kept[capacity][group]


POLICIES = {cls.name: cls for cls in (FullMask, StaticMask, RollingMask, PlacedMask, RandomMask, ImportanceMask,
                                      OnlineAdaptiveMask, ImportanceThresholdMask)}


def make_policy(name: str, seed: int = 0, rolling_step: int = 1, placement: list[int] | None = None) -> MaskPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown mask policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "random":
        return RandomMask(seed)
    if name == "rolling":
        return RollingMask(rolling_step)
    if name == "placed":
        return PlacedMask(placement)
    return POLICIES[name]()


def scenario_policies(scenario) -> dict[str, MaskPolicy]:
    """The mask policy of each side, as the scenario (or its algorithm) names them."""
    algo = scenario.algorithm
    return {side: make_policy(algo.mask(side), scenario.seed, algo.rolling_step, algo.placement) for side in ("x", "y")}


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


def begin_round(layouts: Mapping[str, Layout], policies: Mapping[str, MaskPolicy], iteration: int,
                tensors: Mapping[str, torch.Tensor]) -> None:
    """Let every side's policy look at the current global model before plans are built."""
    for side, policy in policies.items():
        policy.begin_round(iteration, tensors, layouts, layouts[side].groups)
