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
