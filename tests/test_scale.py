"""1,000 virtual clients at 1% participation: the run works, and what the server and the clients'
task keep depends on the sampled clients only (checked by counting, never by timing)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import clients.client
from rabo_flwr.data.omniglot import ClassShards
from rabo_flwr.loop import PlainRunner, TrainingLoop
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from strategies import strategy_for
from tests.inprocess_grid import InProcessGrid

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
SMALL = {"model.width": 8, "algorithm.iterations": 2, "algorithm.inner_steps": 2, "task.eval_episodes": 4,
         "task.eval_steps": 2, "task.shard_by": "character", "clients.capacities": [0.5]}


@pytest.fixture
def counted(monkeypatch):
    """Counts of the shards worked out (by partition) and of the clients made."""
    counts = {"shards": [], "clients": 0}
    shard, init = ClassShards.__getitem__, clients.client.Client.__init__

    def counting_shard(self, partition):
        counts["shards"].append(partition)
        return shard(self, partition)

    def counting_init(self, *args, **kwargs):
        counts["clients"] += 1
        init(self, *args, **kwargs)

    monkeypatch.setattr(ClassShards, "__getitem__", counting_shard)
    monkeypatch.setattr(clients.client.Client, "__init__", counting_init)
    return counts


def run(tmp_path: Path, num: int, fraction: float, engine: str):
    """The run's records, the server's final state, and the engine (the strategy under Flower)."""
    overrides = SMALL | {"clients.num": num, "clients.fraction": fraction, "run.results_dir": str(tmp_path / f"{engine}-{num}")}
    scenario = load_scenario(QUICKSTART, overrides)
    task = cached_task(scenario)
    if engine == "flower":
        strategy = strategy_for(scenario, task=task, virtual_clients=True, device=torch.device("cpu"))
        strategy.start(InProcessGrid({"scenario": str(QUICKSTART), **overrides}, num_nodes=3), strategy.initial_arrays(),
                       num_rounds=scenario.algorithm.iterations * strategy.rounds_per_iteration)
        return strategy._loop.writer.records, strategy._loop.state, strategy
    runner = PlainRunner(scenario, task, torch.device("cpu"))
    result = TrainingLoop(scenario, task, runner, torch.device("cpu"), logging.getLogger("quiet")).run()
    return result.records, result.state, runner


@pytest.mark.parametrize("engine", ["plain", "flower"])
def test_thousand_clients_at_one_percent_keep_only_the_sampled_clients_state(tmp_path, counted, engine):
    records, state, runner = run(tmp_path, 1000, 0.01, engine)
    phases = [r for r in records if r["phase"] in ("inner", "outer")]
    assert [(r["iteration"], r["phase"]) for r in phases] == [(1, "inner"), (1, "outer"), (2, "inner"), (2, "outer")]
    sampled = {q: sorted(c["partition"] for c in r["clients"]) for q, r in ((r["iteration"], r) for r in phases)}
    for r in phases:
        assert (r["clients_sent"], r["clients_aggregated"], r["failures"], r["rejected"]) == (10, 10, 0, 0)
        assert np.isfinite(r["lower_loss" if r["phase"] == "inner" else "upper_loss"])
    assert sampled[1] != sampled[2] and max(sampled[1] + sampled[2]) >= 100  # really drawn from the 1,000
    # what the server keeps: plans of this iteration's 10 clients, one profile per node (not per client)
    assert len(state.plans) == 10
    if engine == "flower":
        assert len(runner.profiles) == 3
    # a shard is worked out only for a sampled client, once per phase it trains in; a client is made per message
    assert set(counted["shards"]) == set(sampled[1]) | set(sampled[2])
    assert len(counted["shards"]) == counted["clients"] == 2 * 2 * 10


def test_more_clients_than_disjoint_five_character_shards_share_characters():
    """Omniglot's 964 characters give 192 disjoint 5-character shards; 1,000 clients hold 5
    characters each, every character held by 5 or 6 of them; 10 clients keep disjoint shards."""
    alphabet_of_class = np.repeat(np.arange(30), 33)[:964]
    shards = ClassShards(alphabet_of_class, 1000, seed=0, by="character", min_classes=5)
    held = [shards[s] for s in range(1000)]
    assert all(len(h) == 5 and len(set(h.tolist())) == 5 for h in held)
    assert set(np.bincount(np.concatenate(held), minlength=964).tolist()) == {5, 6}
    few = ClassShards(alphabet_of_class, 10, seed=0, by="character", min_classes=5)
    together = np.concatenate([few[s] for s in range(10)])
    assert sorted(together.tolist()) == list(range(964))  # disjoint and complete, sizes 96 or 97
    assert {len(few[s]) for s in range(10)} == {96, 97}
