"""The C_x* study's arms: all of x trained, and the minimum coverage each arm is designed for."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from rabo_flwr.loop import run_plain
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
TINY = {"model.backbone": "conv4", "model.width": 8, "algorithm.iterations": 4, "algorithm.inner_steps": 1,
        "task.k_shot": 1, "task.n_query": 1, "task.eval_episodes": 2, "task.eval_steps": 1}


@pytest.mark.parametrize("arm,designed", [("rabo_c1", 1), ("rabo_c2", 2)])
def test_cx_star_arms_train_all_of_x_with_their_minimum_coverage(tmp_path, arm, designed):
    """8 clients at capacity 1/4 on segments: fixed windows that tile every group, so every iteration
    trains all of x, C_x* (over all elements) is the designed one from the first outer phase on, and
    the head (y, no group of its own) is trained whole by all 8."""
    scenario = load_scenario(REPO / "scenarios" / "paper" / "cx_star" / f"{arm}.yaml",
                             TINY | {"run.results_dir": str(tmp_path / arm)})
    records = run_plain(scenario, logging.getLogger("quiet")).records
    outer = {r["iteration"]: r for r in records if r["phase"] == "outer"}
    assert all(r["trained_x"] == 1.0 and r["C_x*"] == designed for r in outer.values())
    # every iteration: the same clients, nothing uncovered, the designed minimum
    assert all(r["min_coverage_x"] == designed and r["uncovered_x"] == 0.0 and r["clients_aggregated"] == 8
               for r in outer.values())
    inner = [r for r in records if r["phase"] == "inner"]
    assert inner[-1]["trained_y"] == 1.0 and inner[-1]["C_y*"] == 8
