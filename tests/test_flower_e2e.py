"""End to end through Flower's real simulation engine (Ray): `flwr run` on a tiny scenario."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from rabo_flwr.flower_run import LocalFederation, processes_mentioning
from rabo_flwr.results import read_metrics

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def federation(tmp_path):
    fed = LocalFederation(tmp_path / "flower")
    yield fed
    fed.close()
    assert not processes_mentioning(str(fed.workdir)), "a SuperLink or Ray process outlived the test"


def test_flwr_run_simulation_completes_both_phases(federation, tmp_path):
    results = tmp_path / "results"
    outcome = federation.run(
        REPO,
        run_config={"algorithm.iterations": 2, "clients.num": 3, "task.eval_episodes": 10, "model.width": 16,
                    "algorithm.inner_steps": 3, "run.results_dir": str(results)},
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
        timeout=600,
    )
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    records = read_metrics(results / "metrics.jsonl")
    phases = [(r["iteration"], r["phase"]) for r in records if r["phase"] in ("inner", "outer")]
    assert phases == [(1, "inner"), (1, "outer"), (2, "inner"), (2, "outer")]
    for r in records:
        if r["phase"] in ("inner", "outer"):
            assert r["clients_aggregated"] == 3 and r["failures"] == 0 and r["rejected"] == 0
            assert r["C_x*"] >= 1 and r["C_y*"] >= 1
            for key in ("bytes_down", "bytes_up", "flops", "wall_time"):
                assert math.isfinite(r[key]) and r[key] > 0, key
            loss = r["lower_loss"] if r["phase"] == "inner" else r["upper_loss"]
            assert math.isfinite(loss)
            assert sorted(c["partition"] for c in r["clients"]) == [0, 1, 2]
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["iteration"] for e in evals] == [0, 2]
    assert all(0.0 <= e["test_accuracy"] <= 1.0 for e in evals)
    assert (results / "model.pt").is_file() and (results / "scenario.yaml").is_file()


def test_straggler_past_the_phase_timeout_is_dropped_and_counted(federation, tmp_path):
    """Partition 1 sleeps past the 4 s phase timeout in iteration 1's outer phase: the iteration
    completes with the other two replies, and the run goes on to iteration 2 with all three."""
    scenario = tmp_path / "straggler.yaml"
    scenario.write_text(
        f"base: {REPO / 'scenarios' / 'quickstart.yaml'}\n"
        "run:\n  phase_timeout: 4.0\n  faults:\n  - {partition: 1, phase: outer, iterations: [1], kind: sleep, seconds: 12}\n")
    results = tmp_path / "results"
    outcome = federation.run(
        REPO,
        run_config={"scenario": str(scenario), "algorithm.iterations": 2, "clients.num": 3, "task.eval_episodes": 4,
                    "model.width": 8, "algorithm.inner_steps": 2, "run.results_dir": str(results)},
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
        timeout=600,
    )
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    records = {(r["iteration"], r["phase"]): r for r in read_metrics(results / "metrics.jsonl")}
    straggled = records[(1, "outer")]
    assert (straggled["failures"], straggled["clients_aggregated"]) == (1, 2)
    assert sorted(c["partition"] for c in straggled["clients"]) == [0, 2]
    assert records[(2, "outer")]["clients_aggregated"] == 3


def test_bad_run_config_fails_before_training_naming_file_and_key(federation, tmp_path):
    results = tmp_path / "results"
    outcome = federation.run(
        REPO, run_config={"clients.fraction": 2.0, "run.results_dir": str(results)},
        federation_config={"num-supernodes": 2, "client-resources-num-cpus": 1}, timeout=300,
    )
    assert outcome.status != "finished:completed"
    assert "scenarios/quickstart.yaml (run config override): clients.fraction: must be in (0, 1], got 2.0" in outcome.log
    assert not results.exists()


def test_flwr_run_loss_tuning_miniature(federation, tmp_path):
    """The paper's second task, miniature: long-tail CIFAR-10, VS-loss hyperparameters as x."""
    results = tmp_path / "results"
    outcome = federation.run(
        REPO, run_config={"scenario": "scenarios/loss_tuning_mini.yaml", "run.results_dir": str(results)},
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1}, timeout=600,
    )
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    records = read_metrics(results / "metrics.jsonl")
    assert [(r["iteration"], r["phase"]) for r in records if r["phase"] in ("inner", "outer")] == \
        [(1, "inner"), (1, "outer"), (2, "inner"), (2, "outer")]
    assert all(r["clients_aggregated"] == 3 and r["uncovered_x"] == 0.0 for r in records if r["phase"] == "outer")
    final = [r for r in records if r["phase"] == "eval"][-1]
    assert len(final["per_class_accuracy"]) == 10 and 0.0 <= final["balanced_accuracy"] <= 1.0
