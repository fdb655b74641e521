"""The experiment harness end to end on tiny settings: outputs written, C_x* placement honoured."""

from __future__ import annotations

import csv
import json

from rabo_flwr import experiments

TINY = {"model.backbone": "conv4", "model.width": 8, "algorithm.iterations": 2, "algorithm.inner_steps": 2,
        "task.n_query": 2, "task.eval_episodes": 4, "task.eval_steps": 2, "run.eval_every": 1}


def test_cx_star_set_writes_tables_and_plots_and_controls_coverage(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(experiments.SCALES["cpu"], "fewshot", TINY)
    args = ["cx-star", "--engine", "plain", "--jobs", "2", "--out", str(tmp_path)]
    experiments.main(args)
    rows = {r["cell"]: r for r in csv.DictReader(open(tmp_path / "cx-star.csv"))}
    # two iterations train two of the four diagonals of each conv's window grid: C_x*, over all of x,
    # is 0 (tests/test_coverage.py runs the arms to full coverage and their designed C_x* = 1 and 2)
    assert {cell: (rows[cell]["C_x*"], float(rows[cell]["trained_x"]) < 1) for cell in rows} == {
        cell: ("0", True) for cell in ("rabo-c1", "rabo-c2", "rafbo-c1", "rafbo-c2")}
    assert all(r["scale"] == "cpu" and r["iterations_run"] == "2" for r in rows.values())
    curves = list(csv.DictReader(open(tmp_path / "cx-star_curves.csv")))
    assert [(c["iteration"]) for c in curves if c["cell"] == "rabo-c1"] == ["0", "1", "2"]
    assert (tmp_path / "cx-star_accuracy.png").stat().st_size > 1000
    assert "(cpu scale)" in (tmp_path / "cx-star.md").read_text()
    summary = json.loads((tmp_path / "cx-star.json").read_text())
    assert summary[0]["curve"][-1][1] == float(rows["rabo-c1"]["final"])
    assert summary[0]["x_elements_by_capacity"] == {"0.25": 2 * 9 + 2 * 2 + 3 * (2 * 2 * 9 + 2 * 2)}  # conv + BatchNorm, 2 channels a group
    capsys.readouterr()
    experiments.main(args)  # every cell finished: nothing runs again
    assert capsys.readouterr().out.count("already finished") == 4

    # one row again with a longer budget; another one's process "stopped" before its done record
    experiments.main(args + ["--rows", "rabo-c1", "--override", "algorithm.iterations=3"])
    metrics = tmp_path / "runs" / "rafbo-c2" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-1]))
    experiments.main(args + ["--plot-only"])
    rows = {r["cell"]: r for r in csv.DictReader(open(tmp_path / "cx-star.csv"))}
    assert {c: (r["iterations_run"], r["status"]) for c, r in rows.items()} == {
        "rabo-c1": ("3", "budget"), "rabo-c2": ("2", "budget"), "rafbo-c1": ("2", "budget"),
        "rafbo-c2": ("2", "interrupted")}
    table = (tmp_path / "cx-star.md").read_text()
    assert "at iteration 2" in table and "rabo-c1 3" in table  # budgets differ: said so


def test_cost_ratios_are_per_iteration_relative_to_fedmbo_of_the_same_task():
    rows = [{"task": "fewshot", "algorithm": "fedmbo", "flops": 10.0, "bytes": 4.0, "iterations_run": 10},
            {"task": "fewshot", "algorithm": "rabo", "flops": 5.0, "bytes": 2.0, "iterations_run": 20}]
    experiments.add_cost_ratios(rows)
    assert (rows[1]["flops_vs_fedmbo"], rows[1]["bytes_vs_fedmbo"]) == (0.25, 0.25)
    assert rows[1]["total_flops_vs_fedmbo"] == 0.5 and rows[0]["flops_vs_fedmbo"] == 1.0


def test_every_set_resolves_to_valid_cells_with_its_settings(tmp_path):
    """Every set's scenario files and overrides validate, at both scales (nothing runs)."""
    sizes = {"table2": 9, "cx-star": 4, "loss-tuning": 6, "scalability": 8, "lr-sweep": 17}
    for name, count in sizes.items():
        for scale in experiments.SCALES:
            cells = experiments.cells_for(name, "20w5s", None, scale, tmp_path)
            assert len(cells) == count, name
            for cell in cells:
                scenario = cell.scenario()
                assert scenario.results_path == tmp_path / "runs" / cell.label
                if scenario.task.name == "fewshot" and name != "cx-star":
                    assert (scenario.task.n_way, scenario.task.k_shot) == (20, 5)
                if scale == "cpu":
                    assert scenario.model.backbone == "conv4"
    fifty = {c.label: c.scenario() for c in experiments.cells_for("scalability", "5w1s", ["rabo"], "cpu", tmp_path)}
    assert fifty["rabo-50"].clients.num == 50 and fifty["rabo-50"].task.shard_by == "character"
    placements = {c.label: c.scenario().algorithm.placement for c in experiments.cells_for("cx-star", "5w1s", None, "cpu", tmp_path)}
    assert placements["rabo-c1"] == [0, 1, 2, 3, 0, 0, 0, 0] and placements["rabo-c2"] == [0, 1, 2, 3, 0, 1, 2, 3]
