"""The gossip engine (rabo_flwr/gossip.py) and the decentralised methods on it, SLDBO and S3LDBO
(rabo_flwr/algorithms/sldbo.py): mixing matrices, per-edge traffic, one iteration against a hand computation,
several against an independent recursion, the reduction to SimFBO under W = (1/n) 11' (on hyper-cleaning too,
whose x is owned: each node holds, is sent and steps its own block), convergence on the quadratic task,
checkpoints, and the Flower message path giving the plain engine's records."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from rabo_flwr.algorithms.sldbo import holdings, project, refreshes, shared_bytes
from rabo_flwr.gossip import connected, directed_edges, edge_bytes, mix, mixing_matrix, torus_shape
from rabo_flwr.loop import PlainRunner, TrainingLoop, run_plain
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import ScenarioError, load_scenario
from rabo_flwr.tasks.quadratic import ClientProblem, QuadraticTask
from strategies import Decentralised, strategy_for
from tests.test_family import flwr_run_and_plain
from tests.test_flower_e2e import home  # noqa: F401 - a fixture
from tests.test_hyper_cleaning import tiny
from tests.test_quadratic import last_eval, run, small
from tests.test_strategy import one_thread, run_flower, stable  # noqa: F401 - one_thread is a fixture

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
QUIET = logging.getLogger("quiet")
DT = torch.float64
PATH_W = [[2 / 3, 1 / 3, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 1 / 3, 2 / 3]]  # Metropolis weights of the path 0 - 1 - 2


def scenario_for(tmp_path: Path, **algorithm):
    return load_scenario(small(tmp_path, clients={"num": algorithm.pop("num", 4), "capacities": [1.0]},
                               algorithm={"name": "sldbo", **algorithm}))


# ---------------------------------------------------------------- mixing matrices


@pytest.mark.parametrize("topology,n", [("ring", 3), ("ring", 10), ("torus", 9), ("torus", 12), ("torus", 8),
                                        ("complete", 5), ("erdos-renyi", 10), ("erdos-renyi", 30)])
def test_every_topology_is_symmetric_doubly_stochastic_and_connected(tmp_path, topology, n):
    W = mixing_matrix(scenario_for(tmp_path, num=n, topology=topology, edge_probability=0.3))
    ones = torch.ones(n, dtype=DT)
    assert W.shape == (n, n) and (W >= 0).all() and torch.equal(W, W.T)
    assert torch.allclose(W @ ones, ones, atol=1e-12) and torch.allclose(W.T @ ones, ones, atol=1e-12)
    edges = {(i, j) for i in range(n) for j in range(i + 1, n) if W[i, j] > 0}
    assert connected(n, edges)
    # connected and doubly stochastic: every other singular value is below 1, so gossip contracts to the average
    assert torch.linalg.svdvals(W - ones.outer(ones) / n).max() < 1 - 1e-6


def test_each_topology_has_its_neighbours_and_weights(tmp_path):
    ring = mixing_matrix(scenario_for(tmp_path / "r", num=6, topology="ring"))
    assert ring[0].tolist() == pytest.approx([1 / 3, 1 / 3, 0, 0, 0, 1 / 3])  # degree 2: 1 / (1 + 2)
    assert torus_shape(12) == (3, 4) and torus_shape(9) == (3, 3) and torus_shape(7) == (1, 7)
    torus = mixing_matrix(scenario_for(tmp_path / "t", num=12, topology="torus"))
    # node 5 = (row 1, column 1): neighbours (0, 1), (2, 1), (1, 0), (1, 2) = 1, 9, 4, 6; degree 4: 1 / 5
    assert sorted(int(j) for j in torus[5].nonzero() if j != 5) == [1, 4, 6, 9]
    assert torus[5, 1] == pytest.approx(0.2) and torus[5, 5] == pytest.approx(0.2)
    assert torch.equal(mixing_matrix(scenario_for(tmp_path / "c", num=4, topology="complete")), torch.full((4, 4), 0.25, dtype=DT))
    assert directed_edges(ring) == 12 and directed_edges(torus) == 48


def test_erdos_renyi_is_seeded_reproducible_and_connected(tmp_path):
    def draw(seed, p=0.15):
        return mixing_matrix(load_scenario(small(tmp_path / f"{seed}-{p}", clients={"num": 20, "capacities": [1.0]},
                                                 algorithm={"name": "sldbo", "topology": "erdos-renyi",
                                                            "edge_probability": p}), {"seed": seed}))
    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    W = draw(3)
    assert connected(20, {(i, j) for i in range(20) for j in range(i + 1, 20) if W[i, j] > 0})
    assert directed_edges(draw(3, 1.0)) == 20 * 19  # p = 1: the complete graph


@pytest.mark.parametrize("algorithm,clients,key,reason", [
    ({"topology": "star"}, {}, "algorithm.topology", "not one of ring, torus"),
    ({"topology": "matrix", "mixing": [[0.5, 0.5], [0.5, 0.5]]}, {}, "algorithm.mixing", "must be 3 x 3"),
    ({"topology": "matrix", "mixing": [[1.5, -0.5, 0.0], [-0.5, 1.0, 0.5], [0.0, 0.5, 0.5]]}, {},
     "algorithm.mixing[0][1]", "weights must be >= 0"),
    ({"topology": "matrix", "mixing": [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.6]]}, {}, "algorithm.mixing",
     "row 2 sums to 1.1"),
    ({"topology": "matrix", "mixing": [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.5, 0.0, 0.5]]}, {}, "algorithm.mixing",
     "column 0 sums to 1.5"),  # row-stochastic only
    ({"topology": "matrix", "mixing": [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]}, {}, "algorithm.mixing",
     "not connected"),
    ({"mixing": PATH_W}, {}, "algorithm.mixing", "needs algorithm.topology: matrix"),
    ({"topology": "erdos-renyi", "edge_probability": 1.5}, {}, "algorithm.edge_probability", "must be in (0, 1]"),
    ({"topology": "erdos-renyi", "edge_probability": 0.001}, {}, "algorithm.edge_probability", "drew no connected graph"),
    ({"name": "s3ldbo", "snapshot_probability": 0.0}, {}, "algorithm.snapshot_probability", "must be in (0, 1]"),
    ({"v_radius": -1.0}, {}, "algorithm.v_radius", "must be >= 0"),
    ({}, {"fraction": 0.5}, "clients.fraction", "every node every iteration"),
    ({}, {"capacities": [1.0, 0.5]}, "clients.capacities", "every capacity must be 1"),
])
def test_bad_gossip_input_fails_in_one_line_naming_the_file_and_key(tmp_path, algorithm, clients, key, reason):
    path = small(tmp_path, clients={"num": 3, "capacities": [1.0], **clients}, algorithm={"name": "sldbo", **algorithm})
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}: ") and reason in message and "\n" not in message


def test_a_ring_sends_two_n_times_the_vectors_of_a_node(tmp_path):
    """Per iteration every node sends its mixed trackers and then its mixed states, x, y and v of each
    (2 (|x| + 2 |y|) float32 elements), to each of its 2 neighbours: bytes_p2p = 2 n times that."""
    n, rows, p, q = 5, 4, 3, 4  # small(): x 4 x 3, y 4 x 4
    W = mixing_matrix(scenario_for(tmp_path / "w", num=n, topology="ring"))
    assert edge_bytes(W, 100) == 2 * n * 100
    records, _ = run(small(tmp_path, clients={"num": n, "capacities": [1.0]},
                           algorithm={"name": "sldbo", "topology": "ring", "iterations": 2}))
    per_node = 2 * (rows * p + 2 * rows * q) * 4
    assert [r["bytes_p2p"] for r in records if r["phase"] == "local"] == [2 * n * per_node] * 2
    # the relay's own traffic: each node is sent x, y and v and replies d^x, d^y and d^v
    assert records[1]["bytes_down"] == records[1]["bytes_up"] == n * per_node // 2


def test_an_element_is_mixed_among_its_holders_only_and_sent_only_between_them():
    """Path 0 - 1 - 2 (PATH_W), three elements: the first held by every node (W itself), the second by node 1
    alone (the identity: an owned element), the third by nodes 0 and 1 (each keeps the weight of a neighbour that
    does not hold it: 4 + (8 - 4) / 3 = 16/3 and 8 + (4 - 8) / 3 = 20/3, their sum kept). An element a node does
    not hold keeps its value. Traffic: edge 0 - 1 carries two elements each way, edge 1 - 2 one: 6 x 4 bytes."""
    W = torch.tensor(PATH_W, dtype=DT)
    Z = torch.tensor([[1.0, 10.0, 4.0], [2.0, 20.0, 8.0], [3.0, 30.0, 100.0]], dtype=DT)
    held = torch.tensor([[True, False, True], [True, True, True], [True, False, False]])
    expected = [[4 / 3, 10.0, 16 / 3], [2.0, 20.0, 20 / 3], [8 / 3, 30.0, 100.0]]
    assert torch.allclose(mix(W, Z, held), torch.tensor(expected, dtype=DT), rtol=0, atol=1e-12)
    assert torch.allclose(mix(W, Z, torch.ones(3, 3, dtype=torch.bool)), mix(W, Z), atol=1e-12)
    assert edge_bytes(W, shared_bytes({"z": Z.float()}, {"z": held})) == 6 * 4
    assert edge_bytes(W, shared_bytes({"z": Z.float()}, {"z": None})) == 4 * 3 * 4  # 4 directed edges, 3 elements


def test_on_hyper_cleaning_each_node_is_sent_and_steps_its_own_block_of_x_only(tmp_path):
    """Hyper-cleaning's x has one weight per training example, each node's block its own (``Layout.owners``):
    a node is sent its block (as a server-based method's client is), its reply is accepted, and its block steps
    alone, x_i <- x_i - alpha d^x_i (one holder: mixing is the identity, the tracker is the direction), while
    the rest of its row is never touched. Two iterations: at the first v = 0, so d^x = 0 (f does not read x) and
    x moves at the second only, by alpha times that iteration's d^x_i. Node 2 fails at the second: its block keeps
    its value. x never travels between nodes."""
    path = tiny(tmp_path, algorithm={"name": "sldbo", "topology": "ring", "iterations": 2, "alpha": 100.0},
                run={"eval_every": 0, "final_test": False,
                     "faults": [{"partition": 2, "phase": "local", "iterations": [2], "kind": "raise"}]})
    scenario = load_scenario(path)
    result = run_plain(scenario, QUIET)
    first, local = [r for r in result.records if r["phase"] == "local"]
    assert (first["clients_aggregated"], first["rejected"]) == (4, 0)
    assert (local["clients_sent"], local["clients_aggregated"], local["failures"], local["rejected"]) == (4, 3, 1, 0)
    task = cached_task(scenario)
    owners = next(iter(task.x_layout.owners.values()))
    (name,) = result.state.x
    x0 = task.init_tensors(scenario.seed)[0][name]
    X, D = result.state.nodes["x"][name], result.state.nodes["dx"][name]
    for i, own in enumerate(owners):
        elsewhere = torch.ones(len(x0), dtype=torch.bool)
        elsewhere[own] = False
        assert torch.equal(X[i][elsewhere], x0[elsewhere]) and not D[i][elsewhere].any()
        assert torch.allclose(X[i][own], x0[own] - 100.0 * D[i][own], rtol=0, atol=1e-6)
        assert bool((X[i][own] != x0[own]).any()) == (i != 2)
        assert torch.equal(result.state.x[name][own], X[i][own])
    y_bytes = sum(t.numel() * t.element_size() for t in result.state.y.values())
    assert local["bytes_p2p"] == 2 * 8 * (2 * y_bytes)  # a ring of 4: 8 directed edges; y and v only
    assert local["bytes_down"] == sum(len(own) * 4 + 2 * y_bytes for own in owners)  # each node its own block


def test_projection_keeps_each_nodes_v_in_its_ball():
    v = {"a": torch.tensor([[3.0, 0.0], [0.3, 0.4]]), "b": torch.tensor([[4.0], [0.0]])}  # node norms 5 and 0.5
    projected = project(v, 2.0)
    assert torch.allclose(projected["a"], torch.tensor([[1.2, 0.0], [0.3, 0.4]]))
    assert torch.allclose(projected["b"], torch.tensor([[1.6], [0.0]]))
    assert project(v, 0.0) == v


# ---------------------------------------------------------------- one iteration by hand


def three_node_problem() -> list[ClientProblem]:
    """g_i = 0.5 A_i y^2 - B_i x y, f_i = 0.5 (y - b_i)^2 + 0.5 x^2 with A = (1, 3, 2), B = (2, 0, 1), b = (1, 3, 2):
    directions d^x_i = x + B_i v, d^y_i = A_i y - B_i x, d^v_i = A_i v - (y - b_i)."""
    def scalar(v):
        return torch.tensor([[v]], dtype=DT)
    return [ClientProblem(scalar(a), scalar(b), torch.zeros(1, dtype=DT), torch.tensor([t], dtype=DT))
            for a, b, t in ((1.0, 2.0, 1.0), (3.0, 0.0, 3.0), (2.0, 1.0, 2.0))]


def hand_run(tmp_path: Path, name: str, iterations: int, **algorithm):
    """``iterations`` of ``name`` on the three-node problem, W = PATH_W, from x = 1, y = 0 (v = 0),
    alpha 1/2, beta = gamma = 1/4, through the loop and the plain engine: (records, state)."""
    path = small(tmp_path, task={"channels": 1, "x_dim": 1, "y_dim": 1, "upper_l2": 1.0},
                 clients={"num": 3, "capacities": [1.0]},
                 algorithm={"name": name, "iterations": iterations, "alpha": 0.5, "beta": 0.25, "v_step": 0.25,
                            "topology": "matrix", "mixing": PATH_W, **algorithm},
                 run={"eval_every": 0, "final_test": False})
    scenario = load_scenario(path, {"seed": 10})
    task = QuadraticTask(scenario)
    task.problems = three_node_problem()
    loop = TrainingLoop(scenario, task, PlainRunner(scenario, task, CPU), CPU, QUIET)
    result = loop.run(initial=({"x": torch.ones(1, 1)}, {"y": torch.zeros(1, 1)}))
    return [r for r in result.records if r["phase"] == "local"], result.state


def nodes(state, name: str) -> list[float]:
    (tensor,) = state.nodes[name].values()
    return tensor.flatten().tolist()


def test_sldbo_one_iteration_matches_the_hand_computation(tmp_path):
    """At x = 1, y = v = 0 the directions are d^x = (1, 1, 1), d^y = -B = (-2, 0, -1), d^v = b = (1, 3, 2).
    Trackers S = W D: s^x = (1, 1, 1), s^y = (-4/3, -1, -2/3), s^v = (5/3, 2, 7/3). States: X = W (1 - s^x / 2)
    = 1/2; Y = W (0 - s^y / 4) = (11/36, 1/4, 7/36); V = W (0 - s^v / 4) = (-4/9, -1/2, -5/9). The averages
    move along the average directions: y_bar = 1/4 = 0 + mean(B) / 4, v_bar = -1/2 = -mean(b) / 4."""
    records, state = hand_run(tmp_path, "sldbo", 1)
    expected = {"x": [0.5] * 3, "y": [11 / 36, 1 / 4, 7 / 36], "v": [-4 / 9, -1 / 2, -5 / 9],
                "sx": [1.0] * 3, "sy": [-4 / 3, -1.0, -2 / 3], "sv": [5 / 3, 2.0, 7 / 3],
                "dx": [1.0] * 3, "dy": [-2.0, 0.0, -1.0], "dv": [1.0, 3.0, 2.0]}
    for name, values in expected.items():
        assert nodes(state, name) == pytest.approx(values, abs=1e-6), name
    assert [float(state.tensors[s][s if s != "v" else "y"]) for s in ("x", "y", "v")] == pytest.approx([0.5, 0.25, -0.5])
    assert records[0]["clients_sent"] == 3 and records[0]["directions_reused"] == 0
    assert records[0]["consensus_x"] == pytest.approx(0.0, abs=1e-7)


def test_s3ldbo_second_iteration_matches_the_hand_computation(tmp_path):
    """Iteration 1 is SLDBO's (every node computes at its first iteration). At iteration 2 (seed 10) only node 0's
    coin refreshes its snapshot: it computes at (x, y, v) = (1/2, 11/36, -4/9): d^x = 1/2 + 2 (-4/9) = -7/18,
    d^y = 11/36 - 1 = -25/36, d^v = -4/9 - (11/36 - 1) = 1/4; nodes 1 and 2 are sent nothing and their rows of D
    stay. s^x = W (s^x + D - D_prev) = W (-7/18, 1, 1) = (2/27, 29/54, 1); X = W (1/2 - s^x / 2) = W (25/54, 25/108, 0)
    = (125/324, 25/108, 25/324), whose mean 25/108 = 1/2 - mean(-7/18, 1, 1) / 2. Y and V likewise (exact fractions)."""
    assert [refreshes(load_scenario(small(tmp_path / "s", clients={"num": 3, "capacities": [1.0]},
                                          algorithm={"name": "s3ldbo"}), {"seed": 10}), 2, p) for p in range(3)] == \
        [True, False, False]
    records, state = hand_run(tmp_path, "s3ldbo", 2)
    assert [r["clients_sent"] for r in records] == [3, 1] and [r["directions_reused"] for r in records] == [0, 2]
    expected = {"dx": [-7 / 18, 1.0, 1.0], "dy": [-25 / 36, 0.0, -1.0], "dv": [1 / 4, 3.0, 2.0],
                "sx": [2 / 27, 29 / 54, 1.0], "x": [125 / 324, 25 / 108, 25 / 324],
                "y": [509 / 1296, 169 / 432, 505 / 1296], "v": [-355 / 432, -15 / 16, -455 / 432]}
    for name, values in expected.items():
        assert nodes(state, name) == pytest.approx(values, abs=1e-6), name


def test_gossip_records_the_coverage_of_the_nodes_that_computed(tmp_path):
    """An element is stepped by the nodes whose directions for it were received (the other methods' definition,
    :meth:`TrainingLoop._covering_number`): S3LDBO's three nodes at iteration 1, node 0 alone at iteration 2, so
    x and y are wholly trained from iteration 1 and C* is 3, then min(3, 1) = 1 (they were recorded as 0)."""
    records, _ = hand_run(tmp_path, "s3ldbo", 2)
    for side in ("x", "y"):
        assert [r[f"min_coverage_{side}"] for r in records] == [3, 1]
        assert [r[f"C_{side}*"] for r in records] == [3, 1]
        assert [r[f"trained_{side}"] for r in records] == [1.0, 1.0]
        assert [r[f"uncovered_{side}"] for r in records] == [0.0, 0.0]


def test_an_owned_element_of_a_gossip_node_is_covered_by_its_holder_alone(tmp_path):
    """Hyper-cleaning's per-example weights: each node computes directions for its own block only, so every
    element of x has coverage 1 (C_x* = 1), and the block of a node that failed is uncovered in that phase;
    y, on every node, is covered by the nodes that replied (4, then 3)."""
    path = tiny(tmp_path, algorithm={"name": "sldbo", "topology": "ring", "iterations": 2},
                run={"eval_every": 0, "final_test": False,
                     "faults": [{"partition": 2, "phase": "local", "iterations": [2], "kind": "raise"}]})
    scenario = load_scenario(path)
    records = [r for r in run_plain(scenario, QUIET).records if r["phase"] == "local"]
    owners = next(iter(cached_task(scenario).x_layout.owners.values()))
    total = sum(len(own) for own in owners)
    assert [(r["trained_x"], r["C_x*"], r["min_coverage_x"]) for r in records] == [(1.0, 1, 1), (1.0, 1, 1)]
    assert [r["uncovered_x"] for r in records] == pytest.approx([0.0, len(owners[2]) / total])
    assert [(r["trained_y"], r["C_y*"], r["min_coverage_y"]) for r in records] == [(1.0, 4, 4), (1.0, 3, 3)]


# ---------------------------------------------------------------- against an independent recursion


def oracle(task: QuadraticTask, W: torch.Tensor, x0, y0, alpha, beta, gamma, iterations, computes):
    """The module docstring's recursion in float64 with the quadratic task's closed-form directions (row form:
    d^x = mu X + V B_i, d^y = Y A_i - X B_i' - c_i, d^v = V A_i - (Y - b_i)); ``computes(k, i)`` says whether
    node i's directions are fresh at iteration k. Returns the stacked X, Y, V after ``iterations``."""
    n = W.shape[0]
    X, Y = x0.to(DT).expand(n, *x0.shape).clone(), y0.to(DT).expand(n, *y0.shape).clone()
    V = torch.zeros_like(Y)
    S = {w: 0.0 for w in "xyv"}
    D = {"x": torch.zeros_like(X), "y": torch.zeros_like(Y), "v": torch.zeros_like(Y)}
    mix = lambda Z: torch.einsum("ij,j...->i...", W, Z)  # noqa: E731
    for k in range(1, iterations + 1):
        fresh = {w: D[w].clone() for w in D}
        for i, c in enumerate(task.problems):
            if computes(k, i):
                fresh["x"][i] = task.mu * X[i] + V[i] @ c.B
                fresh["y"][i] = Y[i] @ c.A - X[i] @ c.B.T - c.c
                fresh["v"][i] = V[i] @ c.A - (Y[i] - c.b)
        S = {w: mix(S[w] + fresh[w] - D[w]) for w in D}
        D = fresh
        X, Y, V = mix(X - alpha * S["x"]), mix(Y - beta * S["y"]), mix(V - gamma * S["v"])
    return X, Y, V


@pytest.mark.parametrize("name", ["sldbo", "s3ldbo"])
def test_several_iterations_with_a_failing_node_match_the_recursion(tmp_path, name):
    """Heterogeneous Hessians, a 2-D torus of 6 nodes, 6 iterations, node 2 raising at iteration 3 (its previous
    directions are reused, as a skipped snapshot's): the loop's node states equal the float64 recursion."""
    sections = {"task": {"hessian_heterogeneity": 0.3}, "clients": {"num": 6, "capacities": [1.0]},
                "algorithm": {"name": name, "iterations": 6, "topology": "torus", "alpha": 0.1, "beta": 0.5},
                "run": {"faults": [{"partition": 2, "phase": "local", "iterations": [3], "kind": "raise"}]}}
    scenario = load_scenario(small(tmp_path, **sections))
    result = run_plain(scenario, QUIET)
    task = QuadraticTask(scenario)
    x0, y0 = task.init_tensors(scenario.seed)

    def computes(k, i):
        fresh = k == 1 or name == "sldbo" or refreshes(scenario, k, i)
        return fresh and not (k == 3 and i == 2)
    X, Y, V = oracle(task, mixing_matrix(scenario), x0["x"], y0["y"], 0.1, 0.5, 0.5, 6, computes)
    for name_, expected in (("x", X), ("y", Y), ("v", V)):
        (got,) = result.state.nodes[name_].values()
        assert float((got.to(DT) - expected).norm() / expected.norm()) < 1e-5, name_
    contacted = name == "sldbo" or refreshes(scenario, 3, 2)  # S3LDBO sends a node nothing when its coin misses
    assert [r["failures"] for r in result.records if r["phase"] == "local"][2] == int(contacted)


# ---------------------------------------------------------------- the federated counterpart


SCENARIOS = {"quadratic": small, "hyper-cleaning": tiny}  # task -> its shrunk scenario file (4 clients) with sections set
REDUCTIONS = {  # task -> (sections, the algorithm's step sizes and iterations) of its reduction test
    "quadratic": ({"task": {"hessian_heterogeneity": 0.3}}, {"iterations": 15, "alpha": 0.1, "beta": 0.5, "v_step": 0.4}),
    "hyper-cleaning": ({"run": {"eval_every": 0, "final_test": False}},
                       {"iterations": 3, "alpha": 100.0, "beta": 0.1, "v_step": 0.1}),
}


@pytest.mark.parametrize("task,mixing", [("quadratic", {"topology": "complete"}),
                                         ("quadratic", {"topology": "matrix", "mixing": [[0.25] * 4] * 4}),
                                         ("hyper-cleaning", {"topology": "complete"})])
def test_with_the_averaging_matrix_sldbo_is_simfbo_with_one_local_step(tmp_path, task, mixing):
    """W = (1/n) 11': every node holds the average after each mixing, so each iteration is one SOBA step on the
    mean functions at the common point: SimFBO with one local step and the same alpha, beta and v_step. On
    hyper-cleaning x is owned: each node steps its own block alone (one holder: the identity), SimFBO's
    coverage-counted step of an element of count 1; every node agrees with SimFBO on what it holds."""
    sections, steps = REDUCTIONS[task]
    common = {**steps, "inner_steps": 1}
    _, gossip = run(SCENARIOS[task](tmp_path / "g", **sections, algorithm={"name": "sldbo", **mixing, **common}))
    _, simfbo = run(SCENARIOS[task](tmp_path / "s", **sections, algorithm={"name": "simfbo", **common}))
    held = holdings(gossip, 4)
    for side in ("x", "y", "v"):
        for name, expected in simfbo.tensors[side].items():
            assert torch.allclose(gossip.tensors[side][name], expected, atol=1e-5), side
            stacked, every = gossip.nodes[side][name], expected.expand_as(gossip.nodes[side][name])
            mask = torch.ones_like(stacked, dtype=torch.bool) if held[side][name] is None else held[side][name]
            assert torch.allclose(stacked[mask], every[mask], atol=1e-5), side  # every node, on what it holds


# ---------------------------------------------------------------- convergence


@pytest.mark.parametrize("name,alpha,iterations", [("sldbo", 0.1, 60), ("s3ldbo", 0.05, 120)])
def test_gossip_drives_the_node_averages_x_error_below_1e_2(tmp_path, name, alpha, iterations):
    """4 nodes on a ring; x_error is that of the node average of x; the nodes agree to 1e-2 as well.
    S3LDBO's stale directions need the smaller step (at alpha 0.1 it takes 140 iterations, at 0.2 it diverges)."""
    records, _ = run(small(tmp_path, algorithm={"name": name, "topology": "ring", "alpha": alpha, "beta": 0.5,
                                                "iterations": iterations}))
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals[0]["x_error"] > 0.5 and evals[-1]["x_error"] < 1e-2
    assert [r for r in records if r["phase"] == "local"][-1]["consensus_x"] < 1e-2


def test_gradient_tracking_reaches_x_star_where_local_hypergradients_stop(tmp_path):
    """Clients with different Hessians: RABO's averaged local hypergradients stop away from x* (README), while
    SLDBO's tracked directions average to the federated hypergradient at consensus and reach it."""
    task = {"hessian_heterogeneity": 0.3}
    sldbo, _ = run(small(tmp_path / "s", task=task, algorithm={"name": "sldbo", "alpha": 0.1, "iterations": 100}))
    rabo, _ = run(small(tmp_path / "r", task=task, algorithm={"name": "rabo", "iterations": 100}))
    assert last_eval(sldbo)["x_error"] < 1e-3 and last_eval(rabo)["x_error"] > 0.02


def test_node_states_are_checkpointed(tmp_path):
    """A run cut after iteration 2 and resumed ends where the straight run does, node by node."""
    sections = {"algorithm": {"name": "s3ldbo", "iterations": 4}, "run": {"checkpoint_every": 2}}
    _, straight = run(small(tmp_path / "straight", **sections))
    cut = small(tmp_path / "cut", **sections)
    run_plain(load_scenario(cut, {"algorithm.iterations": 2}), QUIET)
    resumed = run_plain(load_scenario(cut, {"run.resume": True}), QUIET).state
    for name, stacked in straight.nodes.items():
        for k, t in stacked.items():
            assert torch.equal(resumed.nodes[name][k], t), name


# ---------------------------------------------------------------- through Flower


def test_the_gossip_methods_have_their_own_flower_strategy():
    scenario = load_scenario(REPO / "scenarios" / "quadratic" / "s3ldbo.yaml")
    assert set(Decentralised.algorithms) == {"sldbo", "s3ldbo"}
    assert type(strategy_for(scenario)) is Decentralised and strategy_for(scenario).rounds_per_iteration == 1


@pytest.mark.parametrize("task", SCENARIOS)
@pytest.mark.parametrize("name", ["sldbo", "s3ldbo"])
def test_gossip_through_flower_gives_the_plain_engines_records(tmp_path, one_thread, name, task):  # noqa: F811
    """Each node's own x, y and v travel in its message (S3LDBO: only to the nodes that refresh; on hyper-cleaning
    x is the node's own block, of a size per node); the server's mixing makes the same node states and records."""
    sections = {"clients": {"num": 5, "capacities": [1.0]}, "algorithm": {"name": name, "iterations": 3}}
    flower = run_flower(SCENARIOS[task](tmp_path / "flower", **sections), num_nodes=5)
    plain, _ = run(SCENARIOS[task](tmp_path / "plain", **sections))
    assert stable(flower) == stable(plain)
    if name == "s3ldbo":
        assert [r["clients_sent"] for r in plain if r["phase"] == "local"][1:] != [5, 5]


@pytest.mark.e2e
def test_s3ldbo_through_flwr_run_matches_the_plain_engine(home, tmp_path):  # noqa: F811
    """The scenario file as a user runs it, shrunk: Flower's simulation engine relays the nodes' messages
    (only those of the nodes whose snapshot is refreshed after the first iteration)."""
    flower, plain = flwr_run_and_plain(home, tmp_path, {
        "scenario": "scenarios/quadratic/s3ldbo.yaml", "algorithm.iterations": 3, "clients.num": 4,
        "run.eval_every": 1}, supernodes=2)
    trained = lambda records: [r for r in records if r["phase"] == "local"]  # noqa: E731
    assert len(trained(flower)) == 3
    for f, p in zip(trained(flower), trained(plain)):
        for key in ("clients_sent", "clients_aggregated", "bytes_down", "bytes_up", "bytes_p2p", "directions_reused"):
            assert f[key] == p[key], key
    assert [e["x_error"] for e in flower if e["phase"] == "eval"] == pytest.approx(
        [e["x_error"] for e in plain if e["phase"] == "eval"], rel=1e-5)
