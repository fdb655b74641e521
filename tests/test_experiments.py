"""The experiment harness end to end on tiny settings: outputs written, C_x* placement honoured."""

from __future__ import annotations

import csv

from rabo_flwr import experiments

TINY = {"model.backbone": "conv4", "model.width": 8, "algorithm.iterations": 2, "algorithm.inner_steps": 2,
        "task.n_query": 2, "task.eval_episodes": 4, "task.eval_steps": 2, "task.eval_one_shot_runs": False,
        "run.eval_every": 0}


def test_cx_star_set_writes_table_plots_and_controls_coverage(tmp_path, monkeypatch):
    monkeypatch.setitem(experiments.REDUCED, "fewshot", TINY)
    experiments.main(["cx-star", "--reduced", "--engine", "plain", "--out", str(tmp_path)])
    out = tmp_path / "cx-star"
    rows = {r["cell"]: r for r in csv.DictReader(open(out / "cx-star.csv"))}
    assert rows["cx-star-rafbo-c1"]["C_x*"] == "1" and rows["cx-star-rafbo-c2"]["C_x*"] == "2"
    assert all(r["scale"] == "reduced (CPU)" for r in rows.values())
    assert (out / "cx-star_accuracy.png").stat().st_size > 1000
    assert "reduced (CPU)" in (out / "cx-star.md").read_text()


def test_cost_ratios_are_relative_to_fedmbo_of_the_same_task():
    rows = [{"task": "fewshot", "algorithm": "fedmbo", "flops": 10.0, "bytes": 4.0},
            {"task": "fewshot", "algorithm": "rabo", "flops": 2.5, "bytes": 1.0}]
    experiments.add_cost_ratios(rows)
    assert (rows[1]["flops_vs_fedmbo"], rows[1]["bytes_vs_fedmbo"]) == (0.25, 0.25)
    assert rows[0]["flops_vs_fedmbo"] == 1.0
