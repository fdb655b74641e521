"""Loss tuning on long-tail CIFAR-10: the VS loss, the long-tail split, layouts, a tiny run."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rabo_flwr.hypergrad import hypergradient
from rabo_flwr.loop import run_plain
from rabo_flwr.masks import StaticMask, build_plan
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from rabo_flwr.submodel import numel_in_plan
from rabo_flwr.tasks.loss_tuning import balanced_cross_entropy, vs_loss

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "scenarios" / "loss_tuning_mini.yaml"


@pytest.fixture(scope="module")
def task():
    return cached_task(load_scenario(MINI))


def test_vs_loss_is_cross_entropy_at_neutral_hyperparameters():
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 10), torch.randint(10, (64,))
    neutral = vs_loss(logits, labels, torch.ones(10), torch.zeros(10), torch.ones(10))
    assert torch.allclose(neutral, F.cross_entropy(logits, labels), atol=1e-6)
    tuned = vs_loss(logits, labels, torch.ones(10), torch.linspace(-1, 1, 10), torch.ones(10))
    assert not torch.allclose(tuned, neutral)


def test_balanced_cross_entropy_weights_classes_equally():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    labels = torch.tensor([0, 0, 0, 0])
    logits2 = torch.cat([logits, torch.tensor([[5.0, 0.0]])])
    labels2 = torch.cat([labels, torch.tensor([1])])
    per_class = F.cross_entropy(logits2, labels2, reduction="none")
    expected = (per_class[:4].mean() + per_class[4]) / 2
    assert torch.allclose(balanced_cross_entropy(logits2, labels2), expected)


def test_long_tail_counts_and_client_splits(task):
    full = cached_task(load_scenario(MINI, {"task.train_subsample": 1.0}))
    _, labels = full._train
    counts = np.bincount(labels[full.long_tail], minlength=10)
    mu = (1 / 100) ** (1 / 9)
    assert counts.tolist() == [math.floor(5000 * mu**c + 1e-6) for c in range(10)]
    assert counts[0] == 5000 and counts[-1] == 50
    union = np.concatenate([np.concatenate(split) for split in full.client_splits])
    assert len(union) == len(set(union.tolist())) == len(full.long_tail)
    assert set(union.tolist()) == set(full.long_tail.tolist())
    for train, val in full.client_splits:
        assert 0.15 < len(val) / (len(train) + len(val)) < 0.25


def test_x_is_never_pruned_and_y_is(task):
    x, y = task.init_tensors(0)
    assert task.x_layout.groups == {}
    plan = build_plan(task.layouts, {"x": StaticMask(), "y": StaticMask()}, 0.5, 0, 0)
    assert numel_in_plan(x, task.x_layout, plan) == 30
    assert numel_in_plan(y, task.y_layout, plan) < sum(t.numel() for t in y.values()) / 2


def test_hypergradient_on_the_hyperparameters_points_downhill(task):
    """One step on x along -H lowers the validation loss at the re-solved classifier."""
    torch.manual_seed(0)
    x, y = task.init_tensors(0)
    batch = task.client_batch(0, 1, torch.device("cpu"))
    x_names, y_names = list(x), list(y)
    lower = lambda xs, ys: task.lower_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.lower) + \
        0.05 * sum(t.pow(2).sum() for t in ys)  # ridge: a strongly convex lower level for this check

    def solve(xs):
        ys = [t.clone().requires_grad_(True) for t in y.values()]
        for _ in range(150):
            grads = torch.autograd.grad(lower(xs, ys), ys)
            with torch.no_grad():
                for t, g in zip(ys, grads):
                    t -= 0.2 * g
        return [t.detach() for t in ys]

    upper = lambda xs, ys: task.upper_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.upper)
    xs = [t.clone() for t in x.values()]
    ys = solve(xs)
    h = hypergradient(upper, lower, xs, ys, method="exact", max_iter=200, damping=0.0)
    assert all(torch.isfinite(t).all() for t in h) and sum(float(t.norm()) for t in h) > 0
    stepped = [a - 0.5 * g / max(float(torch.cat([t.flatten() for t in h]).norm()), 1e-12) for a, g in zip(xs, h)]
    re_solved = solve(stepped)
    with torch.no_grad():
        assert float(upper(stepped, re_solved)) < float(upper(xs, ys))


def test_mini_run_completes_with_finite_results(task):
    records = []
    server = run_plain(load_scenario(MINI), records.append)
    assert all(torch.isfinite(t).all() for side in (server.x, server.y) for t in side.values())
    final = [r for r in records if r["phase"] == "eval"][-1]
    assert 0 <= final["test_accuracy"] <= 1 and 0 <= final["balanced_accuracy"] <= 1
    assert len(final["per_class_accuracy"]) == 10
    assert all(r["C_x*"] == 3 for r in records if r["phase"] == "outer")
