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
from typing import Callable, Mapping

import numpy as np
import torch

from .submodel import Layout, Plan, kept_count, sliced_shape


@lru_cache(maxsize=4096)
def _prefix(size: int, k: int) -> torch.Tensor:
    return torch.arange(k)


@lru_cache(maxsize=4096)
def _window(size: int, k: int, offset: int) -> torch.Tensor:
    return torch.sort((offset + torch.arange(k)) % size).values


def channel_scores(tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout],
                   elementwise: Callable[[torch.Tensor], torch.Tensor], weights_only: bool = False
                   ) -> dict[str, torch.Tensor]:
    """Per channel group, the sum of ``elementwise(w)`` over every slice that touches each channel.

    A channel's slices are its rows in the tensors that produce it (conv, BatchNorm) and its
    columns in the tensors that read it (the next conv, a head), across both sides;
    ``weights_only`` leaves out 1-d tensors (BatchNorm, biases).
    """
    scores: dict[str, torch.Tensor] = {}
    for layout in layouts.values():
        for name, dim_groups in layout.dims.items():
            t = tensors[name].detach().float()
            if weights_only and t.ndim < 2:
                continue
            for dim, group in enumerate(dim_groups):
                if group is None:
                    continue
                other = [d for d in range(t.ndim) if d != dim]
                s = elementwise(t).sum(dim=other) if other else elementwise(t)
                scores[group] = scores.get(group, 0) + s
    return scores


def channel_norms(tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout]) -> dict[str, torch.Tensor]:
    """Per channel group, the squared L2 norm of every weight slice that touches each channel."""
    return channel_scores(tensors, layouts, torch.square)


class MaskPolicy:
    """Chooses kept indices of one channel group. Subclasses override ``indices``."""

    name = "base"

    def begin_round(self, iteration: int, tensors: Mapping[str, torch.Tensor], layouts: Mapping[str, Layout],
                    groups: Mapping[str, int]) -> None:
        """Hook for policies that look at the current global model; ``groups`` are the ones this policy decides."""

    def indices(self, group: str, size: int, capacity: float, iteration: int, client: int) -> torch.Tensor:
        raise NotImplementedError

    def thresholds(self, layout: Layout, plan: Plan) -> dict[str, torch.Tensor]:
        """Per tensor of ``layout``, a threshold the client's training needs (only FIARSE has one)."""
        return {}


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
    """Client i keeps window ``placement[i]`` of every group (segment submodels), or window
    ``placement[i] + l * q`` of group l at iteration q (sliced ones): the placement sets the coverage.

    Windows are consecutive blocks of width k = ceil(r * C), window w starting at channel w * k
    (wrapping). With no placement given, client i keeps window i (staggered). With every capacity
    r = 1/n, clients holding windows 0..n-1 once each give C* = 1; holding each of them twice
    gives C* = 2: the controlled placement of the paper's C_x* study.

    Segment submodels (``algorithm.submodel: segment``) hold a kept channel's whole filter, so
    windows that tile each group cover all of x in every iteration without moving: the windows
    stay fixed (``rotate=False``), each client always trains the same segment, as the paper's
    study "manually control[s] which segment each client trains".

    Sliced submodels hold a weight only where both its input and output channels are kept, so
    fixed windows would train only the diagonal blocks of each conv. With ``rotate`` (what the
    scenarios get under sliced submodels) groups are numbered in layout order (x's, then y's) and
    group l's window advances l windows an iteration, so a weight between group l - 1 (its
    inputs) and group l (its outputs) is held by the clients whose input and output windows
    differ by q: every iteration trains one "diagonal" of each conv's block grid, and with k
    dividing C into n windows the n diagonals take turns, so all of x is trained within n
    iterations (for any two connected groups whose numbers differ by a gap coprime to n; in Conv4
    the gap is 1), while each iteration's coverage counts are set by the placement alone.
    """

    name = "placed"

    def __init__(self, placement: list[int] | None = None, rotate: bool = True):
        self.placement = list(placement or [])
        self.rotate = rotate
        self._number: dict[str, int] = {}

    def begin_round(self, iteration, tensors, layouts, groups):
        self._number = {g: i for i, g in enumerate(g for layout in layouts.values() for g in layout.groups)}

    def indices(self, group, size, capacity, iteration, client):
        k = kept_count(capacity, size)
        window = self.placement[client % len(self.placement)] if self.placement else client
        advance = self._number.get(group, 0) * iteration if self.rotate else 0
        return _window(size, k, ((window + advance) * k) % size)


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
        self._ranking = {g: torch.sort(-s, stable=True).indices for g, s in self.scores(tensors, layouts).items()}

    def scores(self, tensors, layouts) -> dict[str, torch.Tensor]:
        return channel_norms(tensors, layouts)

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


class ImportanceThresholdMask(ImportanceMask):
    """FIARSE (Wu et al., NeurIPS 2024), importance-aware extraction, ported to channels layer by layer.

    What FIARSE does (its paper and released code, github.com/HarliWu/FIARSE): a weight's
    importance is its magnitude |w| in the current global model; a client whose submodel may
    hold a fraction gamma of the weights keeps those with |w| >= theta, theta the magnitude of
    the last of the top gamma-fraction (top-k), so submodels are nested. The default code ranks
    all weights of the model together (one theta); ``fiarse_layerwise`` ranks each layer on its
    own (one theta per layer, each layer keeping gamma of its weights). Local training masks
    the forward pass with m = 1[|w| >= theta] and differentiates through a surrogate of m
    (dm/d|w| = 2 theta / (|w| + theta)^2), which scales the gradient of each kept weight by
    1 + 2 theta |w| / (|w| + theta)^2: up to 1.5 at the threshold, 1 far above it
    (``rabo_flwr.algorithms.episodic.fiarse_gradient_factors``). BatchNorm is not masked.

    The port: submodels here are channel-structured (a client holds whole rows and columns),
    so a client of capacity r keeps ceil(r * C) channels of every group, the top ones by the
    magnitude mass sum |w| of the weights touching each channel (its rows and columns in conv
    and head weights, BatchNorm left out), ranked within each group as in the layer-wise
    variant. A conv between two pruned groups then holds r^2 of its weights, FIARSE's gamma
    with gamma = r^2; the first conv (image inputs) and the head (class outputs) hold r. The
    layer-wise ranking is the variant chosen because a model-wise one compares magnitudes that
    PyTorch's default initialisation scales by 1/sqrt(fan-in): with it the first conv
    (fan-in 9) would outrank every channel of the later ones (fan-in 576). theta, per weight
    tensor, is FIARSE's threshold for the client's budget in that tensor: the magnitude of the
    k-th largest |w| of the global tensor, k the number of its weights the client holds; it is
    sent with the slices and the single-level client scales gradients with it
    (``rabo_flwr.algorithms.episodic``). Differences from FIARSE: whole channels instead of
    single weights, so a client also holds (and trains) weights below theta in its channels,
    and the submodel is fixed for the round, where FIARSE's mask follows |w| during local steps.
    With only channel importance to go by, the ranking is close to ``importance``'s (which sums
    squares); what sets FIARSE apart here is its threshold-scaled gradient.
    """

    name = "fiarse"

    def __init__(self):
        super().__init__()
        self._tensors: dict[str, torch.Tensor] = {}
        self._thresholds: dict[tuple[str, int], torch.Tensor] = {}  # (tensor, weights held) -> theta

    def begin_round(self, iteration, tensors, layouts, groups):
        super().begin_round(iteration, tensors, layouts, groups)
        self._tensors, self._thresholds = dict(tensors), {}

    def scores(self, tensors, layouts):
        return channel_scores(tensors, layouts, torch.abs, weights_only=True)

    def thresholds(self, layout, plan):
        out = {}
        for name, dims in layout.dims.items():
            tensor = self._tensors[name]
            if tensor.ndim < 2:
                continue
            k = math.prod(sliced_shape(tensor.shape, dims, plan))
            if (name, k) not in self._thresholds:
                magnitudes = tensor.detach().abs().flatten().float()
                self._thresholds[name, k] = torch.kthvalue(magnitudes, magnitudes.numel() - k + 1).values.reshape(1)
            out[name] = self._thresholds[name, k]
        return out


POLICIES = {cls.name: cls for cls in (FullMask, StaticMask, RollingMask, PlacedMask, RandomMask, ImportanceMask,
                                      OnlineAdaptiveMask, ImportanceThresholdMask)}


def make_policy(name: str, seed: int = 0, rolling_step: int = 1, placement: list[int] | None = None,
                rotate: bool = True) -> MaskPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown mask policy {name!r}; choose one of {sorted(POLICIES)}")
    if name == "random":
        return RandomMask(seed)
    if name == "rolling":
        return RollingMask(rolling_step)
    if name == "placed":
        return PlacedMask(placement, rotate)
    return POLICIES[name]()


def scenario_policies(scenario) -> dict[str, MaskPolicy]:
    """The mask policy of each side, as the scenario (or its algorithm) names them; ``placed``
    windows rotate only under sliced submodels (:class:`PlacedMask`)."""
    algo = scenario.algorithm
    rotate = algo.submodel == "sliced"
    return {side: make_policy(algo.mask(side), scenario.seed, algo.rolling_step, algo.placement, rotate)
            for side in ("x", "y")}


def build_plan(
    layouts: Mapping[str, Layout],
    policies: Mapping[str, MaskPolicy],
    capacity: float,
    iteration: int,
    client: int,
) -> dict[str, torch.Tensor]:
    """One client's submodel: kept indices for every group, each side by its own policy, except
    the groups a layout gives to data partitions (``Layout.owners``: the client's own index set)."""
    plan: dict[str, torch.Tensor] = {}
    for side, layout in layouts.items():
        for group, size in layout.groups.items():
            owned = layout.owners.get(group)
            plan[group] = owned[client] if owned is not None else policies[side].indices(group, size, capacity,
                                                                                           iteration, client)
    return plan


def begin_round(layouts: Mapping[str, Layout], policies: Mapping[str, MaskPolicy], iteration: int,
                tensors: Mapping[str, torch.Tensor]) -> None:
    """Let every side's policy look at the current global model before plans are built."""
    for side, policy in policies.items():
        policy.begin_round(iteration, tensors, layouts, layouts[side].groups)
