"""The evaluation protocol: validation held out of the training data serves every choice, the
test split is read once (on the model kept), and ``clients.min_capacity`` leaves the weaker
clients out (the ``-full-only`` rows)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from rabo_flwr.data.omniglot import hold_out_alphabets, load_omniglot
from rabo_flwr.loop import PlainRunner, TrainingLoop
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import ScenarioError, load_scenario

REPO = Path(__file__).resolve().parent.parent
PAPER = REPO / "scenarios" / "paper"
CPU = torch.device("cpu")
QUIET = logging.getLogger("quiet")
TINY = {"model.backbone": "conv4", "model.width": 8, "algorithm.inner_steps": 2, "task.n_query": 2,
        "task.eval_episodes": 4, "task.val_episodes": 4, "task.eval_steps": 2}


def test_validation_and_test_episodes_share_no_character_and_no_client_holds_a_validation_character():
    scenario = load_scenario(PAPER / "fewshot.yaml", {"model.backbone": "conv4", "task.n_query": 2,
                                                      "task.val_episodes": 300, "task.eval_episodes": 300})
    task = cached_task(scenario)
    background = load_omniglot(background=True)
    evaluation = load_omniglot(background=False)
    training, validation = task._background_classes
    shards = [task._classes_of(p) for p in range(scenario.clients.num)]
    assert len(shards) == 10 and len(np.concatenate(shards)) == len(training)
    assert set(np.concatenate(shards)) == set(training)  # every training character, once
    assert set(training).isdisjoint(validation) and len(training) + len(validation) == len(background.class_names)
    held = set(background.alphabet_of_class[validation])
    assert len(held) == 5 and held.isdisjoint(background.alphabet_of_class[training])  # whole alphabets

    val_names = {background.class_names[c] for e in task._episodes("val") for c in e.classes.tolist()}
    test_names = {evaluation.class_names[c] for e in task._episodes("test") for c in e.classes.tolist()}
    assert val_names <= {background.class_names[c] for c in validation}
    assert len(val_names) > 100 and len(test_names) > 400  # the episodes cover most characters of each split
    assert val_names.isdisjoint(test_names)
    assert {n.split("/")[0] for n in val_names}.isdisjoint({n.split("/")[0] for n in test_names})
    for partition in range(10):  # the clients' training episodes never show a validation character
        for episode in task.client_episodes(partition, 1, CPU, 3):
            assert set(episode.classes.tolist()) <= set(shards[partition])


def test_hold_out_is_seeded_and_refuses_to_hold_out_everything():
    alphabet_of_class = np.repeat(np.arange(6), 3)
    train, val = hold_out_alphabets(alphabet_of_class, 2, seed=4)
    assert np.array_equal(val, hold_out_alphabets(alphabet_of_class, 2, seed=4)[1])
    assert len(val) == 6 and len(set(alphabet_of_class[val])) == 2 and sorted(np.concatenate([train, val])) == list(range(18))
    with pytest.raises(Exception, match="cannot hold out 6"):
        hold_out_alphabets(alphabet_of_class, 6, seed=0)


class Scripted:
    """Wraps a task: validation scores follow a script, every evaluation's split and model is recorded."""

    def __init__(self, task, script):
        self.task, self.script, self.calls = task, list(script), []

    def __getattr__(self, name):
        return getattr(self.task, name)

    def evaluate(self, x, y, device, split):
        self.calls.append((split, {k: v.clone() for k, v in x.items()}))
        metrics = self.task.evaluate(x, y, device, split)
        if split == "val":
            metrics["val_accuracy"] = self.script.pop(0)
        return metrics


@pytest.mark.parametrize("final_test", [True, False])
def test_the_run_keeps_the_best_validation_model_and_reads_the_test_split_once(tmp_path, final_test):
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", TINY | {
        "algorithm.iterations": 3, "run.eval_every": 1, "run.results_dir": str(tmp_path), "run.final_test": final_test})
    task = Scripted(cached_task(scenario), [0.2, 0.6, 0.4, 0.6])  # the best at iteration 1 (the first of the tie)
    records = TrainingLoop(scenario, task, PlainRunner(scenario, task, CPU), CPU, QUIET).run().records
    splits = [split for split, _ in task.calls]
    assert splits == ["val"] * 4 + (["test"] if final_test else [])
    tests = [r for r in records if r["phase"] == "test"]
    assert all("test_accuracy" not in r for r in records if r["phase"] == "eval")
    if final_test:
        (test,) = tests
        assert (test["iteration"], test["val_accuracy"], test["kept_by"]) == (1, 0.6, "val_accuracy")
        kept, tested = task.calls[1][1], task.calls[-1][1]  # the model evaluated at iteration 1 is the one tested
        assert all(torch.equal(kept[k], tested[k]) for k in kept)
        assert not all(torch.equal(kept[k], task.calls[3][1][k]) for k in kept)  # and training moved on after it
    else:
        assert tests == []


def test_early_stopping_reads_validation(tmp_path):
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", TINY | {
        "algorithm.iterations": 10, "run.eval_every": 1, "run.patience": 2, "run.results_dir": str(tmp_path)})
    task = Scripted(cached_task(scenario), [0.5, 0.7, 0.6, 0.65, 0.9])
    records = TrainingLoop(scenario, task, PlainRunner(scenario, task, CPU), CPU, QUIET).run().records
    assert records[-1] == records[-1] | {"phase": "done", "iteration": 3, "stopped_early": True}
    assert [r for r in records if r["phase"] == "test"][0]["iteration"] == 1


def test_only_clients_at_the_minimum_capacity_train(tmp_path):
    """FedMBO ``-full-only``: the paper's profile on 10 clients, only the two capacity-1 clients train."""
    scenario = load_scenario(PAPER / "table2" / "fedmbo.yaml", TINY | {
        "clients.capacities": [1.0, 0.5, 0.25, 0.125, 0.0625], "clients.min_capacity": 1.0,
        "algorithm.iterations": 1, "run.results_dir": str(tmp_path), "run.final_test": False,
        "algorithm.estimator_options": {"K": 3, "power_iters": 2}})
    task = cached_task(scenario)
    records = TrainingLoop(scenario, task, PlainRunner(scenario, task, CPU), CPU, QUIET).run().records
    phases = [r for r in records if r["phase"] in ("inner", "outer")]
    assert len(phases) == 2
    for record in phases:
        assert [(c["partition"], c["capacity"]) for c in record["clients"]] == [(0, 1.0), (5, 1.0)]
        assert record["clients_sent"] == 2


def test_full_model_rows_accept_weaker_tiers_only_when_they_sit_out():
    tiers = {"clients.capacities": [1.0, 0.5]}
    with pytest.raises(ScenarioError, match="every capacity must be 1 .or below clients.min_capacity"):
        load_scenario(PAPER / "table2" / "fedmbo.yaml", tiers)
    assert load_scenario(PAPER / "table2" / "fedmbo.yaml", tiers | {"clients.min_capacity": 1.0}).clients.min_capacity == 1.0
    with pytest.raises(ScenarioError, match="clients.min_capacity: 0.9 exceeds every capacity"):
        load_scenario(REPO / "scenarios" / "quickstart.yaml", {"clients.capacities": [0.5], "clients.min_capacity": 0.9})
    with pytest.raises(ScenarioError, match="task.val_alphabets: must be > 0"):
        load_scenario(REPO / "scenarios" / "quickstart.yaml", {"task.val_alphabets": 0})


def test_loss_tuning_validates_on_the_clients_validation_splits_and_tests_on_the_balanced_test_set():
    scenario = load_scenario(REPO / "scenarios" / "loss_tuning_mini.yaml")
    task = cached_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    val = task.evaluate(x, y, CPU, "val")
    test = task.evaluate(x, y, CPU, "test")
    assert set(val) == {"val_accuracy", "val_balanced_accuracy"}
    assert {"balanced_accuracy", "test_accuracy", "per_class_accuracy", "w"} <= set(test)
    pooled = np.concatenate([v for _, v in task.client_splits])
    trained = np.concatenate([t for t, _ in task.client_splits])
    images, _ = task._validation
    assert len(images) == len(pooled) and set(pooled).isdisjoint(trained) and set(pooled) <= set(task.long_tail)
