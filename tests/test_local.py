"""Client computations on the real few-shot task: the inner phase's G and the outer hypergradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rabo_flwr.federation import BilevelServer, Reply
from rabo_flwr.local import inner_phase, outer_phase
from rabo_flwr.masks import make_policy
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def task():
    return cached_task(load_scenario(REPO / "scenarios" / "quickstart.yaml", {"model.width": 16, "clients.num": 2}))


def server_for(task, capacity=1.0):
    x, y = task.init_tensors(0)
    y = {k: torch.randn_like(v) * 0.1 for k, v in y.items()}
    policies = {"x": make_policy("static"), "y": make_policy("static")}
    server = BilevelServer(task.layouts, x, y, policies, alpha=0.1, beta=0.3)
    server.plan_iteration(1, {0: capacity})
    return server


def test_inner_phase_G_sign_makes_the_server_step_descend(task):
    """G = (y_0 - y_T)/beta, so y - beta*G reproduces the client's descent; the paper's printed
    G = (y_T - y_0)/beta would move y the other way, up the lower-level loss."""
    server = server_for(task)
    batch = task.client_batch(0, 1, torch.device("cpu"))
    s = server.slices(0)
    result = inner_phase(task, batch, s["x"], s["y"], steps=10, beta=0.3)
    before = float(task.lower_loss(s["x"], s["y"], batch.lower))
    server.apply_inner([Reply(0, result.update)])
    after = float(task.lower_loss(server.x, server.y, batch.lower))
    printed = {k: s["y"][k] + 0.3 * result.update[k] for k in s["y"]}  # y - beta * (y_T - y_0)/beta
    climbed = float(task.lower_loss(s["x"], printed, batch.lower))
    assert after < before < climbed
    assert after == pytest.approx(result.metrics["lower_loss"], abs=0.05)


def test_outer_phase_returns_slices_and_descends_the_upper_loss(task):
    server = server_for(task, capacity=0.5)
    batch = task.client_batch(0, 1, torch.device("cpu"))
    s = server.slices(0)
    result = outer_phase(task, batch, s["x"], s["y"], "exact", {"max_iter": 50})
    assert {k: v.shape for k, v in result.update.items()} == {k: v.shape for k, v in s["x"].items()}
    assert all(torch.isfinite(v).all() for v in result.update.values())
    stepped = {k: s["x"][k] - 1e-2 * result.update[k] for k in s["x"]}
    assert float(task.upper_loss(stepped, s["y"], batch.upper)) < result.metrics["upper_loss"]
