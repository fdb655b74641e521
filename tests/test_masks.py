"""Mask policies: nesting, wrap-around, seeding and importance ranking."""

from __future__ import annotations

import pytest
import torch

from rabo_flwr.masks import ImportanceMask, RandomMask, RollingMask, StaticMask, make_policy
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
    policy.begin_round(0, tensors, {"x": layout})
    assert policy.indices("backbone.block0", 8, 0.25, 0, 0).tolist() == [2, 6]
    assert policy.indices("backbone.block0", 8, 0.375, 0, 0).tolist() == [2, 5, 6]


def test_off_keeps_everything_and_unknown_policy_is_named():
    assert make_policy("off").indices("g", 10, 0.1, 0, 0).tolist() == list(range(10))
    with pytest.raises(ValueError, match="'bogus'"):
        make_policy("bogus")


def test_staggered_placement_sets_coverage():
    policy = make_policy("staggered")
    windows = [set(policy.indices("g", 16, 0.25, 0, client).tolist()) for client in range(8)]
    assert all(len(w) == 4 for w in windows)
    assert set().union(*windows[:4]) == set(range(16)) and sum(len(w) for w in windows[:4]) == 16
    assert windows[:4] == windows[4:]
