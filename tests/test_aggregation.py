"""Coverage-counted aggregation against a brute-force loop over elements."""

from __future__ import annotations

import itertools

import torch

from rabo_flwr.aggregation import apply_step, coverage_mean, coverage_of
from rabo_flwr.masks import RandomMask, build_plan
from rabo_flwr.models import Conv4, LinearHead
from rabo_flwr.submodel import slice_tensors
from rabo_flwr.tasks.base import init_module_tensors


def brute_force(tensor_shape, dims, contributions, name):
    """Per element: the mean over the clients whose plan holds it, and how many do."""
    total = torch.zeros(tensor_shape)
    count = torch.zeros(tensor_shape)
    for plan, values in contributions:
        kept = [plan[g].tolist() if g is not None else list(range(n)) for g, n in zip(dims, tensor_shape)]
        value = values[name]
        for local in itertools.product(*[range(len(k)) for k in kept]):
            global_index = tuple(k[i] for k, i in zip(kept, local))
            total[global_index] += value[local]
            count[global_index] += 1
    return total / count.clamp(min=1), count


def test_coverage_mean_matches_brute_force_with_uncovered_elements():
    torch.manual_seed(0)
    backbone = Conv4(1, 8)
    head = LinearHead(8, 5, backbone.out_group)
    layouts = {"x": backbone.layout(), "y": head.layout()}
    x = init_module_tensors(backbone, layouts["x"])
    contributions = []
    for client, capacity in enumerate([0.25, 0.25, 0.5]):
        plan = build_plan(layouts, {"x": RandomMask(7), "y": RandomMask(7)}, capacity, iteration=1, client=client)
        sliced = slice_tensors(x, layouts["x"], plan)
        contributions.append((plan, {n: torch.randn_like(t) for n, t in sliced.items()}))
    shapes = {n: t.shape for n, t in x.items()}
    mean, counts = coverage_mean(x, layouts["x"], contributions)
    uncovered = 0
    for name, dims in layouts["x"].dims.items():
        expected_mean, expected_count = brute_force(shapes[name], dims, contributions, name)
        assert torch.allclose(mean[name], expected_mean, atol=1e-6)
        assert torch.equal(counts[name], expected_count)
        uncovered += int((expected_count == 0).sum())
    assert uncovered > 0, "the test must include elements nobody covers"
    stepped = apply_step(x, mean, lr=0.5)
    for name in x:
        untouched = counts[name] == 0
        assert torch.equal(stepped[name][untouched], x[name][untouched])
        assert torch.allclose(stepped[name][~untouched], (x[name] - 0.5 * mean[name])[~untouched])
    coverage = coverage_of(counts)
    all_counts = torch.cat([c.flatten() for c in counts.values()])
    assert coverage.min_covered == int(all_counts[all_counts > 0].min())
    assert abs(coverage.uncovered_fraction - uncovered / all_counts.numel()) < 1e-9


def test_coverage_counts_nested_capacities():
    """Static masks: the first channel is covered by every client, so C* is 1 only in the widest part."""
    backbone = Conv4(1, 16)
    layouts = {"x": backbone.layout()}
    x = init_module_tensors(backbone, layouts["x"])
    from rabo_flwr.masks import StaticMask

    contributions = []
    for client, r in enumerate([1.0, 0.5, 0.25]):
        plan = build_plan(layouts, {"x": StaticMask()}, r, 0, client)
        contributions.append((plan, {n: torch.ones_like(t) for n, t in slice_tensors(x, layouts["x"], plan).items()}))
    _, counts = coverage_mean(x, layouts["x"], contributions)
    conv = counts["blocks.1.0.conv.weight"]
    assert conv[0, 0, 0, 0] == 3 and conv[5, 5, 0, 0] == 2 and conv[15, 15, 0, 0] == 1 and conv[15, 0, 0, 0] == 1
    assert coverage_of(counts).min_covered == 1 and coverage_of(counts).uncovered_fraction == 0.0


def test_a_float64_model_is_averaged_in_float64():
    """Two clients' float64 updates 1 + 1e-12 and 1 + 3e-12 average to 1 + 2e-12 (float32 would round all
    three to 1), and the step keeps the model's dtype."""
    backbone = Conv4(1, 4)
    layouts = {"x": backbone.layout()}
    x = {n: t.double() for n, t in init_module_tensors(backbone, layouts["x"]).items()}
    plan = build_plan(layouts, {"x": RandomMask(0)}, 1.0, iteration=1, client=0)
    contributions = [(plan, {n: torch.full_like(t, 1 + e) for n, t in slice_tensors(x, layouts["x"], plan).items()})
                     for e in (1e-12, 3e-12)]
    mean, counts = coverage_mean(x, layouts["x"], contributions)
    for name in x:
        assert mean[name].dtype == torch.float64 and torch.all(counts[name] == 2)
        assert torch.all(mean[name] == ((1 + 1e-12) + (1 + 3e-12)) / 2) and torch.all(mean[name] > 1 + 1e-12)
    stepped = apply_step(x, mean, lr=1.0)
    assert all(stepped[n].dtype == torch.float64 and torch.equal(stepped[n], x[n] - mean[n]) for n in x)


def test_a_half_precision_model_is_averaged_in_float32():
    """bfloat16 updates 1 and 1 + 2^-7 average to 1 + 2^-8 in float32, which bfloat16 sums could not hold."""
    backbone = Conv4(1, 4)
    layouts = {"x": backbone.layout()}
    x = {n: t.bfloat16() for n, t in init_module_tensors(backbone, layouts["x"]).items()}
    plan = build_plan(layouts, {"x": RandomMask(0)}, 1.0, iteration=1, client=0)
    contributions = [(plan, {n: torch.full_like(t, v) for n, t in slice_tensors(x, layouts["x"], plan).items()})
                     for v in (1.0, 1 + 2 ** -7)]
    mean, _ = coverage_mean(x, layouts["x"], contributions)
    assert all(m.dtype == torch.float32 and torch.all(m == 1 + 2 ** -8) for m in mean.values())
