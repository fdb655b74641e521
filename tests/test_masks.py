"""Mask policies: nesting, wrap-around, seeding and importance ranking."""

from __future__ import annotations

import pytest
import torch

from rabo_flwr.masks import ImportanceMask, RandomMask, RollingMask, StaticMask, make_policy
from rabo_flwr.submodel import kept_count
from rabo_flwr.models import Conv4

CAPACITIES = [1.0, 0.5, 0.25, 0.125, 0.0625]


@pytest.mark.parametrize("policy", [StaticMask(), RollingMask(step=3)])
def test_nested_across_capacities(policy):
    for iteration in range(0, 40, 7):
        kept = [set(policy.indices("g", 64, r, iteration, client=i).tolist()) for i, r in enumerate(CAPACITIES)]
        assert [len(k) for k in kept] == [64, 32, 16, 8, 4]
        assert all(small <= big for big, small in zip(kept, kept[1:]))


def test_rolling_window_advances_and_wraps():
    policy = RollingMask(step=1)
    assert policy.indices("g", 8, 0.5, 0, 0).tolist() == [0, 1, 2, 3]
    assert policy.indices("g", 8, 0.5, 1, 0).tolist() == [1, 2, 3, 4]
    assert policy.indices("g", 8, 0.5, 6, 0).tolist() == [0, 1, 6, 7]
    covered = set()
    for q in range(8):
        covered |= set(policy.indices("g", 8, 0.25, q, 0).tolist())
    assert covered == set(range(8))


def test_random_is_seeded_per_round_and_client():
    policy = RandomMask(seed=1)
    a = policy.indices("g", 64, 0.25, 3, 2)
    assert torch.equal(a, RandomMask(seed=1).indices("g", 64, 0.25, 3, 2))
    assert not torch.equal(a, policy.indices("g", 64, 0.25, 4, 2))
    assert not torch.equal(a, policy.indices("g", 64, 0.25, 3, 5))
    assert len(set(a.tolist())) == 16


def test_importance_keeps_the_largest_channels_nested():
    model = Conv4(1, 8)
    layout = model.layout()
    tensors = {n: torch.zeros(t.shape) for n, t in model.state_dict().items() if n in layout.dims}
    tensors["blocks.0.0.conv.weight"][[6, 2, 5]] = torch.tensor([3.0, 2.0, 1.0]).view(3, 1, 1, 1)
    policy = ImportanceMask()
    policy.begin_round(0, tensors, {"x": layout}, layout.groups)
    assert policy.indices("backbone.block0", 8, 0.25, 0, 0).tolist() == [2, 6]
    assert policy.indices("backbone.block0", 8, 0.375, 0, 0).tolist() == [2, 5, 6]


def test_off_keeps_everything_and_unknown_policy_is_named():
    assert make_policy("off").indices("g", 10, 0.1, 0, 0).tolist() == list(range(10))
    with pytest.raises(ValueError, match="'bogus'"):
        make_policy("bogus")


def test_placed_windows_set_the_coverage():
    staggered = make_policy("placed")  # no placement: client i keeps window i
    windows = [set(staggered.indices("g", 16, 0.25, 0, client).tolist()) for client in range(8)]
    assert all(len(w) == 4 for w in windows)
    assert set().union(*windows[:4]) == set(range(16)) and sum(len(w) for w in windows[:4]) == 16
    assert windows[:4] == windows[4:]

    def coverage(placement):
        policy = make_policy("placed", placement=placement)
        counts = torch.zeros(16)
        for client in range(len(placement)):
            counts[policy.indices("g", 16, 0.25, 3, client)] += 1
        return counts

    once = coverage([0, 1, 2, 3, 0, 0, 0, 0])  # the C_x* = 1 arm of the paper's study
    twice = coverage([0, 1, 2, 3, 0, 1, 2, 3])  # the C_x* = 2 arm: same clients, same capacity
    assert once.min() == 1 and once.max() == 5 and once.sum() == twice.sum() == 32
    assert torch.equal(twice, torch.full((16,), 2.0))


def scored_conv4(width=8, seed=0):
    """A Conv4's x tensors with random weights: distinct channel magnitudes in every layer."""
    model = Conv4(1, width)
    layout = model.layout()
    gen = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(t.shape, generator=gen) * (1 + torch.rand(t.shape[0], *([1] * (t.ndim - 1)), generator=gen))
               for n, t in model.state_dict().items() if n in layout.dims}
    return layout, tensors


def test_oap_keeps_a_magnitude_core_and_a_band_placed_by_the_client():
    layout, tensors = scored_conv4(width=16)
    policy = make_policy("oap")
    policy.begin_round(0, tensors, {"x": layout}, layout.groups)
    importance = make_policy("importance")
    importance.begin_round(0, tensors, {"x": layout}, layout.groups)
    group = "backbone.block1"
    ranking = importance.ranking(group, 16).tolist()  # channels by L2 norm, largest first
    for client in range(4):
        kept = policy.indices(group, 16, 0.25, 0, client).tolist()  # k = 4: core 2, band 2
        band = [ranking[2 + (client * 2 + i) % 14] for i in range(2)]
        assert sorted(kept) == sorted(ranking[:2] + band)
    bands = [set(policy.indices(group, 16, 0.25, 0, c).tolist()) - set(ranking[:2]) for c in range(7)]
    assert set().union(*bands) == set(ranking[2:])  # clients of one capacity cover every other channel
    assert policy.indices(group, 16, 1.0, 0, 3).tolist() == list(range(16))


def test_fiarse_ranks_channels_globally_by_mean_magnitude():
    layout, tensors = scored_conv4(width=16, seed=1)
    policy = make_policy("fiarse")
    policy.begin_round(0, tensors, {"x": layout}, layout.groups)
    magnitude = {g: tensors[f"blocks.{i}.0.conv.weight"].abs().mean(dim=(1, 2, 3)) for i, g in enumerate(layout.groups)}
    for capacity in (0.5, 0.25, 0.0625):
        kept = {g: set(policy.indices(g, 16, capacity, 0, 0).tolist()) for g in layout.groups}
        assert sum(len(k) for k in kept.values()) == 4 * kept_count(capacity, 16)  # the per-layer budget, in total
        assert all(len(k) >= 1 for k in kept.values())
        # a definition check: every kept channel beyond each group's best beats every dropped one
        best = {g: int(magnitude[g].argmax()) for g in kept}
        extra = [float(magnitude[g][c]) for g, k in kept.items() for c in k if c != best[g]]
        dropped = [float(magnitude[g][c]) for g, k in kept.items() for c in range(16) if c not in k]
        assert min(extra, default=float("inf")) >= max(dropped)
    bigger = {g: set(policy.indices(g, 16, 0.5, 0, 0).tolist()) for g in layout.groups}
    smaller = {g: set(policy.indices(g, 16, 0.25, 0, 0).tolist()) for g in layout.groups}
    assert all(smaller[g] <= bigger[g] for g in layout.groups)  # nested
    sizes = {len(k) for k in smaller.values()}
    assert len(sizes) > 1  # layers keep different fractions: a global, not per-layer, threshold
