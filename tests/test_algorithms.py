"""Each algorithm's client work, applied by the server, lowers the algorithm's own objective.

One client, one round, on a tiny real problem (Omniglot episodes, Conv4 width 8, or a narrow
CIFAR classifier): the objective is measured on the very data the client trained on, at its
submodel before and after the server's coverage-counted step.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clients import Client
from rabo_flwr.algorithms import ALGORITHMS
from rabo_flwr.algorithms.episodic import prototypical_loss
from rabo_flwr.federation import ServerState
from rabo_flwr.masks import scenario_policies
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
TINY = {"model.width": 8, "clients.num": 2, "algorithm.inner_steps": 4, "algorithm.alpha": 0.1, "algorithm.beta": 0.1}


def one_round(path: Path, overrides: dict, capacity: float):
    """The client's episodes/batch, its submodel before and after one server step with its reply."""
    scenario = load_scenario(path, TINY | overrides)
    torch.manual_seed(0)
    task = cached_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    if scenario.task.name == "fewshot":
        y = {k: 0.1 * torch.randn_like(v) for k, v in y.items()}  # a head that already separates something
    state = ServerState(task.layouts, x, y, scenario_policies(scenario))
    state.plan_iteration(1, {0: capacity})
    (phase,) = ALGORITHMS[scenario.algorithm.name].phases(scenario)
    before = state.slices(0)
    updates, metrics = Client(task, scenario, 0, CPU).run(phase.name, 1, state.slices(0, phase.sends))
    for side, lr in phase.steps.items():
        state.step(side, {0: updates[side]}, lr)
    return scenario, task, before, state.slices(0), metrics


def episodes(task, scenario):
    """The iteration's episode, the one every local step trains on (as the bilevel rows' phases do)."""
    return task.client_episodes(0, 1, CPU, 1)


@pytest.mark.parametrize("name", ["static", "oap", "fedrolex", "fiarse"])
def test_single_level_submodel_training_lowers_its_cross_entropy(name):
    scenario, task, before, after, _ = one_round(REPO / "scenarios" / "quickstart.yaml",
                                                 {"algorithm.name": name, "task.labels": "global"}, 0.5)

    def objective(params):
        losses = [F.cross_entropy(task.head(params["y"], task.features(params["x"], torch.cat([e.support_x, e.query_x]))),
                                  e.classes[torch.cat([e.support_y, e.query_y])]) for e in episodes(task, scenario)]
        return float(torch.stack(losses).mean())

    assert objective(after) < objective(before) - 1e-3
    assert scenario.algorithm.mask("x") == {"fedrolex": "rolling"}.get(name, name)


def test_dist_protonet_lowers_its_prototypical_loss():
    scenario, task, before, after, metrics = one_round(
        REPO / "scenarios" / "paper" / "table2" / "dist-protonet.yaml",
        {"model.backbone": "conv4", "task.n_query": 5}, 1.0)

    def objective(params):
        return float(torch.stack([prototypical_loss(task, params["x"], e) for e in episodes(task, scenario)]).mean())

    assert objective(after) < objective(before) - 1e-3
    assert metrics["y_elements"] == 0  # ProtoNet has no head to send


def test_dist_maml_lowers_its_post_adaptation_query_loss():
    """First-order MAML: the query loss after ``adapt_steps`` support steps, averaged over the episodes."""
    scenario, task, before, after, _ = one_round(
        REPO / "scenarios" / "paper" / "table2" / "dist-maml.yaml", {"model.backbone": "conv4", "task.n_query": 5}, 1.0)
    algo = scenario.algorithm

    def objective(params):
        losses = []
        for e in episodes(task, scenario):
            x, y = dict(params["x"]), dict(params["y"])
            for _ in range(algo.adapt_steps):
                leaves = [t.detach().requires_grad_(True) for t in list(x.values()) + list(y.values())]
                x, y = dict(zip(x, leaves[:len(x)])), dict(zip(y, leaves[len(x):]))
                support = F.cross_entropy(task.head(y, task.features(x, e.support_x)), e.support_y)
                grads = torch.autograd.grad(support, leaves)
                adapted = [(p - algo.adapt_lr * g).detach() for p, g in zip(leaves, grads)]
                x, y = dict(zip(x, adapted[:len(x)])), dict(zip(y, adapted[len(x):]))
            losses.append(F.cross_entropy(task.head(y, task.features(x, e.query_x)), e.query_y).detach())
        return float(torch.stack(losses).mean())

    assert objective(after) < objective(before) - 1e-3


def test_fedavg_of_the_lower_level_lowers_g_and_leaves_x_alone():
    scenario, task, before, after, _ = one_round(
        REPO / "scenarios" / "loss_tuning_mini.yaml", {"algorithm.name": "fedavg", "algorithm.estimator_options": {}}, 0.5)
    batch = task.client_batch(0, 1, CPU, scenario.algorithm.inner_steps)

    def objective(params):
        return float(torch.stack([task.lower_loss(params["x"], params["y"], b) for b in batch.lower_steps]).mean())

    assert objective(after) < objective(before) - 1e-3
    assert all(torch.equal(before["x"][k], after["x"][k]) for k in before["x"])


def test_fiarse_client_steps_along_the_threshold_scaled_gradient():
    """One local step: the reply is FIARSE's gradient, grad * (1 + 2 theta |w| / (|w| + theta)^2),
    theta the per-tensor threshold the server sent with the slices (other rules send none)."""
    overrides = {"algorithm.name": "fiarse", "task.labels": "global", "algorithm.inner_steps": 1}
    scenario, task, before, after, _ = one_round(REPO / "scenarios" / "quickstart.yaml", overrides, 0.5)
    thresholds = before["thresholds"]
    assert set(thresholds) == {n for side in ("x", "y") for n, t in before[side].items() if t.ndim >= 2}
    (episode,) = episodes(task, scenario)
    x = {k: v.clone().requires_grad_(True) for k, v in before["x"].items()}
    y = {k: v.clone().requires_grad_(True) for k, v in before["y"].items()}
    images = torch.cat([episode.support_x, episode.query_x])
    labels = episode.classes[torch.cat([episode.support_y, episode.query_y])]
    loss = F.cross_entropy(task.head(y, task.features(x, images)), labels)
    grads = dict(zip(list(x) + list(y), torch.autograd.grad(loss, list(x.values()) + list(y.values()))))
    for side in ("x", "y"):
        for name, w in before[side].items():
            expected = grads[name]
            if name in thresholds:
                theta = float(thresholds[name])
                expected = expected * (1 + 2 * theta * w.abs() / (w.abs() + theta) ** 2)
            assert torch.allclose((w - after[side][name]) / 0.1, expected, atol=1e-5), name
    static = one_round(REPO / "scenarios" / "quickstart.yaml", overrides | {"algorithm.name": "static"}, 0.5)[2]
    assert "thresholds" not in static


def test_fiarse_client_replies_finite_updates_from_the_zero_initialised_head():
    """The few-shot head starts at zero: its threshold is 0 at every capacity (0/0 in the factor)."""
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", TINY | {"algorithm.name": "fiarse", "task.labels": "global"})
    task = cached_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    assert all(not t.any() for t in y.values())
    state = ServerState(task.layouts, x, y, scenario_policies(scenario))
    state.plan_iteration(1, {0: 0.25})
    updates, _ = Client(task, scenario, 0, CPU).run("local", 1, state.slices(0))
    assert all(torch.isfinite(t).all() for side in updates.values() for t in side.values())
    assert any(t.abs().sum() > 0 for t in updates["y"].values())


@pytest.mark.parametrize("name", ["fedrolex", "dist-protonet", "dist-maml"])
def test_an_iteration_is_the_same_client_data_in_every_row(name):
    """Single-level, ProtoNet and MAML rows train on the episode the bilevel phases use, one per
    client per iteration: their reply reports that episode's examples, whatever the local steps."""
    path = REPO / "scenarios" / "paper" / "table2" / f"{name}.yaml"
    scenario, task, _, _, metrics = one_round(path, {"model.backbone": "conv4", "task.n_query": 5,
                                                     "algorithm.inner_steps": 3}, 1.0)
    batch = task.client_batch(0, 1, CPU, scenario.algorithm.inner_steps)
    (episode,) = episodes(task, scenario)
    assert torch.equal(batch.upper[0], episode.query_x) and torch.equal(batch.lower[0], episode.support_x)
    assert metrics["examples"] == batch.examples == 5 * (1 + 5)
