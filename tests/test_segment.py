"""Segment submodels (``algorithm.submodel: segment``): a client trains the filters of its kept
channels inside the full model, the rest frozen at the server's values.

Checked against closed forms of the restricted problem on a coupled quadratic, against sliced
submodels at capacity 1 (where both hold everything), and on a real Conv4 initialisation for the
held fractions and the C_x* study's coverage.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from clients import Client
from rabo_flwr.aggregation import coverage_of
from rabo_flwr.federation import ServerState
from rabo_flwr.masks import make_policy, scenario_policies
from rabo_flwr.protocol import INNER, OUTER, PLAN
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import AlgorithmConfig, ClientsConfig, Scenario, load_scenario, validate
from rabo_flwr.submodel import Layout, held_layout, sliced_shape
from rabo_flwr.tasks.base import BilevelTask, ClientBatch

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
D = torch.float64


class CoupledQuadratic(BilevelTask):
    """x = w (4 x 3; rows: group "out", columns: group "in"), y = v (4 x 2; rows: group "hid"), with
    every entry coupled to every other one, so that a restricted problem differs from the full one:

        g(x, y) = 0.5 y'Ay - y'(Bx + c),    f(x, y) = 0.5 ||y - b||^2 + 0.5 x'Cx

    on the flattened (row-major) w and v, A and C dense symmetric positive definite, B dense.
    """

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        m = torch.randn(8, 8, generator=gen, dtype=D)
        self.A = m @ m.T / 8 + torch.eye(8, dtype=D)
        self.B = torch.randn(8, 12, generator=gen, dtype=D)
        m = torch.randn(12, 12, generator=gen, dtype=D)
        self.C = m @ m.T / 12 + 0.5 * torch.eye(12, dtype=D)
        self.c, self.b = torch.randn(8, generator=gen, dtype=D), torch.randn(8, generator=gen, dtype=D)
        self.x_layout = Layout(groups={"out": 4, "in": 3}, dims={"w": ("out", "in")})
        self.y_layout = Layout(groups={"hid": 4}, dims={"v": ("hid", None)})
        self.num_partitions = 1

    def init_tensors(self, seed):
        gen = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(4, 3, generator=gen, dtype=D)}, {"v": torch.randn(4, 2, generator=gen, dtype=D)}

    def client_batch(self, partition, iteration, device, steps):
        return ClientBatch(lower_steps=[None] * steps, lower=None, upper=None, examples=1)

    def lower_loss(self, x, y, batch):
        w, v = x["w"].reshape(-1), y["v"].reshape(-1)
        return 0.5 * v @ self.A @ v - v @ (self.B @ w + self.c)

    def upper_loss(self, x, y, batch):
        w, v = x["w"].reshape(-1), y["v"].reshape(-1)
        return 0.5 * (v - self.b) @ (v - self.b) + 0.5 * w @ self.C @ w


def segment_scenario(name="rabo", steps=3, beta=0.2):
    algorithm = AlgorithmConfig(name=name, submodel="segment", inner_steps=steps, beta=beta,
                                estimator_options={"tol": 1e-14, "max_iter": 50})
    return validate(Scenario(algorithm=algorithm, clients=ClientsConfig(num=1, capacities=[0.5])), "test")


def test_segment_inner_step_and_hypergradient_are_the_restricted_problems_closed_forms():
    """Window 1 at capacity 1/2: the client holds rows 2, 3 of w (all 3 columns: R, flat 6..11)
    and rows 2, 3 of v (S, flat 4..7). Inner: T gradient steps on g over y_S, the rest of y fixed.
    Outer: grad_{x_R} f - H_{x_R y_S} [H_{y_S y_S}]^-1 grad_{y_S} f = (Cx)_R + B'[R, S] A_SS^-1 (y - b)_S."""
    task, scenario = CoupledQuadratic(), segment_scenario()
    x, y = task.init_tensors(0)
    placed = make_policy("placed", placement=[1], rotate=False)
    state = ServerState(task.layouts, x, y, {"x": placed, "y": placed}, "segment")
    state.plan_iteration(1, {0: 0.5})
    R, S = torch.arange(6, 12), torch.arange(4, 8)
    sent = state.slices(0)
    assert {n: t.shape for n, t in sent["x"].items()} == {"w": (4, 3)} and sent["y"]["v"].shape == (4, 2)  # whole
    assert {g: i.tolist() for g, i in sent[PLAN].items()} == {"out": [2, 3], "in": [0, 2], "hid": [2, 3]}
    client = Client(task, scenario, 0, CPU)

    updates, _ = client.run(INNER, 1, sent)
    w, v = x["w"].reshape(-1), y["v"].reshape(-1).clone()
    for _ in range(scenario.algorithm.inner_steps):
        v[S] -= scenario.algorithm.beta * (task.A @ v - task.B @ w - task.c)[S]
    G = (y["v"].reshape(-1)[S] - v[S]) / scenario.algorithm.beta
    assert updates["y"]["v"].shape == (2, 2)
    torch.testing.assert_close(updates["y"]["v"].reshape(-1), G, rtol=1e-12, atol=1e-12)
    state.step("y", {0: updates["y"]}, scenario.algorithm.beta)
    # rows 0, 1 unchanged; rows 2, 3 at y_T (the model, and so the server's step, is float32)
    torch.testing.assert_close(state.y["v"].reshape(-1), v, rtol=1e-6, atol=1e-6)
    assert torch.equal(state.y["v"][:2], y["v"][:2])

    updates, _ = client.run(OUTER, 1, state.slices(0))
    v = state.y["v"].reshape(-1)
    H_SS = task.A[S][:, S]
    restricted = (task.C @ w)[R] + task.B.T[R][:, S] @ torch.linalg.solve(H_SS, (v - task.b)[S])
    assert updates["x"]["w"].shape == (2, 3)
    torch.testing.assert_close(updates["x"]["w"].reshape(-1), restricted, rtol=1e-9, atol=1e-9)
    # the restriction matters: the full problem's hypergradient on the same rows is another number
    full = (task.C @ w) + task.B.T @ torch.linalg.solve(task.A, v - task.b)
    assert not torch.allclose(full[R], restricted, atol=1e-3)


@pytest.mark.parametrize("name", ["rabo", "rafbo"])
def test_capacity_one_segments_are_sliced_submodels(name):
    """At capacity 1 both kinds hold every element: the same replies, bit for bit, on the real few-shot task."""
    replies = {}
    for submodel in ("sliced", "segment"):
        scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml",
                                 {"model.width": 8, "clients.num": 2, "algorithm.name": name,
                                  "algorithm.inner_steps": 2, "algorithm.submodel": submodel})
        task = cached_task(scenario)
        x, y = task.init_tensors(0)
        y = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) * 0.1 for k, v in y.items()}  # a head
        state = ServerState(task.layouts, x, y, scenario_policies(scenario), submodel)
        state.plan_iteration(1, {0: 1.0})
        client = Client(task, scenario, 0, CPU)
        inner, _ = client.run(INNER, 1, state.slices(0))
        state.step("y", {0: inner["y"]}, scenario.algorithm.beta)
        outer, _ = client.run(OUTER, 1, state.slices(0))
        replies[submodel] = inner | outer
    for side in ("y", "x"):
        assert replies["sliced"][side].keys() == replies["segment"][side].keys()
        for n, t in replies["sliced"][side].items():
            assert torch.equal(t, replies["segment"][side][n]), (side, n)


def conv4_state(placement):
    """The C_x* study's real initialisation at CPU scale (Conv4, width 64) on a segment server, 8 clients at 1/4."""
    scenario = load_scenario(REPO / "scenarios" / "paper" / "cx_star" / "rabo_c1.yaml",
                             {"model.backbone": "conv4", "model.width": 64, "algorithm.placement": placement})
    task = cached_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    state = ServerState(task.layouts, x, y, scenario_policies(scenario), scenario.algorithm.submodel)
    return task, state


def test_a_segment_holds_its_kept_output_channels_a_quarter_of_every_layer():
    """Held iff the output channel is kept: a conv's weight rows (whichever inputs they read) and
    BatchNorm entries of its kept channels, so capacity 1/4 holds 1/4 of every layer (a sliced
    client holds 1/16 of a conv between two groups); the head, whose outputs are classes, whole."""
    task, state = conv4_state([0, 1, 2, 3, 0, 0, 0, 0])
    state.plan_iteration(1, dict.fromkeys(range(8), 0.25))
    plan = state.plans[2]
    layout = held_layout(task.x_layout, "segment")
    for name, t in state.x.items():
        held = math.prod(sliced_shape(t.shape, layout.dims[name], plan)) / t.numel()
        sliced = math.prod(sliced_shape(t.shape, task.x_layout.dims[name], plan)) / t.numel()
        assert held == 0.25, name
        assert sliced == (1 / 16 if task.x_layout.dims[name][1:2] not in ((), (None,)) else 0.25), name
    sent = state.slices(2)
    window = torch.arange(32, 48)  # client 2 holds window 2 (16 channels) of every group
    for name, t in sent["x"].items():
        assert torch.equal(t, state.x[name])  # sent whole: the client forwards the full model
    assert all(torch.equal(i, window) for i in sent[PLAN].values())
    assert state.expected_shapes(2, "x")["blocks.1.0.conv.weight"] == (16, 64, 3, 3)
    assert state.expected_shapes(2, "y") == {n: tuple(t.shape) for n, t in state.y.items()}


@pytest.mark.parametrize("placement,designed", [([0, 1, 2, 3, 0, 0, 0, 0], 1), ([0, 1, 2, 3, 0, 1, 2, 3], 2)])
def test_the_placements_train_all_of_x_every_iteration_with_the_designed_coverage(placement, designed):
    """Fixed windows (segments do not rotate) that tile every group: all of x covered in each iteration,
    every element by at least ``designed`` clients, and by the same clients in every iteration."""
    task, state = conv4_state(placement)
    held = []
    for q in (1, 2):
        state.plan_iteration(q, dict.fromkeys(range(8), 0.25))
        held.append({c: {g: i.tolist() for g, i in plan.items()} for c, plan in state.plans.items()})
        zeros = {c: {n: torch.zeros(s) for n, s in state.expected_shapes(c, "x").items()} for c in range(8)}
        coverage = coverage_of(state.step("x", zeros, 0.1))
        assert coverage.uncovered_fraction == 0.0 and coverage.min_covered == designed
    assert held[0] == held[1]


def test_a_failed_segment_clients_flops_are_estimated_from_a_reply_of_its_own_size(tmp_path):
    """A failed client's work is estimated from the last counted reply for a submodel of its size. Segment clients
    are all sent the whole model, so the size must be what each holds: RAFBO's capacity-1/4 client, failing at
    iteration 2, had been estimated at its capacity-1 peer's FLOPs (4 times its coordinates: 3.9 times its own)."""
    import logging

    from rabo_flwr.loop import run_plain
    from tests.test_strategy import tiny_scenario

    path = tiny_scenario(tmp_path, clients={"num": 2, "capacities": [1.0, 0.25]},
                         algorithm={"name": "rafbo", "submodel": "segment", "iterations": 2, "inner_steps": 2},
                         run={"eval_every": 0, "final_test": False,
                              "faults": [{"partition": 1, "phase": "outer", "iterations": [2], "kind": "raise"}]})
    records = [r for r in run_plain(load_scenario(path), logging.getLogger("quiet")).records if r["phase"] == "outer"]
    own = {c["partition"]: c["flops"] for c in records[0]["clients"]}
    assert own[0] > 3 * own[1]  # the sizes' FLOPs differ
    assert records[1]["failures"] == 1 and records[1]["unestimated_failures"] == 0
    assert records[1]["wasted_flops"] == own[1]
