"""Loss tuning on long-tail CIFAR-10: the VS loss and its parametrisation, the long-tail split,
fresh mini-batches, the upper objectives, and the hypergradient against Phi itself."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rabo_flwr.hypergrad import hypergradient_with_stats
from rabo_flwr.masks import StaticMask, build_plan
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from rabo_flwr.submodel import numel_in_plan
from rabo_flwr.tasks.loss_tuning import X_NAMES, balanced_cross_entropy, hyperparameters, vs_loss

REPO = Path(__file__).resolve().parent.parent
MINI = REPO / "scenarios" / "loss_tuning_mini.yaml"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def task():
    return cached_task(load_scenario(MINI))


def test_vs_loss_is_cross_entropy_at_neutral_hyperparameters():
    torch.manual_seed(0)
    logits, labels = torch.randn(64, 10), torch.randint(10, (64,))
    w, l, delta = hyperparameters({name: torch.zeros(10) for name in X_NAMES})
    assert torch.equal(w, torch.ones(10)) and torch.equal(l, torch.zeros(10)) and torch.equal(delta, torch.ones(10))
    assert torch.allclose(vs_loss(logits, labels, w, l, delta), F.cross_entropy(logits, labels), atol=1e-6)
    tuned = vs_loss(logits, labels, w, torch.linspace(-1, 1, 10), delta)
    assert not torch.allclose(tuned, F.cross_entropy(logits, labels))


def test_every_x_maps_to_valid_hyperparameters():
    """w = C softmax(w_logits) is positive with mean 1, Delta = exp(log_Delta) positive, l free."""
    x = {name: torch.randn(10, generator=torch.Generator().manual_seed(i)) * 5 for i, name in enumerate(X_NAMES)}
    w, l, delta = hyperparameters(x)
    assert (w > 0).all() and w.mean() == pytest.approx(1.0) and (delta > 0).all() and torch.equal(l, x["l"])


def test_balanced_cross_entropy_weights_classes_equally():
    logits = torch.tensor([[5.0, 0.0], [5.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 0.0]])
    labels = torch.tensor([0, 0, 0, 0, 1])
    per_class = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(balanced_cross_entropy(logits, labels), (per_class[:4].mean() + per_class[4]) / 2)


def test_long_tail_counts_and_client_splits(task):
    full = cached_task(load_scenario(MINI, {"task.train_subsample": 1.0}))
    counts = full.class_counts
    mu = (1 / 100) ** (1 / 9)
    assert counts.tolist() == [math.floor(5000 * mu**c + 1e-6) for c in range(10)]
    assert counts[0] == 5000 and counts[-1] == 50
    union = np.concatenate([np.concatenate(split) for split in full.client_splits])
    assert len(union) == len(set(union.tolist())) == len(full.long_tail)
    assert set(union.tolist()) == set(full.long_tail.tolist())
    for train, val in full.client_splits:
        assert 0.15 < len(val) / (len(train) + len(val)) < 0.25


def test_vs_recommended_start_is_the_published_rule():
    """Delta_c = (n_c / n_max)^0.3, l_c = log(prior_c), w = 1 (github.com/orparask/VS-Loss defaults)."""
    task = cached_task(load_scenario(MINI, {"task.x_init": "vs-recommended", "task.train_subsample": 1.0}))
    x, _ = task.init_tensors(0)
    w, l, delta = hyperparameters(x)
    n = torch.tensor(task.class_counts, dtype=torch.float32)
    assert torch.allclose(delta, (n / n.max()) ** 0.3) and torch.allclose(l, torch.log(n / n.sum()))
    assert torch.allclose(w, torch.ones(10))


def test_x_is_never_pruned_and_y_is(task):
    x, y = task.init_tensors(0)
    assert task.x_layout.groups == {}
    plan = build_plan(task.layouts, {"x": StaticMask(), "y": StaticMask()}, 0.5, 0, 0)
    assert numel_in_plan(x, task.x_layout, plan) == 30
    assert numel_in_plan(y, task.y_layout, plan) < sum(t.numel() for t in y.values()) / 2


def test_a_fresh_mini_batch_for_every_inner_step(task):
    batch = task.client_batch(0, 1, CPU, steps=4)
    images = [b[0] for b in batch.lower_steps] + [batch.lower[0]]
    assert len(batch.lower_steps) == 4
    assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])
    again = task.client_batch(0, 1, CPU, steps=4)  # seeded by (seed, iteration, partition)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batch.lower_steps, again.lower_steps))
    _, val = task.client_splits[0]
    assert len(batch.upper[1]) == len(val)  # f sees the client's whole validation split


@pytest.mark.parametrize("objective,reads_x", [("balanced-ce", False), ("vs", True)])
def test_upper_objective_reads_x_only_in_the_papers_form(objective, reads_x):
    task = cached_task(load_scenario(MINI, {"task.upper_objective": objective}))
    x, y = task.init_tensors(0)
    x = {k: (v + 0.1).requires_grad_(True) for k, v in x.items()}
    y = {k: v.requires_grad_(True) for k, v in y.items()}
    batch = task.client_batch(0, 1, CPU, steps=1)
    loss = task.upper_loss(x, y, batch.upper)
    grads = torch.autograd.grad(loss, list(x.values()) + list(y.values()), allow_unused=True)[:len(x)]
    assert any(g is not None and bool(g.abs().sum() > 0) for g in grads) == reads_x


def test_hypergradient_of_the_hyperparameters_is_the_derivative_of_phi():
    """With a ridge strong enough that the classifier's problem is locally strongly convex, Phi(x) =
    f(x, y*(x)) is well defined: the exact hypergradient (no negative curvature met) matches Phi's
    directional derivative along it, and a step along it lowers Phi. Float64 throughout, so the
    result does not depend on the thread count."""
    task = cached_task(load_scenario(MINI, {"task.lower_l2": 1.0, "model.width": 4}))
    x, y0 = task.init_tensors(0)
    x = {k: v.double() + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
         for k, v in x.items()}
    y0 = {k: v.double() for k, v in y0.items()}
    batch = task.client_batch(0, 1, CPU, steps=1)
    lower_batch = (batch.lower[0].double(), batch.lower[1])
    upper_batch = (batch.upper[0].double(), batch.upper[1])
    names_x, names_y = list(x), list(y0)

    def solve(x, start, steps):
        y = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        for _ in range(steps):
            grads = torch.autograd.grad(task.lower_loss(x, y, lower_batch), list(y.values()))
            with torch.no_grad():
                for t, g in zip(y.values(), grads):
                    t -= 0.5 * g
        return {k: v.detach() for k, v in y.items()}

    y = solve(x, y0, 150)

    def phi(x):  # y*(x) for x near the first point: warm-started from y*, a few steps suffice
        y_x = solve(x, y, 40)
        with torch.no_grad():
            return float(task.upper_loss(x, y_x, upper_batch))

    (*h,), info = hypergradient_with_stats(
        lambda xs, ys: task.upper_loss(dict(zip(names_x, xs)), dict(zip(names_y, ys)), upper_batch),
        lambda xs, ys: task.lower_loss(dict(zip(names_x, xs)), dict(zip(names_y, ys)), lower_batch),
        list(x.values()), list(y.values()), "exact", max_iter=300, tol=1e-8)
    assert info["negative_curvature"] == 0 and info["converged"] == 1
    length = float(torch.cat([t.flatten() for t in h]).norm())
    direction = {k: t / length for k, t in zip(names_x, h)}
    eps = 1e-3
    slope = (phi({k: x[k] + eps * direction[k] for k in x}) - phi({k: x[k] - eps * direction[k] for k in x})) / (2 * eps)
    assert slope == pytest.approx(length, rel=0.02)
    assert phi({k: x[k] - 0.1 * direction[k] for k in x}) < phi(x)


def test_a_clients_evaluation_is_its_own_validation_split(task):
    """Federated evaluation in loss tuning: accuracy and f (balanced cross-entropy) on the client's validation
    split, computed here independently from the split's images; other clients have other splits."""
    x, y = task.init_tensors(0)
    for partition in range(2):
        _, val = task.client_splits[partition]
        metrics = task.evaluate_client(partition, x, y, CPU)
        batch = task.client_batch(partition, 1, CPU, 1).upper  # the same validation split f sees in training
        with torch.no_grad():
            logits = task.classifier(y, batch[0])
        assert metrics["examples"] == len(val) == len(batch[1])
        assert metrics["val_accuracy"] == pytest.approx(float((logits.argmax(1) == batch[1]).float().mean()), abs=1e-6)
        assert metrics["val_loss"] == pytest.approx(float(task.upper_loss(x, y, batch)), rel=1e-5)
