"""The plain engine with worker processes (``run.workers``) against the same run one client after another."""

from __future__ import annotations

import logging
import os
import signal

import torch

from rabo_flwr.algorithms import ALGORITHMS
from rabo_flwr.loop import Assignment, PhaseRound, PlainRunner, run_plain
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from tests.test_strategy import one_thread, phase_records, stable, tiny_scenario  # noqa: F401 - one_thread is a fixture

QUIET = logging.getLogger("quiet")


def outcomes_of(runner: PlainRunner, phase, assignments: list[Assignment]) -> list:
    """The outcomes the runner finishes one phase round with."""
    finished = []
    runner.run_phase(PhaseRound(phase, 1, 1, assignments, lambda outcomes: finished.extend(outcomes) or {}))
    return finished


def test_two_workers_give_the_records_and_model_of_one(tmp_path, one_thread):  # noqa: F811
    """Same seeds, same order of outcomes: every number but the machine's timings and memory is equal,
    with a raising client, a NaN reply and a straggler past the phase timeout handled alike."""
    faults = [{"partition": 0, "phase": "inner", "iterations": [1], "kind": "raise"},
              {"partition": 2, "phase": "outer", "iterations": [1], "kind": "nan"},
              {"partition": 3, "phase": "outer", "iterations": [2], "kind": "sleep", "seconds": 1.0}]
    run = {"faults": faults, "eval_every": 1, "phase_timeout": 0.5}
    results = {}
    for workers in (1, 2):
        path = tiny_scenario(tmp_path / f"workers{workers}", clients={"num": 4}, run=run | {"workers": workers})
        results[workers] = run_plain(load_scenario(path), QUIET)
    one, two = results[1], results[2]
    assert stable(one.records) == stable(two.records)
    assert all(torch.equal(one.state.tensors[s][n], two.state.tensors[s][n]) for s in ("x", "y") for n in one.state.tensors[s])
    inner, outer = phase_records(two.records, "inner"), phase_records(two.records, "outer")
    assert (inner[1]["failures"], inner[1]["clients_aggregated"]) == (1, 3)
    assert (outer[1]["rejected"], outer[1]["clients_aggregated"]) == (1, 3)
    assert (outer[2]["failures"], outer[2]["clients_aggregated"]) == (1, 3)
    assert inner[2]["clients_aggregated"] == 4 and len(outer[2]["clients"]) == 3


def test_lateness_is_the_injected_delay_never_the_machines_speed(tmp_path, one_thread):  # noqa: F811
    """With a timeout far below any phase's computation (1 ms), only the client a fault holds back is
    late: the plain engine's numbers do not depend on the machine's load."""
    faults = [{"partition": 0, "phase": "outer", "iterations": [1], "kind": "sleep", "seconds": 0.05}]
    path = tiny_scenario(tmp_path, clients={"num": 3}, algorithm={"iterations": 1},
                         run={"faults": faults, "phase_timeout": 0.001})
    result = run_plain(load_scenario(path), QUIET)
    inner, outer = phase_records(result.records, "inner")[1], phase_records(result.records, "outer")[1]
    assert (inner["failures"], inner["clients_aggregated"]) == (0, 3)
    assert (outer["failures"], outer["clients_aggregated"]) == (1, 2)


def test_a_worker_that_dies_fails_its_clients_and_the_next_phase_gets_a_fresh_pool(tmp_path, one_thread):  # noqa: F811
    scenario = load_scenario(tiny_scenario(tmp_path, clients={"num": 2, "capacities": [1.0]}, run={"workers": 2}))
    task = cached_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    inner = ALGORITHMS["rabo"].phases(scenario)[0]
    assignments = [Assignment(p, 1.0, {"x": x, "y": y}) for p in (0, 1)]
    runner = PlainRunner(scenario, task, torch.device("cpu"))
    try:
        before = outcomes_of(runner, inner, assignments)
        for process in list(runner.pool._processes.values()):
            os.kill(process.pid, signal.SIGKILL)
        died = outcomes_of(runner, inner, assignments)
        after = outcomes_of(runner, inner, assignments)
    finally:
        runner.close()
    assert all(o.updates is None and "worker process died" in o.error for o in died)
    assert [o.partition for o in died] == [0, 1]
    for a, b in zip(before, after):
        assert a.partition == b.partition and a.updates is not None and b.updates is not None
        assert all(torch.equal(a.updates["y"][n], b.updates["y"][n]) for n in a.updates["y"])
