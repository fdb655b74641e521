"""Mask policies: nesting, wrap-around, seeding and importance ranking."""

from __future__ import annotations

import math

import pytest
import torch

from rabo_flwr.algorithms.episodic import fiarse_gradient_factors
from rabo_flwr.masks import (ImportanceMask, RandomMask, RollingMask, StaticMask, begin_round, build_plan, channel_scores,
                             make_policy)
from rabo_flwr.models import Conv4
from rabo_flwr.models.heads import LinearHead
from rabo_flwr.submodel import kept_count, numel_in_plan, sliced_shape

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


def fiarse_setup(seed=0):
    """Conv4 and a linear head with PyTorch's default (fan-in scaled) initialisation, FIARSE on both sides."""
    torch.manual_seed(seed)
    backbone, head = Conv4(1, 64), LinearHead(64, 20, "backbone.block3")
    layouts = {"x": backbone.layout(), "y": head.layout()}
    tensors = {n: t for module in (backbone, head) for n, t in module.state_dict().items()}
    policies = {"x": make_policy("fiarse"), "y": make_policy("fiarse")}
    begin_round(layouts, policies, 0, tensors)
    return layouts, tensors, policies


def test_fiarse_keeps_about_r_squared_of_every_layer_under_a_real_initialisation():
    """Under PyTorch's default init the first conv's weights are 8 times larger than the others'
    (fan-in 9 against 576), so one ranking across layers gives it every channel and leaves the
    others one each; FIARSE's layer-wise ranking keeps r^2 of every conv between pruned channels."""
    layouts, tensors, policies = fiarse_setup()
    backbone = sum(t.numel() for n, t in tensors.items() if n in layouts["x"].dims)
    for r in CAPACITIES:
        plan = build_plan(layouts, policies, r, 0, client=0)
        for name, dims in layouts["x"].dims.items():
            if tensors[name].ndim < 2:
                continue
            held = math.prod(sliced_shape(tensors[name].shape, dims, plan)) / tensors[name].numel()
            expected = r ** 2 if dims[1] is not None else r  # the first conv's inputs are the image
            assert expected / 2 <= held <= 2 * expected, (name, r, held)
        size = numel_in_plan(tensors, layouts["x"], plan) / backbone  # what the records call x_elements
        assert r ** 2 / 2 <= size <= 2 * r ** 2, (r, size)


def test_fiarse_is_nested_and_keeps_the_channels_with_most_weight_magnitude():
    layouts, tensors, policies = fiarse_setup(1)
    plans = [build_plan(layouts, policies, r, 0, client=i) for i, r in enumerate(CAPACITIES)]
    for big, small in zip(plans, plans[1:]):
        assert all(set(small[g].tolist()) <= set(big[g].tolist()) for g in big)
    mass = channel_scores(tensors, layouts, torch.abs, weights_only=True)["backbone.block1"]
    kept = plans[2]["backbone.block1"]
    dropped = sorted(set(range(64)) - set(kept.tolist()))
    assert mass[kept].min() >= mass[dropped].max()


def test_fiarse_threshold_is_the_cut_of_the_clients_budget_in_each_tensor():
    """theta = the k-th largest |w| of the global tensor, k = the weights the client holds in it:
    exactly k weights of the tensor reach it (no ties under a random initialisation)."""
    layouts, tensors, policies = fiarse_setup(2)
    plan = build_plan(layouts, policies, 0.25, 0, client=0)
    thresholds = policies["x"].thresholds(layouts["x"], plan) | policies["y"].thresholds(layouts["y"], plan)
    assert set(thresholds) == {n for n, t in tensors.items() if t.ndim >= 2}  # weights only, no BatchNorm
    for name, theta in thresholds.items():
        side = "x" if name in layouts["x"].dims else "y"
        held = math.prod(sliced_shape(tensors[name].shape, layouts[side].dims[name], plan))
        assert int((tensors[name].abs() >= theta).sum()) == held
    assert thresholds["blocks.1.0.conv.weight"] < thresholds["blocks.0.0.conv.weight"]  # per layer, not one cut


class _MaskedByThreshold(torch.autograd.Function):
    """FIARSE's mask m = 1[s >= theta] with its surrogate derivative 2 theta / (s + theta)^2 (kept weights)."""

    @staticmethod
    def forward(ctx, s, theta):
        ctx.save_for_backward(s, theta)
        return (s >= theta).to(s.dtype)

    @staticmethod
    def backward(ctx, grad):
        s, theta = ctx.saved_tensors
        return grad * 2 * theta / (s + theta) ** 2 * (s >= theta), None


def test_fiarse_gradient_factor_is_the_derivative_of_the_masked_weight():
    """Through w * m(|w|), autograd gives each kept weight the gradient times the factor."""
    w = torch.tensor([0.05, -0.2, 0.3, -1.0, 4.0], dtype=torch.float64, requires_grad=True)
    theta = torch.tensor([0.2], dtype=torch.float64)
    upstream = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    (w * _MaskedByThreshold.apply(w.abs(), theta.reshape(()))).mul(upstream).sum().backward()
    factor = fiarse_gradient_factors({"w": w}, {"w": theta})["w"]
    kept = w.abs() >= theta
    assert torch.allclose(w.grad[kept], (upstream * factor)[kept])
    assert factor[1] == pytest.approx(1.5) and 1 < factor[4] < 1.1  # 1.5 at the threshold, near 1 far above
    zero = torch.zeros(3)  # a zero-initialised head: theta = 0 at every capacity, and 0/0 in the formula
    assert torch.equal(fiarse_gradient_factors({"w": zero}, {"w": torch.zeros(1)})["w"], torch.ones(3))


def test_placed_windows_rotate_so_every_block_of_a_conv_is_trained():
    """Group l's window advances l windows an iteration: a conv from group 0 to group 1 is held
    on its diagonal (out - in = q mod 4) in iteration q, so its 16 blocks take 4 iterations, each
    block of an iteration's diagonal held by as many clients as its window has in the placement."""
    model = Conv4(1, 16)
    layout = model.layout()
    tensors = {n: torch.zeros(t.shape) for n, t in model.state_dict().items() if n in layout.dims}
    placement = [0, 1, 2, 3, 0, 0, 0, 0]
    policy = make_policy("placed", placement=placement)
    covered = torch.zeros(16, 16)
    for q in range(1, 5):
        policy.begin_round(q, tensors, {"x": layout}, layout.groups)
        counts = torch.zeros(16, 16)
        for client in range(len(placement)):
            rows = policy.indices("backbone.block1", 16, 0.25, q, client)
            cols = policy.indices("backbone.block0", 16, 0.25, q, client)
            assert rows[0] // 4 == (cols[0] // 4 + q) % 4
            counts[rows[:, None], cols] += 1
        assert sorted(counts[counts > 0].unique().tolist()) == [1, 5] and int((counts > 0).sum()) == 4 * 16
        covered += counts
    assert (covered > 0).all()
