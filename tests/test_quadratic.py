"""The quadratic task: its closed forms, the estimators on it against them, and each algorithm's convergence."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from rabo_flwr.algorithms import ClientJob
from rabo_flwr.algorithms.bilevel import outer_phase
from rabo_flwr.cost import CostMeter
from rabo_flwr.federation import ServerState
from rabo_flwr.loop import run_plain
from rabo_flwr.masks import scenario_policies
from rabo_flwr.results import read_metrics
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import ScenarioError, load_scenario
from rabo_flwr.submodel import kept_count
from tests.test_strategy import one_thread, run_flower, stable  # noqa: F401 - one_thread is a fixture

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "scenarios" / "quadratic" / "base.yaml"
CPU = torch.device("cpu")
DT = torch.float64
SMALL = {"task": {"channels": 4, "x_dim": 3, "y_dim": 4},  # 4 clients, 4 rows of (3 + 4) columns
         "clients": {"num": 4, "capacities": [1.0]}, "algorithm": {"iterations": 60}, "run": {"eval_every": 10}}


def small(tmp_path: Path, **sections) -> Path:
    """scenarios/quadratic/base.yaml shrunk to SMALL, then the given sections' keys set; written to tmp_path."""
    data = yaml.safe_load(BASE.read_text())
    for source in (SMALL, sections):
        for section, values in source.items():
            data.setdefault(section, {}).update(values)
    data["run"]["results_dir"] = str(tmp_path / "results")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(DT) - b.to(DT)).norm() / b.to(DT).norm())


def last_eval(records: list[dict]) -> dict:
    return [r for r in records if r["phase"] == "eval"][-1]


@pytest.fixture(params=[0.0, 0.3], ids=["shared-hessians", "heterogeneous-hessians"])
def task(request):
    scenario = load_scenario(BASE, {"task.hessian_heterogeneity": request.param})
    return cached_task(scenario)


# ---------------------------------------------------------------- closed forms


def test_closed_forms_solve_the_federated_problem(task):
    """y*(x) zeroes grad_y of the mean g; x* zeroes grad F, with F differentiated by autograd through
    the linear solve of y*(x), so the formulas of the docstring are checked, not reused."""
    x_star = task.x_star()
    x = torch.randn(x_star.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = task.y_star(x).requires_grad_(True)
    mean_g = sum(task.lower_loss({"x": x}, {"y": y}, c) for c in task.problems) / task.num_partitions
    assert float(torch.autograd.grad(mean_g, y)[0].norm()) < 1e-10
    for point, expect_zero in ((x_star, True), (x, False)):
        point = point.clone().requires_grad_(True)
        objective = sum(task.upper_loss({"x": point}, {"y": task.y_star(point)}, c) for c in task.problems) / task.num_partitions
        (grad,) = torch.autograd.grad(objective, point)
        assert (float(grad.norm()) < 1e-10) == expect_zero
    assert torch.allclose(x_star, x_star[0].expand_as(x_star))  # every row is a copy of one problem
    assert task.evaluate({"x": x_star.float()}, {"y": task.y_star(x_star).float()}, CPU, "val")["x_error"] < 1e-6


def test_capacity_keeps_a_fraction_of_the_rows_of_x_and_y(task):
    scenario = task.scenario
    x, y = task.init_tensors(scenario.seed)
    state = ServerState(task.layouts, x, y, scenario_policies(scenario))
    state.plan_iteration(1, {0: 1.0, 1: 0.25, 2: 0.0625})
    for client, rows in ((0, 16), (1, 4), (2, 1)):
        sliced = state.slices(client)
        assert sliced["x"]["x"].shape == (rows, 4) and sliced["y"]["y"].shape == (rows, 6)


# ---------------------------------------------------------------- hypergradients on a client's slice


def client_hypergradient(task, partition: int, estimator: str, options: dict, rows: list[int]):
    """The real client's outer phase on a slice of rows at a point (x, y) with y far from y*(x),
    next to the closed form on the same rows."""
    gen = torch.Generator().manual_seed(partition)
    x = torch.randn(task.rows, task.p, dtype=DT, generator=gen)
    y = torch.randn(task.rows, task.q, dtype=DT, generator=gen)
    job = ClientJob(task, task.scenario, partition, 1, CPU, {"x": x[rows]}, {"y": y[rows]}, CostMeter(CPU, count_flops=False))
    estimate = outer_phase(job, estimator, options, task.scenario.algorithm.inner_steps).updates["x"]["x"]
    beta = options.get("beta") if estimator == "fd-coordinate" else None
    return estimate, task.client_hypergradient(partition, x, y, beta)[rows]


ROWS = [0, 5, 11]


def test_exact_estimator_is_the_closed_form_hypergradient(task):
    for partition in range(3):
        estimate, closed_form = client_hypergradient(task, partition, "exact", {"tol": 1e-12}, ROWS)
        assert rel(estimate, closed_form) < 1e-6


def test_neumann_estimator_reaches_the_closed_form_with_enough_terms(task):
    errors = {K: rel(*client_hypergradient(task, 1, "neumann", {"K": K, "seed": 0}, ROWS)) for K in (3, 60)}
    assert errors[60] < 1e-6 < errors[3]  # a short series is visibly truncated


def test_fd_coordinate_estimator_is_its_own_target(task):
    """fd-coordinate on every coordinate aims at grad_x f - beta H_xy grad_y f, not at the hypergradient."""
    beta = task.scenario.algorithm.beta
    estimate, target = client_hypergradient(task, 2, "fd-coordinate", {"beta": beta, "seed": 0}, ROWS)
    assert rel(estimate, target) < 1e-6
    _, exact = client_hypergradient(task, 2, "exact", {}, ROWS)
    assert rel(estimate, exact) > 1e-2


def test_curvature_estimator_is_the_closed_form_hypergradient(task):
    """NBO's two steps by CG on the client's rows, y far from y*(x): the Newton step lands on the client's own
    y_i*(x) (g_i is quadratic in y), and as grad_x f_i and H_xy = -B_i do not depend on y, the estimate is the
    client's closed form at (x, y), as exact's is."""
    for partition in range(3):
        estimate, closed_form = client_hypergradient(task, partition, "curvature", {"tol": 1e-12}, ROWS)
        assert rel(estimate, closed_form) < 1e-6


# ---------------------------------------------------------------- convergence of each algorithm


def run(path: Path) -> tuple[list[dict], object]:
    result = run_plain(load_scenario(path), logging.getLogger("quiet"))
    return result.records, result.state


@pytest.mark.parametrize("name", ["rabo", "fedmbo"])
def test_algorithm_drives_x_error_below_1e_2(tmp_path, name):
    records, _ = run(small(tmp_path, algorithm={"name": name}))
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals[0]["x_error"] > 0.5 and evals[-1]["x_error"] < 1e-2


def test_rabo_with_the_curvature_estimator_drives_x_error_below_1e_2(tmp_path):
    """scenarios/quadratic/rabo-curvature.yaml as it stands, shrunk as SMALL; each client's record carries the
    estimator's diagnostics: both CG solves converged, full Newton steps that lowered g_i and moved y by the
    distance from the federated y to the client's own y_i*(x) (heterogeneous clients: never 0)."""
    shrink = {"task.channels": 4, "task.x_dim": 3, "task.y_dim": 4, "clients.num": 4, "algorithm.iterations": 60,
              "run.eval_every": 10, "run.results_dir": str(tmp_path / "results")}
    scenario = load_scenario(REPO / "scenarios" / "quadratic" / "rabo-curvature.yaml", shrink)
    assert (scenario.algorithm.name, scenario.algorithm.resolved_estimator) == ("rabo", "curvature")
    records = run_plain(scenario, logging.getLogger("quiet")).records
    evals = [r for r in records if r["phase"] == "eval"]
    assert evals[0]["x_error"] > 0.5 and evals[-1]["x_error"] < 1e-2
    clients = [c for r in records if r["phase"] == "outer" for c in r["clients"]]
    assert len(clients) == 60 * 4
    assert all(c["hg_converged"] == 1 and c["hg_negative_curvature"] == 0 and c["hg_newton_step"] == 1
               and c["hg_lower_decrease"] > 0 and c["hg_newton_norm"] > 0 for c in clients)


def test_rafbo_drives_x_error_below_1e_2_where_beta_inverts_the_lower_hessian(tmp_path):
    """RAFBO's estimator replaces [H_yy]^-1 by beta I: with H_yy = I (condition 1) and beta = 1 that is exact."""
    records, _ = run(small(tmp_path, task={"condition": 1.0}, algorithm={"name": "rafbo", "beta": 1.0}))
    assert last_eval(records)["x_error"] < 1e-2


def test_rafbo_elsewhere_converges_to_the_fixed_point_of_its_estimator(tmp_path):
    """With H_yy = A != I / beta, RAFBO stops where mean_i [mu x + beta B' (y*(x) - b_i)] = 0, i.e. at
    x_beta = (mu I + beta B'A^-1 B)^-1 beta B' (b - A^-1 c), not at x*."""
    path = small(tmp_path, algorithm={"name": "rafbo"})
    records, state = run(path)
    task = cached_task(load_scenario(path))
    m, beta = task.mean_problem(), task.scenario.algorithm.beta
    system = task.mu * torch.eye(task.p, dtype=DT) + beta * m.B.T @ torch.linalg.solve(m.A, m.B)
    x_beta = torch.linalg.solve(system, beta * m.B.T @ (m.b - torch.linalg.solve(m.A, m.c))).expand(task.rows, task.p)
    assert rel(state.x["x"], x_beta) < 1e-4
    assert last_eval(records)["x_error"] > 1e-2


def test_partial_capacity_converges_row_by_row_to_the_problem_of_the_clients_holding_the_row(tmp_path):
    """Coverage-counted averaging: with static masks and capacities 1 and 1/2, rows 0-1 are held by all
    four clients and rows 2-3 by the two at capacity 1, so rows 2-3 converge to those two clients' x*,
    which is not the federation's."""
    path = small(tmp_path, clients={"num": 4, "capacities": [1.0, 0.5]}, algorithm={"mask_x": "static"})
    records, state = run(path)
    task = cached_task(load_scenario(path))
    holders = [[i for i in range(4) if kept_count(task.scenario.capacity(i, 0), task.rows) > j] for j in range(task.rows)]
    assert holders == [[0, 1, 2, 3]] * 2 + [[0, 2]] * 2
    target = torch.stack([task.x_star(clients)[j] for j, clients in enumerate(holders)])
    assert rel(state.x["x"], target) < 1e-4
    assert last_eval(records)["x_error"] > 0.1


def test_partial_capacity_reaches_x_star_when_the_clients_agree(tmp_path):
    """The bias above is the clients' disagreement, not the submodels: with identical clients every
    holder's gradient is the federation's, so the default (rolling) masks at capacities 1 and 1/2 reach x*."""
    path = small(tmp_path, task={"heterogeneity": 0.0}, clients={"num": 4, "capacities": [1.0, 0.5]})
    records, _ = run(path)
    assert last_eval(records)["x_error"] < 1e-3
    path = small(tmp_path / "disagree", clients={"num": 4, "capacities": [1.0, 0.5]})
    assert last_eval(run(path)[0])["x_error"] > 0.01


def test_early_stopping_follows_an_error_downwards(tmp_path):
    """x_error is lower-is-better: patience counts evaluations that fail to go below the best by min_delta,
    so the run goes on while the error falls and stops once it no longer does."""
    records, _ = run(small(tmp_path, algorithm={"iterations": 300}, run={"eval_every": 2, "patience": 2, "min_delta": 1e-6}))
    done = records[-1]
    assert done["stopped_early"] and 10 < done["iteration"] < 300
    assert last_eval(records)["x_error"] < 1e-4


def test_a_diverged_evaluation_is_the_worst_one_never_kept_and_no_progress(tmp_path, monkeypatch):
    """Validation NaN at iterations 0, 4 and 6 (a diverged model): the run goes on, keeps the best finite
    evaluation (2), counts the NaNs as no progress (patience 2 stops it at 6) and writes null for them."""
    path = small(tmp_path, algorithm={"iterations": 40}, run={"eval_every": 2, "patience": 2, "min_delta": 1e-6})
    task = cached_task(load_scenario(path))
    evaluate, calls = type(task).evaluate, []

    def diverging(self, x, y, device, split):
        metrics = evaluate(self, x, y, device, split)
        calls.append(split)
        return {k: float("nan") for k in metrics} if split == "val" and len(calls) in (1, 3, 4) else metrics

    monkeypatch.setattr(type(task), "evaluate", diverging)
    records, _ = run(path)
    evals = {r["iteration"]: r["x_error"] for r in records if r["phase"] == "eval"}
    assert list(evals) == [0, 2, 4, 6] and [v != v for v in evals.values()] == [True, False, True, True]
    test, done = [r for r in records if r["phase"] in ("test", "done")]
    assert test["iteration"] == 2 and test["x_error"] == evals[2] and done["stopped_early"] and done["iteration"] == 6
    written = read_metrics(load_scenario(path).results_path / "metrics.jsonl")
    assert [r["x_error"] for r in written if r["phase"] == "eval"][2] is None


def test_flower_message_path_gives_the_plain_engines_records(tmp_path, one_thread):  # noqa: F811
    """The task through the real strategy and ClientApp (in-process grid), with the paper's capacities."""
    sections = {"clients": {"num": 4, "capacities": [1.0, 0.5, 0.25]}, "algorithm": {"iterations": 3}}
    flower = run_flower(small(tmp_path / "flower", **sections), num_nodes=4)
    plain, _ = run(small(tmp_path / "plain", **sections))
    assert stable(flower) == stable(plain) and last_eval(plain)["x_error"] < 0.9 * plain[0]["x_error"]


@pytest.mark.parametrize("key,value,fragment", [
    ("task.condition", 0.5, "must be >= 1"), ("task.channels", 0, "must be > 0"),
    ("task.heterogeneity", -1.0, "must be >= 0"), ("task.upper_l2", 0.0, "must be > 0"),
])
def test_bad_quadratic_options_name_file_and_key(tmp_path, key, value, fragment):
    section, name = key.split(".")
    path = small(tmp_path, **{section: {name: value}})
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value).startswith(f"{path}: {key}:") and fragment in str(err.value)
