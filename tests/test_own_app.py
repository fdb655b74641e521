"""Using rabo_flwr from your own Flower app: the strategies are Flower Strategies, a user's ServerApp
gets Flower's Result with the plain engine's model, federated evaluation, tasks of your own
("package.module:ClassName"), and the example app under examples/ridge-penalties."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from rabo_flwr.flower_run import FlowerHome
from rabo_flwr.loop import run_plain
from rabo_flwr.results import read_metrics
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import ScenarioError, load_scenario
from strategies import Rabo, SinglePhase, global_arrays, sides_of
from tests.inprocess_grid import InProcessGrid
from tests.test_strategy import one_thread, stable, tiny_scenario  # noqa: F401 - one_thread is a fixture

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "ridge-penalties"
EXAMPLE_SCENARIO = EXAMPLE / "ridge_penalties" / "scenario.yaml"
QUIET = logging.getLogger("quiet")


def context(run_config: dict) -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)


# A user's own ServerApp, as small as it gets: not the project's rabo_flwr/server_app.py.
user_app = ServerApp()
user_results: list[Result] = []


@user_app.main()
def user_main(grid: Grid, ctx: Context) -> None:
    scenario = load_scenario(ctx.run_config["scenario"])
    strategy = Rabo(scenario)
    user_results.append(strategy.start(grid, strategy.initial_arrays(), num_rounds=2 * scenario.algorithm.iterations))


def run_user_app(path: Path, num_nodes: int = 3) -> Result:
    run_config = {"scenario": str(path)}
    user_results.clear()
    user_main(InProcessGrid(run_config, num_nodes), context(run_config))
    (result,) = user_results
    return result


def test_the_exported_strategies_are_flower_strategies_one_per_family():
    assert issubclass(Rabo, Strategy) and issubclass(SinglePhase, Strategy)
    assert set(Rabo.algorithms) == {"rabo", "rafbo", "fedmbo", "fedavg"}
    assert set(SinglePhase.algorithms) == {"static", "oap", "fedrolex", "fiarse", "dist-protonet", "dist-maml"}
    with pytest.raises(ValueError, match="Rabo runs algorithm.name in rabo, rafbo, fedmbo, fedavg; the scenario's is 'fedrolex'"):
        Rabo(load_scenario(REPO / "scenarios" / "paper" / "table2" / "fedrolex.yaml"))


def test_a_users_server_app_gets_flowers_result_with_the_plain_engines_model(tmp_path, one_thread):
    """A minimal user ServerApp runs Rabo.start over a Grid: the Result's arrays are the plain engine's
    final x and y exactly, and its metrics are the loop's records, one training round per phase."""
    flower_path = tiny_scenario(tmp_path / "flower")
    result = run_user_app(flower_path)
    plain = run_plain(load_scenario(tiny_scenario(tmp_path / "plain")), QUIET)
    x, y = sides_of(result.arrays)
    assert set(x) == set(plain.state.x) and set(y) == set(plain.state.y)
    assert all(torch.equal(x[n], plain.state.x[n]) for n in x) and all(torch.equal(y[n], plain.state.y[n]) for n in y)
    initial_x, _ = sides_of(Rabo(load_scenario(flower_path)).initial_arrays())
    assert any(not torch.equal(x[n], initial_x[n]) for n in x)  # it trained
    # two iterations of inner and outer: rounds 1..4; evaluations after rounds 0 and 4
    assert sorted(result.train_metrics_clientapp) == [1, 2, 3, 4]
    assert sorted(result.evaluate_metrics_serverapp) == [0, 4] and result.evaluate_metrics_clientapp == {}
    phases = [r for r in plain.records if r["phase"] in ("inner", "outer")]
    for number, record in zip(range(1, 5), phases):
        metrics = result.train_metrics_clientapp[number]
        assert metrics["iteration"] == record["iteration"] and metrics["clients_aggregated"] == 3
        assert metrics["C_x*"] == record["C_x*"] and metrics["flops"] == record["flops"]
    final = [r for r in plain.records if r["phase"] == "eval"][-1]
    assert result.evaluate_metrics_serverapp[4]["val_accuracy"] == final["val_accuracy"]
    (test,) = [r for r in plain.records if r["phase"] == "test"]
    assert result.evaluate_metrics_serverapp[4]["test_accuracy"] == test["test_accuracy"]
    assert result.evaluate_metrics_serverapp[4]["kept_iteration"] == test["iteration"]


def test_federated_evaluation_beside_the_server_side_one_in_both_engines(tmp_path, one_thread):
    """With run.federated_eval every client evaluates the global model on episodes of its own characters:
    recorded as client_* beside the server's metrics, the same in both engines, and in the Result."""
    federated = {"run": {"federated_eval": True}}
    flower_path = tiny_scenario(tmp_path / "flower", **federated)
    result = run_user_app(flower_path)
    flower = read_metrics(load_scenario(flower_path).results_path / "metrics.jsonl")
    plain = run_plain(load_scenario(tiny_scenario(tmp_path / "plain", **federated)), QUIET).records
    assert stable(flower) == stable(plain)
    evals = [r for r in flower if r["phase"] == "eval"]
    n_way, n_query = 5, 5  # quickstart's episodes; each client evaluates eval_episodes // clients = 8 // 3 = 2
    for e in evals:
        assert e["client_clients"] == 3 and e["client_examples"] == 3 * 2 * n_way * n_query
        assert 0.0 <= e["client_accuracy"] <= 1.0 and "val_accuracy" in e
    assert sorted(result.evaluate_metrics_clientapp) == [0, 4]
    assert result.evaluate_metrics_clientapp[4]["accuracy"] == evals[-1]["client_accuracy"]
    assert result.evaluate_metrics_serverapp[4]["val_accuracy"] == evals[-1]["val_accuracy"]


def test_a_clients_evaluation_is_its_own_partitions_example_weighted(tmp_path):
    """The federated number is the example-weighted mean of each partition's own evaluation."""
    scenario = load_scenario(tiny_scenario(tmp_path))
    task = cached_task(scenario)
    x, y = task.init_tensors(0)
    own = [task.evaluate_client(p, x, y, torch.device("cpu")) for p in range(3)]
    assert len({o["accuracy"] for o in own}) > 1  # each client its own characters
    strategy = Rabo(scenario)
    replies = [strategy_reply(o) for o in own]
    merged = strategy.aggregate_evaluate(0, replies)
    total = sum(o["examples"] for o in own)
    assert merged["accuracy"] == pytest.approx(sum(o["accuracy"] * o["examples"] for o in own) / total)
    assert (merged["examples"], merged["clients"]) == (total, 3)


def strategy_reply(metrics: dict):
    from flwr.app import Message

    message = Message(RecordDict(), dst_node_id=101, message_type="evaluate")
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)


def test_rounds_must_cover_whole_iterations_and_rounds_come_from_start(tmp_path):
    strategy = Rabo(load_scenario(tiny_scenario(tmp_path)))
    with pytest.raises(ValueError, match="num_rounds must be a positive multiple of 2"):
        strategy.start(InProcessGrid({}, 1), ArrayRecord(), num_rounds=3)
    with pytest.raises(RuntimeError, match="server round 1 is not the phase the training loop is in"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), InProcessGrid({}, 1))


def test_initial_arrays_that_do_not_fit_the_task_stop_the_run_before_training(tmp_path):
    scenario = load_scenario(tiny_scenario(tmp_path))
    strategy = Rabo(scenario)
    x, y = sides_of(strategy.initial_arrays())
    name = next(iter(y))
    with pytest.raises(ValueError, match=f"initial y: {name}: shape"):
        strategy.start(InProcessGrid({"scenario": "unused"}, 3), global_arrays(x, y | {name: torch.zeros(1)}), num_rounds=2)
    assert not scenario.results_path.exists()


# ---------------------------------------------------------------- a task of your own


@pytest.fixture
def example_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def own_task(tmp_path: Path, task: dict) -> Path:
    data = yaml.safe_load(EXAMPLE_SCENARIO.read_text())
    data["task"] = task
    path = tmp_path / "own.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("task,message", [
    ({"name": "ridge_penalties.task"}, "task.name: 'ridge_penalties.task' is not one of fewshot, loss-tuning"),
    ({"name": "no_such_package.task:Task"}, "task.name: cannot import no_such_package.task (No module named 'no_such_package')"),
    ({"name": "ridge_penalties.task:Missing"}, "task.name: module ridge_penalties.task has no Missing"),
    ({"name": "ridge_penalties.task:Options"}, "task.name: ridge_penalties.task:Options is not a subclass of rabo_flwr.tasks.BilevelTask"),
    ({"name": "ridge_penalties.task:RidgePenalties", "options": {"featurs": 3}},
     "task.options.featurs: unknown key (known: features, noise, samples, spread, test_samples, val_samples)"),
    ({"name": "ridge_penalties.task:RidgePenalties", "options": {"features": "six"}},
     "task.options.features: expected an integer, got 'six'"),
    ({"name": "ridge_penalties.task:RidgePenalties", "options": {"features": 50}},
     "task.options: samples, val_samples and test_samples must be >= features (50)"),
    ({"name": "ridge_penalties.task:RidgePenalties", "options": [1]}, "task.options: expected a mapping, got list"),
    ({"name": "ridge_penalties.task:RidgePenalties", "n_way": 3},
     "task.n_way: not an option of ridge_penalties.task:RidgePenalties (its options go under task.options)"),
    ({"name": "fewshot", "options": {"features": 3}}, "task.options: only a task of your own"),
])
def test_a_task_of_your_own_is_checked_like_every_other_key(tmp_path, example_on_path, task, message):
    path = own_task(tmp_path, task)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_a_task_of_your_own_reaches_its_known_optimum_in_the_plain_engine(tmp_path, example_on_path):
    """The example's task by name, its options validated into its Options dataclass; RABO learns the
    per-feature penalties whose ridge fit is exact on the federation's validation data."""
    scenario = load_scenario(EXAMPLE_SCENARIO, {"run.results_dir": str(tmp_path / "results")})
    assert type(scenario.task.options).__name__ == "Options" and scenario.task.options.features == 6
    result = run_plain(scenario, QUIET)
    task = cached_task(scenario)
    learned = result.state.x["log_penalty"].exp()
    start = torch.ones(6)  # exp(0)
    optimum = task.optimal_penalties()
    assert (learned - optimum).abs().max() < 0.01 < (start - optimum).abs().max()
    evals = [r for r in result.records if r["phase"] == "eval"]
    assert evals[0]["val_r2"] < 0.0 < 0.95 < evals[-1]["val_r2"]
    assert evals[-1]["client_val_loss"] < evals[0]["client_val_loss"] / 10 and evals[-1]["client_clients"] == 4
    assert all(r["flops"] > 0 for r in result.records if r["phase"] in ("inner", "outer"))


@pytest.mark.e2e
def test_the_example_app_runs_with_flwr_run(tmp_path, example_on_path):
    """`flwr run examples/ridge-penalties`: a user's own ServerApp and ClientApp, importing the strategy and
    the client side, with their own task; the model it writes is the known optimum, as in the plain engine."""
    results = tmp_path / "results"
    home = FlowerHome(tmp_path / "flower")
    try:
        outcome = home.run(EXAMPLE, run_config={"run.results_dir": str(results)}, timeout=600)
    finally:
        home.close()
    assert not home.leftovers(), "a SuperLink or Ray process outlived the test"
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    assert "Starting Rabo strategy: 40 rounds (20 iterations of inner, outer)" in outcome.log
    assert "learned penalties [0.5" in outcome.log
    records = read_metrics(results / "metrics.jsonl")
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["iteration"] for e in evals] == [0, 5, 10, 15, 20]
    assert evals[-1]["penalty_error"] < 0.01 < evals[0]["penalty_error"]  # the user's evaluate_fn
    assert evals[-1]["client_clients"] == 4 and evals[-1]["val_r2"] > 0.95
    model = torch.load(results / "model.pt")
    plain = run_plain(load_scenario(EXAMPLE_SCENARIO, {"run.results_dir": str(tmp_path / "plain")}), QUIET).state
    assert torch.allclose(model["x"]["log_penalty"], plain.x["log_penalty"], atol=1e-5)
    assert torch.allclose(model["y"]["w"], plain.y["w"], atol=1e-5)


def test_federated_evaluation_needs_the_tasks_client_side_evaluation(tmp_path, example_on_path):
    """A task without evaluate_client under run.federated_eval: one error before any result is written."""
    from ridge_penalties.task import RidgePenalties

    from rabo_flwr.loop import PlainRunner, TrainingLoop
    from rabo_flwr.tasks import BilevelTask

    class WithoutClientEvaluation(RidgePenalties):
        evaluate_client = BilevelTask.evaluate_client

    scenario = load_scenario(EXAMPLE_SCENARIO, {"run.results_dir": str(tmp_path / "results")})
    task, cpu = WithoutClientEvaluation(scenario), torch.device("cpu")
    with pytest.raises(ValueError, match="run.federated_eval: WithoutClientEvaluation has no evaluate_client"):
        TrainingLoop(scenario, task, PlainRunner(scenario, task, cpu), cpu, QUIET).run()
    assert not scenario.results_path.exists()
