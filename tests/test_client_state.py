"""What a client keeps between iterations (ClientState), and its first user: the warm start of the
hypergradient solve for u (``algorithm.estimator_options.warm_start``, estimators ``curvature`` and ``exact``).

By hand on a tiny quadratic: the first warm solve is the cold one, a solve started at the solution takes no
CG step, GD's K steps from a start land where (I - s H)^K says. Through the loop: a client sampled at
iterations 1 and 3 starts from the u it left at 1; state is read on its own submodel only; workers, a resumed
run and the Flower message path (virtual clients sharing nodes) give the records of one uninterrupted
sequential run."""

from __future__ import annotations

import logging

import pytest
import torch

from rabo_flwr.algorithms import bilevel
from rabo_flwr.hypergrad import conjugate_gradient, hypergradient_with_stats
from rabo_flwr.loop import run_plain
from rabo_flwr.scenario import ScenarioError, load_scenario
from rabo_flwr.results import read_metrics
from strategies import Rabo
from tests.inprocess_grid import InProcessGrid
from tests.test_family import flwr_run_and_plain
from tests.test_flower_e2e import home  # noqa: F401 - a fixture
from tests.test_quadratic import small
from tests.test_strategy import one_thread, stable  # noqa: F401 - one_thread is a fixture

CPU = torch.device("cpu")
QUIET = logging.getLogger("quiet")
DT = torch.float64

# f(x, y) = 0.5 ||y - b||^2 + 0.5 ||x||^2, g(x, y) = 0.5 y'Hy - y'Bx: H_yy = H, grad_y f = y - b, so u = H^-1 (y - b)
H = torch.diag(torch.tensor([1.0, 2.0, 4.0], dtype=DT))
B = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 2.0]], dtype=DT)
b = torch.tensor([1.0, -1.0, 2.0], dtype=DT)


def upper(xs, ys):
    return 0.5 * ((ys[0] - b) ** 2).sum() + 0.5 * (xs[0] ** 2).sum()


def lower(xs, ys):
    return 0.5 * ys[0] @ H @ ys[0] - ys[0] @ B @ xs[0]


def estimate(method, y, memory=None, **options):
    x = [torch.tensor([0.3, -0.2], dtype=DT)]
    return hypergradient_with_stats(upper, lower, x, [y], method, memory=memory, **options)


@pytest.mark.parametrize("method", ["exact", "curvature"])
def test_the_first_warm_solve_is_the_cold_one_and_the_next_starts_from_the_kept_u(method):
    y = torch.tensor([0.5, 0.1, -0.4], dtype=DT)
    cold, cold_info = estimate(method, y)
    memory = {}
    warm, warm_info = estimate(method, y, memory, warm_start=True)
    assert all(torch.equal(c, w) for c, w in zip(cold, warm))
    assert warm_info == cold_info | {"warm_started": 0.0}
    u = torch.linalg.solve(H, y - b)  # the kept u is the system's solution (CG on 3 distinct eigenvalues)
    assert torch.allclose(memory["u"][0], u, atol=1e-12)
    again, info = estimate(method, y, memory, warm_start=True)
    # started at the solution: no CG step, one product (the start's residual) for the cold solve's 3, the same estimate
    assert cold_info["iterations"] == 3
    assert (info["iterations"], info["warm_started"], info["hvp_evals"]) == (0.0, 1.0, cold_info["hvp_evals"] - 2)
    assert all(torch.allclose(a, c, atol=1e-12) for a, c in zip(again, cold))


def test_a_warm_solve_of_a_zero_right_hand_side_is_zero_at_no_cost():
    """grad_y f = 0 (y at the upper level's optimum in y): u = H^-1 0 = 0, which a cold CG returns at once. From a
    kept u the tolerance tol * ||b|| = 0 asks for an exact zero residual: CG ran 41 steps (42 products) toward
    0 and recorded residual 0 and converged. Now the solve is 0 at once, warm or cold, as the record says."""
    products = []

    def matvec(v):
        products.append(1)
        return [H @ v[0]]

    zero = [torch.zeros(3, dtype=DT)]
    for start in (None, [torch.tensor([1.0, -2.0, 3.0], dtype=DT)]):
        products.clear()
        v, info = conjugate_gradient(matvec, zero, 1e-10, 100, start)
        assert torch.equal(v[0], zero[0]) and products == []
        assert info == {"iterations": 0.0, "residual": 0.0, "negative_curvature": 0.0, "converged": 1.0}


@pytest.mark.parametrize("method", ["exact", "curvature"])
def test_a_kept_u_that_is_not_finite_is_no_start(method):
    """A solve that diverged once (a NaN or infinite u, kept by the client) would start every later solve on the
    same submodel: CG from it stops at its NaN curvature and returns it, so the client replied NaN for good, however
    the model recovered. A non-finite kept u is no start: the solve is the cold one, and its u is kept instead."""
    y = torch.tensor([0.5, 0.1, -0.4], dtype=DT)
    cold, cold_info = estimate(method, y)
    memory = {"u": [torch.tensor([float("nan"), 1.0, float("inf")], dtype=DT)]}
    warm, info = estimate(method, y, memory, warm_start=True)
    assert all(torch.equal(c, w) for c, w in zip(cold, warm)) and info == cold_info | {"warm_started": 0.0}
    assert torch.isfinite(memory["u"][0]).all()


def test_gd_takes_its_k_steps_from_the_kept_u():
    """NBO-GD from u0: u_K = u* + (I - s H)^K (u0 - u*); from 0 that is the K-term Neumann series."""
    y, K, s = torch.tensor([0.5, 0.1, -0.4], dtype=DT), 3, 0.2
    u_star = torch.linalg.solve(H, y - b)
    u0 = torch.tensor([1.0, 2.0, -3.0], dtype=DT)
    memory = {"u": [u0]}
    _, info = estimate("curvature", y, memory, solver="gd", K=K, step=s, warm_start=True)
    contraction = torch.linalg.matrix_power(torch.eye(3, dtype=DT) - s * H, K)
    assert torch.allclose(memory["u"][0], u_star + contraction @ (u0 - u_star), atol=1e-12)
    assert info["warm_started"] == 1.0 and info["iterations"] == K
    cold = {}
    estimate("curvature", y, cold, solver="gd", K=K, step=s, warm_start=True)
    assert torch.allclose(cold["u"][0], u_star - contraction @ u_star, atol=1e-12)


def test_warm_start_errors_say_what_is_missing(tmp_path):
    y = torch.zeros(3, dtype=DT)
    with pytest.raises(ValueError, match="warm_start needs a memory"):
        estimate("curvature", y, warm_start=True)
    with pytest.raises(ValueError, match="'neumann' keeps no memory"):
        estimate("neumann", y, {})
    with pytest.raises(ValueError, match="kept u has shapes"):
        estimate("exact", y, {"u": [torch.zeros(2, dtype=DT)]}, warm_start=True)
    path = warm(tmp_path)
    with pytest.raises(ScenarioError, match="algorithm.estimator_options.warm_start: must be true or false"):
        load_scenario(path, {"algorithm.estimator_options": {"warm_start": "yes"}})
    with pytest.raises(ScenarioError, match=r"algorithm.estimator_options.warm_start: not an option of neumann"):
        load_scenario(path, {"algorithm.estimator": "neumann"})


# ---------------------------------------------------------------- through the loop


def warm(tmp_path, **sections):
    """The small quadratic with RABO's curvature estimator warm-started, half of 4 clients per iteration."""
    base = {"clients": {"num": 4, "capacities": [1.0], "fraction": 0.5},
            "algorithm": {"estimator": "curvature", "estimator_options": {"warm_start": True}, "iterations": 6},
            "run": {"eval_every": 1}}
    for section, values in sections.items():
        base[section] = base.get(section, {}) | values
    return small(tmp_path, **base)


def outer_clients(records):
    """(iteration, partition, client record) of every outer-phase reply."""
    return [(r["iteration"], c["partition"], c) for r in records if r["phase"] == "outer" for c in r["clients"]]


def test_a_client_starts_from_the_u_it_kept_when_it_was_last_sampled(tmp_path, monkeypatch):
    """Each client's first outer phase starts cold, every later one from the u it left at its last one,
    whatever iterations it sat out (its state untouched meanwhile)."""
    calls = []  # the u each outer phase started from and the one it kept, in call order

    def recording(*args, memory=None, **kwargs):
        start = [t.clone() for t in memory.get("u", [])]
        result = hypergradient_with_stats(*args, memory=memory, **kwargs)
        calls.append((start, [t.clone() for t in memory["u"]]))
        return result

    monkeypatch.setattr(bilevel, "hypergradient_with_stats", recording)
    records = run_plain(load_scenario(warm(tmp_path)), QUIET).records
    replies = outer_clients(records)
    assert len(replies) == len(calls) == 12
    left: dict[int, tuple[int, list]] = {}
    sat_out = 0
    for (q, p, client), (start, kept) in zip(replies, calls):
        if p in left:
            last, u = left[p]
            sat_out += q - last > 1
            assert client["hg_warm_started"] == 1.0 and len(start) == len(u)
            assert all(torch.equal(s, t) for s, t in zip(start, u))
        else:
            assert client["hg_warm_started"] == 0.0 and start == []
        left[p] = q, kept
    assert sat_out  # some client sat out iterations between two of its outer phases (seed 0: partition 2, 2 -> 5)


def test_state_is_read_on_its_own_submodel_only(tmp_path):
    """At capacity 1/2 a static mask keeps the same rows, so the kept u is read; a rolling window moves every
    iteration, so each outer phase starts cold (a slice of other rows is no start)."""
    def started(mask):
        path = warm(tmp_path / mask, clients={"capacities": [0.5], "fraction": 1.0},
                    algorithm={"mask_x": mask, "mask_y": mask, "iterations": 3})
        return [c["hg_warm_started"] for q, _, c in outer_clients(run_plain(load_scenario(path), QUIET).records)]
    assert started("static") == [0.0] * 4 + [1.0] * 8
    assert started("rolling") == [0.0] * 12


def test_workers_carry_the_state_there_and_back(tmp_path, one_thread):
    """With two worker processes each client's state travels to the worker that runs it and back: the
    records of the sequential run."""
    sequential = run_plain(load_scenario(warm(tmp_path / "one")), QUIET).records
    pooled = run_plain(load_scenario(warm(tmp_path / "two", run={"workers": 2})), QUIET).records
    assert stable(pooled) == stable(sequential)


def test_a_resumed_run_gives_the_records_of_an_uninterrupted_one(tmp_path):
    """The clients' states are in the checkpoint: cut after iteration 3 and resumed, every record (the
    warm starts' solver iterations included) is that of the straight run."""
    straight = run_plain(load_scenario(warm(tmp_path / "straight")), QUIET).records
    cut = warm(tmp_path / "cut", run={"checkpoint_every": 1})
    run_plain(load_scenario(cut, {"algorithm.iterations": 3}), QUIET)
    resumed = run_plain(load_scenario(cut, {"run.resume": True}), QUIET).records
    trained = lambda records: [r for r in records if r["phase"] not in ("test", "done")]  # noqa: E731
    assert stable(trained(resumed)) == stable(trained(straight))
    assert any(c["hg_warm_started"] for q, _, c in outer_clients(resumed) if q == 4)


def test_flower_keeps_each_virtual_clients_state_in_its_nodes_context(tmp_path, one_thread):
    """Four simulated nodes, four partitions, two sampled per iteration: partition p always on node p, its state
    in that node's context under its own key, and the run gives the plain engine's records (a state read by
    another partition, or lost, would change the solves). Fewer nodes than partitions stop the run before
    training: Flower's simulation runs a node's messages in parallel on copies of its context."""
    def simulate(path, nodes):
        scenario = load_scenario(path)
        grid = InProcessGrid({"scenario": str(path)}, num_nodes=nodes)
        strategy = Rabo(scenario, virtual_clients=True)
        strategy.start(grid, strategy.initial_arrays(), num_rounds=2 * scenario.algorithm.iterations)
        return read_metrics(scenario.results_path / "metrics.jsonl"), grid

    flower, grid = simulate(warm(tmp_path / "flower"), 4)
    plain = run_plain(load_scenario(warm(tmp_path / "plain")), QUIET).records
    assert stable(flower) == stable(plain)
    assert sum(c["hg_warm_started"] for _, _, c in outer_clients(flower)) == 8  # all but each partition's first
    assert {node: sorted(context.state) for node, context in grid.contexts.items()} == \
        {101 + p: [f"client_state.{p}", f"client_state.{p}.submodel"] for p in range(4)}
    with pytest.raises(ValueError, match=r"algorithm.estimator_options.warm_start: .* \(--federation-config "
                                         r"\"num-supernodes=4\"\), not 2"):
        simulate(warm(tmp_path / "shared"), 2)


@pytest.mark.e2e
def test_warm_start_through_flwr_run_keeps_each_partitions_state_on_its_node(home, tmp_path):  # noqa: F811
    """Flower's simulation engine keeps a node's context between its messages: 3 partitions on 3 SuperNodes,
    every partition's solves after its first start from its kept u, and the run ends where the plain engine's
    does (up to the clients' thread count's round-off)."""
    flower, plain = flwr_run_and_plain(home, tmp_path, {
        "scenario": "scenarios/quadratic/rabo-curvature-warm.yaml", "algorithm.iterations": 3, "clients.num": 3,
        "run.eval_every": 1}, supernodes=3)
    started = lambda records: [(q, p, c["hg_warm_started"]) for q, p, c in outer_clients(records)]  # noqa: E731
    assert started(flower) == started(plain) == [(q, p, float(q > 1)) for q in (1, 2, 3) for p in range(3)]
    assert [e["x_error"] for e in flower if e["phase"] == "eval"] == pytest.approx(
        [e["x_error"] for e in plain if e["phase"] == "eval"], rel=1e-5)
