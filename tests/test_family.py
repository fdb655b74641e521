"""The federated bilevel family on the loop: FedNest and LFedNest (rabo_flwr/algorithms/fednest.py), SimFBO,
ShroFBO and MemFBO (rabo_flwr/algorithms/simfbo.py), AggITD (rabo_flwr/algorithms/aggitd.py). Per method: one
iteration against a hand computation on a two-client problem, convergence on the quadratic task, and the
Flower path giving the plain engine's records."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from flwr.serverapp.strategy import Strategy

from rabo_flwr.algorithms import ALGORITHMS
from rabo_flwr.federation import ServerState
from rabo_flwr.hypergrad import _Oracle
from rabo_flwr.loop import PlainRunner, TrainingLoop, run_plain
from rabo_flwr.masks import scenario_policies
from rabo_flwr.results import read_metrics
from rabo_flwr.scenario import load_scenario
from rabo_flwr.tasks.quadratic import ClientProblem, QuadraticTask
from strategies import BilevelFamily, strategy_for
from tests.test_quadratic import last_eval, run, small
from tests.test_flower_e2e import home  # noqa: F401 - a fixture
from tests.test_strategy import one_thread, run_flower, stable  # noqa: F401 - one_thread is a fixture

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
QUIET = logging.getLogger("quiet")


def two_client_problem() -> list[ClientProblem]:
    """NOTES.md's P2 in the quadratic task's terms: g_i = 0.5 A_i y^2 - B_i x y, f_i = 0.5 (y - b_i)^2 + 0.5 x^2
    with A = (1, 3), B = (2, 0), b = (1, 3), c = 0: y*(x) = x / 2, grad F(x) = 1.25 x - 1, x* = 0.8."""
    def scalar(v):
        return torch.tensor([[v]], dtype=torch.float64)
    return [ClientProblem(scalar(1.0), scalar(2.0), torch.zeros(1, dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)),
            ClientProblem(scalar(3.0), scalar(0.0), torch.zeros(1, dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64))]


def one_iteration(tmp_path: Path, name: str, local_steps: list[int] | None = None, **algorithm):
    """One iteration of ``name`` on P2 from x = 1, y = 0 (v = 0) through the loop and the plain engine:
    (records, state)."""
    path = small(tmp_path, task={"channels": 1, "x_dim": 1, "y_dim": 1, "upper_l2": 1.0},
                 clients={"num": 2, "capacities": [1.0], "local_steps": local_steps or []},
                 algorithm={"name": name, "iterations": 1, "inner_steps": 2, "beta": 0.25, "alpha": 0.5,
                            "neumann_terms": 2, "neumann_step": 0.25, **algorithm},
                 run={"eval_every": 0, "final_test": False})
    scenario = load_scenario(path)
    task = QuadraticTask(scenario)
    task.problems = two_client_problem()  # the cached property's value, set before anything reads it
    loop = TrainingLoop(scenario, task, PlainRunner(scenario, task, CPU), CPU, QUIET)
    result = loop.run(initial=({"x": torch.ones(1, 1)}, {"y": torch.zeros(1, 1)}))
    return result.records, result.state


def value(state, side: str) -> float:
    follows = {"q": "y", "p": "y", "v": "y", "u": "y", "h": "x"}
    return float(state.tensors[side][side if side in ("x", "y") else follows[side]])


def test_a_side_follows_its_sides_submodel_and_assign_keeps_what_no_client_holds():
    """A y-shaped side is sliced by y's plan; assign sets each row to the mean over the clients holding it
    (static masks, capacities 1/2 and 1/4 of 16 rows: rows 0-3 both, 4-7 one, 8-15 none, kept)."""
    scenario = load_scenario(REPO / "scenarios" / "quadratic" / "base.yaml", {"algorithm.mask_x": "static"})
    task = QuadraticTask(scenario)
    x, y = task.init_tensors(0)
    state = ServerState(task.layouts, x, y, scenario_policies(scenario))
    state.add_side("v", "y", {"y": torch.full((16, 6), 7.0)})
    state.plan_iteration(1, {0: 0.5, 1: 0.25})
    assert state.slices(1, ("v",))["v"]["y"].shape == (4, 6) and state.expected_shapes(0, "v") == {"y": (8, 6)}
    counts = state.assign("v", {0: {"y": torch.full((8, 6), 1.0)}, 1: {"y": torch.full((4, 6), 3.0)}})
    rows = state.tensors["v"]["y"][:, 0].tolist()
    assert rows == [2.0] * 4 + [1.0] * 4 + [7.0] * 8 and counts["y"][:, 0].tolist() == [2.0] * 4 + [1.0] * 4 + [0.0] * 8
    state.reset_side("v")
    assert not state.tensors["v"]["y"].any() and torch.equal(state.y["y"], y["y"])


def test_fednest_one_iteration_matches_the_hand_computation(tmp_path):
    """T = 1, tau = 2, beta = 1/4, N = 2, eta = 1/4, tau_out = 2, alpha = 1/2 (NOTES.md 1.6):
    q = mean(A_i 0 - B_i 1) = -1; FedSVRG's local steps give 7/16 and 5/16, y+ = 3/8 (two GD steps on
    the mean g); b = mean(y+ - b_i) = -13/8; v = eta sum_{n<=2} (1 - 2 eta)^n b = -91/128; h_i = x + B_i v,
    h = 37/128; the local x-steps (J constant) give x - 2 alpha h = 401/512 on both clients."""
    records, state = one_iteration(tmp_path, "fednest", outer_steps=2)
    phases = [r["phase"] for r in records if "clients_sent" in r]
    assert phases == ["inner_grad", "inner", "ihgp_grad", "ihgp.1", "ihgp.2", "hypergrad", "outer"]  # 2T + N + 3
    expected = {"q": -1.0, "y": 0.375, "v": -0.7109375, "h": 0.2890625, "x": 0.783203125}
    assert {side: value(state, side) for side in expected} == pytest.approx(expected, abs=1e-6)


def test_fednest_with_one_local_x_step_steps_x_in_the_hypergradient_round(tmp_path):
    """tau_out = 1: x+ = x - alpha h = 1 - 37/256, in 2T + N + 2 rounds and without the side h."""
    records, state = one_iteration(tmp_path, "fednest", outer_steps=1)
    assert [r["phase"] for r in records if "clients_sent" in r][-1] == "hypergrad"
    assert "h" not in state.tensors
    assert value(state, "x") == pytest.approx(1 - 0.5 * 0.2890625, abs=1e-6)


@pytest.mark.parametrize("outer_steps,x_next", [
    # client i: h_i(x) = x + B_i v_i with v_1 = eta sum_{n<=2} (1 - eta)^n (7/16 - 1) = -333/1024, v_2 = ...,
    # B_2 = 0; one step: 1 - (1 - 333/512) / 2 and 1/2, mean 0.66259765625 (NOTES.md 1.6);
    # two steps: x -> x - (x - 333/512) / 2 twice = 0.73779296875 and 1/4, mean 0.493896484375.
    (1, 0.66259765625), (2, 0.493896484375)])
def test_lfednest_one_iteration_matches_the_hand_computation(tmp_path, outer_steps, x_next):
    """FedAvg inner rounds (tau = 2): client 1's y goes 0 -> 1/2 -> 7/8, client 2's stays 0, y+ = 7/16 (drift,
    against FedSVRG's 3/8); then each client's own Neumann hypergradient, recomputed at each local x."""
    records, state = one_iteration(tmp_path, "lfednest", outer_steps=outer_steps)
    assert [r["phase"] for r in records if "clients_sent" in r] == ["inner", "outer"]  # T + 1
    assert value(state, "y") == pytest.approx(0.4375, abs=1e-6)
    assert value(state, "x") == pytest.approx(x_next, abs=1e-6)


def test_the_family_has_its_own_flower_strategy():
    assert issubclass(BilevelFamily, Strategy)
    assert set(BilevelFamily.algorithms) == {"fednest", "lfednest", "simfbo", "shrofbo", "memfbo", "aggitd"}
    scenario = load_scenario(REPO / "scenarios" / "quadratic" / "fednest.yaml")
    assert type(strategy_for(scenario)) is BilevelFamily and strategy_for(scenario).rounds_per_iteration == 12


def test_phase_lists_follow_the_scenario():
    scenario = load_scenario(REPO / "scenarios" / "quadratic" / "base.yaml",
                             {"algorithm.name": "fednest", "algorithm.inner_rounds": 2, "algorithm.neumann_terms": 3,
                              "algorithm.inner_optimizer": "sgd"})
    names = [p.name for p in ALGORITHMS["fednest"].phases(scenario)]
    assert names == ["inner.1", "inner.2", "ihgp_grad", "ihgp.1", "ihgp.2", "ihgp.3", "hypergrad"]  # T + N + 2


@pytest.mark.parametrize("name", ["fednest", "lfednest"])
def test_algorithm_drives_x_error_below_1e_2(tmp_path, name):
    records, _ = run(small(tmp_path, algorithm={"name": name, "neumann_terms": 8, "neumann_step": 0.5}))
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals[0]["x_error"] > 0.5 and evals[-1]["x_error"] < 1e-2


def test_lfednest_with_one_round_and_one_local_step_is_the_fedmbo_row(tmp_path):
    """LFedNest (T = tau_out = 1, FedAvg inner rounds) and fedmbo with the same Neumann terms and step
    send the same messages and compute the same numbers: their records agree."""
    lfednest, _ = run(small(tmp_path / "l", algorithm={"name": "lfednest", "iterations": 5, "neumann_terms": 3,
                                                        "neumann_step": 0.4}))
    fedmbo, _ = run(small(tmp_path / "f", algorithm={"name": "fedmbo", "iterations": 5,
                                                      "estimator_options": {"K": 4, "step": 0.4}}))
    assert stable(lfednest) == stable(fedmbo)


def test_fednest_through_flower_gives_the_plain_engines_records(tmp_path, one_thread):  # noqa: F811
    """q, p, v and h travel in the messages beside x and y, sliced to each client's submodel."""
    sections = {"clients": {"num": 4, "capacities": [1.0, 0.5, 0.25]},
                "algorithm": {"name": "fednest", "iterations": 2, "outer_steps": 2, "neumann_terms": 2}}
    flower = run_flower(small(tmp_path / "flower", **sections), num_nodes=4)
    plain, _ = run(small(tmp_path / "plain", **sections))
    assert stable(flower) == stable(plain)
    assert last_eval(plain)["x_error"] < plain[0]["x_error"]
    ihgp = [r for r in plain if r["phase"] == "ihgp.1"][0]
    assert ihgp["min_coverage_p"] == 2 and ihgp["uncovered_p"] == 0.0


# ---------------------------------------------------------------- SimFBO and ShroFBO


@pytest.mark.parametrize("name,local_steps,expected", [
    # client 1 (A = 1, B = 2, b = 1), tau = 2: d = (d^x, d^y, d^v) = (1, -2, 1) at (y, v) = (0, 0), then
    # (0.5, -1.5, 0.25) at (1/2, -1/4); replies (1.5, -3.5, 1.25). Client 2 (A = 3, B = 0, b = 3): (1, 0, 3) at
    # (0, 0), then (1, 0, 0.75) at (0, -3/4); replies (2, 0, 3.75). Steps 1/4: x = 1 - 1.75 / 4, y = 3.5 / 8,
    # v = -5 / 8 (NOTES.md 4.5).
    ("simfbo", [2], {"x": 0.5625, "y": 0.4375, "v": -0.625}),
    # client 2 takes one step, reply (1, 0, 3): SimFBO weights client 1's two steps double.
    ("simfbo", [2, 1], {"x": 0.6875, "y": 0.4375, "v": -0.53125}),
    # ShroFBO: replies / tau_i = (0.75, -1.75, 0.625) and (1, 0, 3), steps 1/4 * tau_eff = 1/4 * 3/2.
    ("shrofbo", [2, 1], {"x": 0.671875, "y": 0.328125, "v": -0.6796875}),
    # tau = 1: one SOBA step on the mean functions: x = 1 - (1 + 1) / 8, y = 2 / 8, v = -(1 + 3) / 8.
    ("shrofbo", [1], {"x": 0.75, "y": 0.25, "v": -0.5}),
])
def test_simfbo_one_iteration_matches_the_hand_computation(tmp_path, name, local_steps, expected):
    records, state = one_iteration(tmp_path, name, local_steps, alpha=0.25, beta=0.25, v_step=0.25)
    assert [r["phase"] for r in records if "clients_sent" in r] == ["local"]
    assert {side: value(state, side) for side in expected} == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("name", ["simfbo", "shrofbo"])
def test_simfbo_drives_x_error_below_1e_2(tmp_path, name):
    """alpha = 0.06: x moves by alpha times the sum of tau = 5 directions, 0.3 per iteration as RABO's alpha."""
    records, _ = run(small(tmp_path, algorithm={"name": name, "alpha": 0.06}))
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals[0]["x_error"] > 0.5 and evals[-1]["x_error"] < 1e-2


def test_shrofbo_removes_the_bias_of_unequal_local_steps_that_simfbo_keeps(tmp_path):
    """Clients taking 5 and 1 local steps: SimFBO weights them by their steps and stops away from x*;
    ShroFBO's normalised aggregation reaches it."""
    def final(name):
        records, _ = run(small(tmp_path / name, clients={"num": 4, "capacities": [1.0], "local_steps": [5, 1]},
                               algorithm={"name": name, "alpha": 0.06, "beta": 0.2, "iterations": 100}))
        return last_eval(records)["x_error"]
    assert final("simfbo") > 0.05 and final("shrofbo") < 1e-2


def test_simfbo_through_flower_gives_the_plain_engines_records_and_resumes_v(tmp_path, one_thread):  # noqa: F811
    """v travels beside x and y, sliced to each client's submodel; it is checkpointed, so a run cut after
    iteration 2 and resumed ends where the straight run does."""
    sections = {"clients": {"num": 4, "capacities": [1.0, 0.5, 0.25], "local_steps": [3, 1]},
                "algorithm": {"name": "shrofbo", "iterations": 4, "alpha": 0.06, "beta": 0.2},
                "run": {"checkpoint_every": 2}}
    flower = run_flower(small(tmp_path / "flower", **sections), num_nodes=4)
    plain, state = run(small(tmp_path / "plain", **sections))
    assert stable(flower) == stable(plain)
    assert [c["local_steps"] for c in plain[1]["clients"]] == [3, 1, 3, 1]
    interrupted = small(tmp_path / "cut", **sections)
    run_plain(load_scenario(interrupted, {"algorithm.iterations": 2}), QUIET)
    resumed = run_plain(load_scenario(interrupted, {"run.resume": True}), QUIET)
    for side in ("x", "y", "v"):
        assert all(torch.equal(resumed.state.tensors[side][n], state.tensors[side][n]) for n in state.tensors[side])


# ---------------------------------------------------------------- MemFBO


def test_memfbo_one_iteration_matches_the_hand_computation(tmp_path):
    """On a quadratic g the central difference of grad g along v is H v and J v exactly, so MemFBO takes
    SimFBO's steps: the first case of the SimFBO table above (x = 0.5625, y = 0.4375, v = -0.625); the
    probe moves y by 1 here (float32 rounding of a 1e-3 probe leaves about 1e-5)."""
    records, state = one_iteration(tmp_path, "memfbo", [2], alpha=0.25, beta=0.25, v_step=0.25, fd_probe=1.0)
    assert [r["phase"] for r in records if "clients_sent" in r] == ["local"]
    expected = {"x": 0.5625, "y": 0.4375, "v": -0.625}
    assert {side: value(state, side) for side in expected} == pytest.approx(expected, abs=1e-6)


def test_memfbo_uses_first_order_gradients_only(tmp_path, monkeypatch):
    """No second-order graph is built: the oracle's double-backward products are never asked for."""
    def refuse(*args, **kwargs):
        raise AssertionError("MemFBO asked for a second-order product")
    monkeypatch.setattr(_Oracle, "second_order", refuse)
    records, state = one_iteration(tmp_path, "memfbo", [2], alpha=0.25, beta=0.25, v_step=0.25)
    local = [r for r in records if r["phase"] == "local"]
    assert local[0]["clients_aggregated"] == 2 and value(state, "v") == pytest.approx(-0.625, abs=1e-4)


# ---------------------------------------------------------------- AggITD


@pytest.mark.parametrize("rounds,expected", [
    # N = 1, tau = 2, beta = 1/4: client 1 (A = 1, B = 2, b = 1): u_0 = grad_y f = -1, J u = -B u, so
    # d = grad_x f - beta (J u_0 + J u_1) = 1 - (2 + 1.5) / 4 = 1/8 with u_1 = (1 - 1/4) u_0; y 0 -> 1/2 -> 7/8.
    # Client 2 (B = 0): d = 1, y stays 0. x = 1 - 0.5 mean(1/8, 1) = 0.71875, y = 7/16.
    (1, {"x": 0.71875, "y": 0.4375}),
    # N = 2: round 1 as above, u_2 = (3/4)^2 (-1) and (1/4)^2 (-3): u = -0.375, h = mean d = 0.5625, y = 7/16.
    # Round 2 from y = 7/16, u = -3/8: client 1 d = -(0.75 + 0.5625) / 4 = -0.328125, y -> 1.12109375;
    # client 2 d = 0, y -> 0.02734375. y = 0.57421875; x = 1 - 0.5 (0.5625 - 0.328125 / 2) = 0.80078125.
    (2, {"x": 0.80078125, "y": 0.57421875, "h": 0.5625, "u": -0.375}),
])
def test_aggitd_one_iteration_matches_the_hand_computation(tmp_path, rounds, expected):
    records, state = one_iteration(tmp_path, "aggitd", inner_rounds=rounds)
    assert [r["phase"] for r in records if "clients_sent" in r] == (["local"] if rounds == 1 else ["local.1", "local.2"])
    assert {side: value(state, side) for side in expected} == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("rounds,steps", [(1, 6), (3, 2)])
def test_aggitd_steps_x_along_the_truncated_itd_hypergradient(tmp_path, rounds, steps):
    """With Hessians shared by the clients (A, B), the products do not depend on the y trajectory, and
    one iteration steps every row along mu x + beta B' sum_{k < N tau} (I - beta A)^k (y - b), b the
    clients' mean: the ITD (truncated Neumann) hypergradient of N tau lower-level steps at the
    iteration's y. Checked on the small instance (4 clients, N tau = 6 as one round of 6 steps or
    three of 2, from the seeded x and y) against that closed form in float64."""
    beta = 0.4
    path = small(tmp_path, algorithm={"name": "aggitd", "iterations": 1, "inner_rounds": rounds, "inner_steps": steps,
                                      "alpha": 1.0, "beta": beta}, run={"eval_every": 0, "final_test": False})
    scenario = load_scenario(path)
    task = QuadraticTask(scenario)
    x, y = task.init_tensors(scenario.seed)
    m = task.mean_problem()
    eye = torch.eye(len(m.b), dtype=torch.float64)
    series = sum(torch.linalg.matrix_power(eye - beta * m.A, k) for k in range(rounds * steps))
    X, Y = x["x"].double(), y["y"].double()
    expected = X - (task.mu * X + beta * (Y - m.b) @ series.T @ m.B)
    state = TrainingLoop(scenario, task, PlainRunner(scenario, task, CPU), CPU, QUIET).run().state
    assert torch.allclose(state.x["x"].double(), expected, atol=1e-5)
    assert not torch.allclose(state.x["x"].double(), X - (task.mu * X + (Y - m.b) @ torch.linalg.solve(m.A, m.B)),
                              atol=1e-3)  # and it is not the exact hypergradient: N tau = 6 terms


@pytest.mark.parametrize("name,algorithm", [("aggitd", {"inner_rounds": 2}), ("memfbo", {"alpha": 0.06})])
def test_aggitd_and_memfbo_drive_x_error_below_1e_2(tmp_path, name, algorithm):
    records, _ = run(small(tmp_path, algorithm={"name": name, **algorithm}))
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals[0]["x_error"] > 0.5 and evals[-1]["x_error"] < 1e-2


@pytest.mark.parametrize("name,algorithm", [("aggitd", {"inner_rounds": 2}), ("memfbo", {"alpha": 0.06})])
def test_aggitd_and_memfbo_through_flower_give_the_plain_engines_records(tmp_path, one_thread, name, algorithm):  # noqa: F811
    """AggITD's numbered rounds travel as train.local with u beside x and y, MemFBO's round with v; both
    sliced to each client's submodel."""
    sections = {"clients": {"num": 4, "capacities": [1.0, 0.5, 0.25]},
                "algorithm": {"name": name, "iterations": 1, **algorithm}}
    flower = run_flower(small(tmp_path / "flower", **sections), num_nodes=4)
    plain, _ = run(small(tmp_path / "plain", **sections))
    assert stable(flower) == stable(plain)
    rounds = ["local.1", "local.2"] if name == "aggitd" else ["local"]
    assert [r["phase"] for r in plain if "clients_sent" in r] == rounds
    assert last_eval(plain)["x_error"] < plain[0]["x_error"]


# ---------------------------------------------------------------- through `flwr run` (Ray)


def flwr_run_and_plain(home, tmp_path, config, supernodes):  # noqa: F811
    """The records of ``config`` (a run config with its scenario file) through ``flwr run`` on
    ``supernodes`` simulated SuperNodes, and through the plain engine: (flower, plain)."""
    results = tmp_path / "results"
    outcome = home.run(REPO, run_config=config | {"run.results_dir": str(results)},
                       federation_config={"num-supernodes": supernodes, "client-resources-num-cpus": 1}, timeout=600)
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    overrides = {k: v for k, v in config.items() if k != "scenario"} | {"run.results_dir": str(tmp_path / "plain")}
    plain = run_plain(load_scenario(REPO / config["scenario"], overrides), QUIET).records
    return read_metrics(results / "metrics.jsonl"), plain


@pytest.mark.e2e
@pytest.mark.parametrize("name,rounds", [("fednest", ["inner_grad", "inner", "ihgp_grad", "ihgp.1", "ihgp.2", "hypergrad"]),
                                         ("shrofbo", ["local"]), ("aggitd", ["local.1", "local.2"])])
def test_family_through_flwr_run_matches_the_plain_engine(home, tmp_path, name, rounds):  # noqa: F811
    """The scenario file as a user runs it, shrunk: Flower's simulation engine routes train.<kind> messages
    (FedNest's numbered Neumann rounds travel as train.ihgp) and the server's own variables travel with them."""
    flower, plain = flwr_run_and_plain(home, tmp_path, {
        "scenario": f"scenarios/quadratic/{name}.yaml", "algorithm.iterations": 2, "clients.num": 3,
        "algorithm.neumann_terms": 2, "run.eval_every": 1}, supernodes=3)
    trained = lambda records: [r for r in records if "clients_sent" in r]  # noqa: E731
    assert [(r["iteration"], r["phase"]) for r in trained(flower)] == [(q, p) for q in (1, 2) for p in rounds]
    for f, p in zip(trained(flower), trained(plain)):
        assert (f["clients_aggregated"], f["bytes_down"], f["bytes_up"]) == (3, p["bytes_down"], p["bytes_up"])
    assert [e["x_error"] for e in flower if e["phase"] == "eval"] == pytest.approx(
        [e["x_error"] for e in plain if e["phase"] == "eval"], rel=1e-5)
