"""The bilevel client phases on the real few-shot task: the inner phase's G and the outer hypergradient."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rabo_flwr.algorithms import ClientJob
from rabo_flwr.algorithms.bilevel import inner_phase, outer_phase
from rabo_flwr.cost import CostMeter
from rabo_flwr.federation import ServerState
from rabo_flwr.masks import make_policy
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scenario():
    return load_scenario(REPO / "scenarios" / "quickstart.yaml", {"model.width": 16, "clients.num": 2})


def server_for(task, capacity=1.0):
    x, y = task.init_tensors(0)
    y = {k: torch.randn_like(v, generator=torch.Generator().manual_seed(1)) * 0.1 for k, v in y.items()}
    state = ServerState(task.layouts, x, y, {"x": make_policy("static"), "y": make_policy("static")})
    state.plan_iteration(1, {0: capacity})
    return state


def job(scenario, task, slices):
    return ClientJob(task, scenario, 0, 1, CPU, slices["x"], slices["y"], CostMeter(CPU))


def test_inner_phase_G_sign_makes_the_server_step_descend(scenario):
    """G = (y_0 - y_T)/beta, so y - beta*G reproduces the client's descent; the paper's printed
    G = (y_T - y_0)/beta would move y the other way, up the lower-level loss."""
    task = cached_task(scenario)
    state = server_for(task)
    batch = task.client_batch(0, 1, CPU, 10)
    s = state.slices(0)
    result = inner_phase(job(scenario, task, s), steps=10, beta=0.3)
    before = float(task.lower_loss(s["x"], s["y"], batch.lower))
    state.step("y", {0: result.updates["y"]}, 0.3)
    after = float(task.lower_loss(state.x, state.y, batch.lower))
    printed = {k: s["y"][k] + 0.3 * result.updates["y"][k] for k in s["y"]}  # y - beta * (y_T - y_0)/beta
    climbed = float(task.lower_loss(s["x"], printed, batch.lower))
    assert after < before < climbed
    assert after == pytest.approx(result.metrics["lower_loss"], abs=0.05)


def test_outer_phase_hypergradient_is_the_derivative_of_phi(scenario):
    """On the real task the head's problem is strongly convex (ridge), so Phi(x) = f(x, y*(x)) is
    well defined: the exact hypergradient at (x, y*(x)) matches Phi's directional derivative along
    it (central differences, re-solving y* each time), and a step along it lowers Phi."""
    task = cached_task(scenario)
    state = server_for(task, capacity=0.5)
    batch = task.client_batch(0, 1, CPU, 1)
    x = state.slices(0)["x"]

    def solve(x):
        objective = task.lower_objective(x, batch.lower, CostMeter(CPU, count_flops=False))
        y = {k: torch.zeros_like(v, requires_grad=True) for k, v in state.slices(0)["y"].items()}
        for _ in range(400):
            grads = torch.autograd.grad(objective(y), list(y.values()))
            with torch.no_grad():
                for t, g in zip(y.values(), grads):
                    t -= 0.5 * g
        return {k: v.detach() for k, v in y.items()}

    def phi(x):
        y = solve(x)
        with torch.no_grad():
            return float(task.upper_loss(x, y, batch.upper))

    y_star = solve(x)
    result = outer_phase(job(scenario, task, {"x": x, "y": y_star}), "exact", {"max_iter": 200, "tol": 1e-6}, 1)
    h = result.updates["x"]
    assert {k: v.shape for k, v in h.items()} == {k: v.shape for k, v in x.items()}
    length = sum(float(v.pow(2).sum()) for v in h.values()) ** 0.5
    direction = {k: v / length for k, v in h.items()}
    eps = 1e-3  # small enough that Phi's curvature along h stays out of the central difference
    slope = (phi({k: x[k] + eps * direction[k] for k in x}) - phi({k: x[k] - eps * direction[k] for k in x})) / (2 * eps)
    assert slope == pytest.approx(length, rel=0.1)  # <grad Phi, h / |h|> = |h| if h = grad Phi
    assert phi({k: x[k] - 0.05 * direction[k] for k in x}) < phi(x)
    # the estimator's diagnostics travel with the reply
    assert result.metrics["hg_negative_curvature"] == 0 and result.metrics["hg_converged"] == 1
    assert result.metrics["hg_iterations"] >= 1 and result.metrics["hg_residual"] <= 1e-6
