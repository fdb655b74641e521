"""The real strategy and client handlers, wired by an in-process grid: faults, bad replies, resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml
from flwr.app import ArrayRecord, Context, Message, RecordDict

from rabo_flwr import server_app
from rabo_flwr.masks import make_policy
from rabo_flwr.results import read_metrics
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from rabo_flwr.submodel import numel_in_plan
from rabo_flwr.masks import build_plan
from tests.inprocess_grid import InProcessGrid

REPO = Path(__file__).resolve().parent.parent
TINY = {"model": {"width": 8}, "task": {"eval_episodes": 8, "eval_steps": 5},
        "algorithm": {"iterations": 2, "inner_steps": 2}, "clients": {"num": 3}}


def tiny_scenario(tmp_path: Path, **sections) -> Path:
    """quickstart.yaml, shrunk, with the given sections merged in; written to tmp_path."""
    data = yaml.safe_load((REPO / "scenarios" / "quickstart.yaml").read_text())
    for section, values in {**TINY, **sections}.items():
        data.setdefault(section, {}).update(values)
    data.setdefault("run", {})["results_dir"] = str(tmp_path / "results")
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def run(path: Path, overrides: dict | None = None, num_nodes: int = 3, **grid_kwargs) -> list[dict]:
    run_config = {"scenario": str(path), **(overrides or {})}
    grid = InProcessGrid(run_config, num_nodes, **grid_kwargs)
    server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config))
    scenario = load_scenario(path, overrides)
    return read_metrics(scenario.results_path / "metrics.jsonl")


def phase_records(records, phase):
    return {r["iteration"]: r for r in records if r["phase"] == phase}


def expected_elements(path: Path, capacity: float, iteration: int, side: str = "x") -> int:
    scenario = load_scenario(path)
    task = cached_task(scenario)
    x, y = task.init_tensors(0)
    algo = scenario.algorithm
    policies = {s: make_policy(getattr(algo, f"mask_{s}"), scenario.seed) for s in ("x", "y")}
    plan = build_plan(task.layouts, policies, capacity, iteration, 0)
    return numel_in_plan(x if side == "x" else y, task.layouts[side], plan)


@pytest.mark.parametrize("kind,reason", [
    ("names", "wrong array names"), ("shape", "shape"), ("nan", "NaN"), ("dtype", "dtype"), ("records", "missing records"),
])
def test_bad_replies_are_rejected_not_aggregated(tmp_path, kind, reason, caplog):
    """Partition 1's replies are spoiled on their way back; the strategy must drop exactly those."""

    def spoil(message: Message, reply: Message) -> Message:
        if not message.metadata.message_type.startswith("train") or message.content["config"]["partition"] != 1:
            return reply
        update = reply.content["update"].to_torch_state_dict()
        name = next(iter(update))
        if kind == "names":
            update[name + ".bogus"] = update.pop(name)
        elif kind == "shape":
            update[name] = update[name][..., :1].contiguous() if update[name].ndim else torch.zeros(2)
        elif kind == "nan":
            update[name] = torch.full_like(update[name], float("inf"))
        elif kind == "dtype":
            update[name] = update[name].to(torch.int32)
        content = RecordDict({"metrics": reply.content["metrics"]} if kind == "records" else
                             {"update": ArrayRecord(update), "metrics": reply.content["metrics"]})
        return Message(content, reply_to=message)

    records = run(tiny_scenario(tmp_path), tamper=spoil)
    for phase in ("inner", "outer"):
        for r in phase_records(records, phase).values():
            assert (r["rejected"], r["clients_aggregated"]) == (1, 2)
            assert sorted(c["partition"] for c in r["clients"]) == [0, 2]
            assert math.isfinite(r["lower_loss" if phase == "inner" else "upper_loss"])
    assert reason in caplog.text
    model = torch.load(tmp_path / "results" / "model.pt")
    assert all(torch.isfinite(t).all() for side in model.values() for t in side.values())


def test_client_faults_are_counted_and_coverage_uses_survivors(tmp_path):
    """Partition 0 (capacity 1) raises in iteration 1's inner phase, partition 2 returns NaN in its
    outer phase: those iterations aggregate the others, and coverage shrinks to what they hold."""
    path = tiny_scenario(tmp_path, run={"faults": [
        {"partition": 0, "phase": "inner", "iterations": [1], "kind": "raise"},
        {"partition": 2, "phase": "outer", "iterations": [2], "kind": "nan"},
    ]}, algorithm={"iterations": 2, "inner_steps": 2, "mask_y": "static", "mask_x": "static"},
        clients={"num": 3, "capacities": [1.0, 0.5, 0.25]}, model={"width": 8, "head": "mlp", "head_hidden": 8})
    records = run(path)
    inner, outer = phase_records(records, "inner"), phase_records(records, "outer")
    assert (inner[1]["failures"], inner[1]["clients_aggregated"]) == (1, 2)
    # without the full-capacity client, half the head's hidden units are covered by nobody
    assert inner[1]["uncovered_y"] > 0 and inner[2]["uncovered_y"] == 0
    assert (outer[2]["rejected"], outer[2]["clients_aggregated"]) == (1, 2)
    assert outer[1]["C_x*"] == 1 and outer[1]["uncovered_x"] == 0
    assert all(r["failures"] == 0 for q, r in inner.items() if q != 1)


def test_capacity_changes_give_matching_submodels(tmp_path):
    """A scheduled change of the resource profile, and a node announcing its own capacity."""
    path = tiny_scenario(tmp_path, clients={"num": 3, "capacities": [1.0, 0.5, 0.25],
                                            "schedule": [{"from_iteration": 2, "capacities": [0.25, 0.25, 1.0]}]})
    records = run(path, node_configs={1: {"capacity": 0.125}})
    inner = phase_records(records, "inner")
    got = {q: {c["partition"]: c["x_elements"] for c in inner[q]["clients"]} for q in (1, 2)}
    assert got[1] == {0: expected_elements(path, 1.0, 1), 1: expected_elements(path, 0.125, 1),
                      2: expected_elements(path, 0.25, 1)}
    assert got[2] == {0: expected_elements(path, 0.25, 2), 1: expected_elements(path, 0.125, 2),
                      2: expected_elements(path, 1.0, 2)}


def test_resume_from_checkpoint_ends_with_the_same_model(tmp_path):
    straight = tiny_scenario(tmp_path / "a", algorithm={"iterations": 4, "inner_steps": 2},
                             run={"checkpoint_every": 2})
    run(straight)
    interrupted = tiny_scenario(tmp_path / "b", algorithm={"iterations": 4, "inner_steps": 2},
                                run={"checkpoint_every": 2})
    run(interrupted, {"algorithm.iterations": 2})  # stops after the checkpoint at iteration 2
    first_half = torch.load(tmp_path / "b" / "results" / "checkpoint.pt")
    assert first_half["iteration"] == 2
    resumed = run(interrupted, {"run.resume": True})
    a = torch.load(tmp_path / "a" / "results" / "model.pt")
    b = torch.load(tmp_path / "b" / "results" / "model.pt")
    for side in ("x", "y"):
        for name in a[side]:
            assert torch.equal(a[side][name], b[side][name]), name
    losses = lambda rs: [(r["iteration"], r["phase"], r.get("upper_loss"), r.get("lower_loss"), r.get("test_accuracy"))
                         for r in rs if r["phase"] in ("inner", "outer")]
    assert losses(resumed) == losses(read_metrics(tmp_path / "a" / "results" / "metrics.jsonl"))


def test_resume_without_checkpoint_stops_before_training(tmp_path):
    path = tiny_scenario(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint.pt"):
        run(path, {"run.resume": True})
    assert not (tmp_path / "results" / "metrics.jsonl").exists()


def test_node_announcing_an_impossible_capacity_is_left_out(tmp_path, caplog):
    records = run(tiny_scenario(tmp_path), node_configs={1: {"capacity": 1.5}})
    for r in phase_records(records, "inner").values():
        assert r["clients_sent"] == 2 and sorted(c["partition"] for c in r["clients"]) == [0, 2]
    assert "announced capacity 1.5 outside (0, 1]" in caplog.text
