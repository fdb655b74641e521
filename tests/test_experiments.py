"""The experiment harness end to end on tiny settings: outputs, skipping only identical finished
runs, never overwriting a run of another scenario, resuming an interrupted cell to the same
numbers, the command and scenario of each cell, the sweeps' step sizes read by the sets."""

from __future__ import annotations

import csv
import json
import logging
import math
import shlex
import subprocess
from dataclasses import replace

import pytest
import torch
import yaml

from rabo_flwr import experiments, results
from rabo_flwr.loop import TrainingLoop, run_plain
from rabo_flwr.results import read_metrics
from rabo_flwr.scenario import ScenarioError, load_scenario

TINY = {"model.backbone": "conv4", "model.width": 8, "algorithm.iterations": 2, "algorithm.inner_steps": 2,
        "task.n_query": 2, "task.eval_episodes": 4, "task.val_episodes": 4, "task.eval_steps": 2, "run.eval_every": 1,
        "run.checkpoint_every": 1}
TINY_LOSS_TUNING = {"model.backbone": "conv4", "model.width": 8, "algorithm.iterations": 2, "algorithm.inner_steps": 2,
                    "task.batch_size": 16, "task.train_subsample": 0.03, "task.test_subsample": 0.02,
                    "clients.num": 2, "run.eval_every": 1, "run.checkpoint_every": 1}


@pytest.fixture(autouse=True)
def _no_published_runs(tmp_path, monkeypatch):
    """The repository's published runs stay out of these tests (their scenarios are the full scale)."""
    monkeypatch.setattr(experiments, "PUBLISHED", tmp_path / "published")


def without_times(records):
    """Records without wall-clock fields (the numbers a rerun must reproduce)."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if "time" not in k and k != "peak_memory"}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return [strip(r) for r in records]


def test_cx_star_set_writes_tables_skips_identical_runs_and_never_overwrites_another_scenario(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(experiments.SCALES["cpu"], "fewshot", TINY)
    args = ["cx-star", "--engine", "plain", "--jobs", "2", "--out", str(tmp_path)]
    experiments.main(args)
    rows = {r["cell"]: r for r in csv.DictReader(open(tmp_path / "cx-star.csv"))}
    # segments on fixed windows that tile every group: all of x trained, C_x* as designed
    assert {cell: (rows[cell]["C_x*"], rows[cell]["trained_x"]) for cell in rows} == {
        "rabo-c1": ("1", "1.0"), "rabo-c2": ("2", "1.0"), "rafbo-c1": ("1", "1.0"), "rafbo-c2": ("2", "1.0")}
    assert all(r["scale"] == "cpu" and r["iterations_run"] == "2" and r["status"] == "budget" for r in rows.values())
    curves = list(csv.DictReader(open(tmp_path / "cx-star_curves.csv")))
    assert [c["iteration"] for c in curves if c["cell"] == "rabo-c1"] == ["0", "1", "2"]
    assert list(curves[0]) == ["cell", "iteration", "val_accuracy", "se"]  # the curves are validation
    assert (tmp_path / "cx-star_accuracy.png").stat().st_size > 1000
    summary = {r["cell"]: r for r in json.loads((tmp_path / "cx-star.json").read_text())}
    rabo = summary["rabo-c1"]
    assert rabo["curve"][-1][1] == float(rows["rabo-c1"]["final_validation"])
    # a segment's conv rows (all 8 inputs) + BatchNorm, 2 channels a group
    assert rabo["x_elements_by_capacity"] == {"0.25": 2 * 9 + 2 * 2 + 3 * (2 * 8 * 9 + 2 * 2)}
    records = read_metrics(tmp_path / "runs" / "rabo-c1" / "metrics.jsonl")
    (test,) = [r for r in records if r["phase"] == "test"]
    assert rabo["test"] == test["test_accuracy"] and rabo["kept_iteration"] == test["iteration"]
    # each cell's JSON: the command that makes exactly it, and the resolved scenario the run used
    assert rabo["command"] == "python -m rabo_flwr.experiments cx-star --scale cpu --rows rabo-c1"
    assert rabo["scenario"] == yaml.safe_load((tmp_path / "runs" / "rabo-c1" / "scenario.yaml").read_text())
    assert [i["action"] for i in rabo["invocations"]] == ["started"]
    head = subprocess.run(["git", "-C", str(experiments.APP_DIR), "rev-parse", "HEAD"], capture_output=True, text=True)
    code = rabo["invocations"][0]["code"]  # the code that made it (None outside a git checkout)
    assert (code.removesuffix("+changes") == head.stdout.strip()) if head.returncode == 0 else code is None
    assert shlex.split(rabo["invocations"][0]["argv"])[3:] == args
    table = (tmp_path / "cx-star.md").read_text()
    assert "(cpu scale)" in table
    assert '"algorithm.iterations": 2' in table and '"run.eval_every": 1' in table  # what the runs used
    assert "| row | capacity 1/4 |" in table and "| rabo-c1 | 466 |" in table  # x-submodel size per capacity

    capsys.readouterr()
    experiments.main(args)  # every cell finished with this very scenario: nothing runs again
    assert capsys.readouterr().out.count("already finished") == 4

    # a changed scenario stops before any cell runs, and the finished run stays as it was
    before = (tmp_path / "runs" / "rabo-c1" / "metrics.jsonl").read_text()
    with pytest.raises(experiments.CellConflict, match=r"algorithm.iterations: 2 there, 3 now.*never overwritten"):
        experiments.main(args + ["--rows", "rabo-c1", "--override", "algorithm.iterations=3"])
    assert (tmp_path / "runs" / "rabo-c1" / "metrics.jsonl").read_text() == before

    # a run whose process was stopped before its done record is reported as cut short, without a test number
    metrics = tmp_path / "runs" / "rafbo-c2" / "metrics.jsonl"
    metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:-2]))
    experiments.main(args + ["--plot-only"])
    rows = {r["cell"]: r for r in csv.DictReader(open(tmp_path / "cx-star.csv"))}
    assert (rows["rafbo-c2"]["status"], rows["rafbo-c2"]["test"]) == ("cut short", "nan")
    assert "Cut short" in (tmp_path / "cx-star.md").read_text()


def cut_short_at_3(cell, monkeypatch):
    """Run ``cell`` until its process is stopped (the session ends) at iteration 3."""
    iteration = TrainingLoop._iteration

    def stop_at_3(loop, q):
        if q == 3:
            raise KeyboardInterrupt("the session ended")
        iteration(loop, q)

    with monkeypatch.context() as patch:
        patch.setattr(TrainingLoop, "_iteration", stop_at_3)
        with pytest.raises(KeyboardInterrupt):
            experiments.run_cell(cell, "plain", torch.get_num_threads(), ["cx-star"])


def test_an_interrupted_cell_resumes_from_its_checkpoint_to_the_numbers_of_an_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setitem(experiments.SCALES["cpu"], "fewshot", TINY | {"algorithm.iterations": 3})
    threads = torch.get_num_threads()
    (whole,) = experiments.cells_for("cx-star", "5w1s", ["rabo-c2"], "cpu", tmp_path / "whole")
    (cell,) = experiments.cells_for("cx-star", "5w1s", ["rabo-c2"], "cpu", tmp_path / "cut")
    experiments.run_cell(whole, "plain", threads, ["cx-star"])

    cut_short_at_3(cell, monkeypatch)
    assert experiments.cell_status(cell.scenario()) == "resumable"
    # while another process runs it (holds its lock), a second invocation neither resumes nor publishes it
    published = tmp_path / "published" / "rabo-c2"
    with experiments.cell_lock(cell.scenario().results_path) as ours:
        assert ours
        assert experiments.run_cell(cell, "plain", threads, ["cx-star"]) == "rabo-c2: running in another process, left to it"
        experiments.publish_cell(replace(cell, published=published), "cpu")
    assert experiments.cell_status(cell.scenario()) == "resumable" and not published.exists()
    assert experiments.run_cell(cell, "plain", threads, ["cx-star"]) == "rabo-c2: done (resumed)"

    resumed = read_metrics(cell.scenario().results_path / "metrics.jsonl")
    reference = read_metrics(whole.scenario().results_path / "metrics.jsonl")
    assert [r["phase"] for r in resumed].count("test") == 1 and resumed[-1]["phase"] == "done"
    assert without_times(resumed) == without_times(reference)
    info = json.loads((cell.scenario().results_path / "cell.json").read_text())
    assert [i["action"] for i in info["invocations"]] == ["started", "resumed from its checkpoint"]
    # the summary is the same as the uninterrupted run's, cut for cut
    a, b = experiments.summarize(cell, "cpu"), experiments.summarize(whole, "cpu")
    assert (a["test"], a["kept_iteration"], a["flops"], a["examples"]) == (b["test"], b["kept_iteration"], b["flops"], b["examples"])


def test_a_cell_cut_short_on_one_machine_resumes_on_another_from_its_carried_checkpoint(tmp_path, monkeypatch):
    """--carry copies an unfinished cell's checkpoint beside the published runs; a new machine (no results
    directory) resumes it from there to the numbers of an uninterrupted run, and publishing it removes the carry."""
    monkeypatch.setitem(experiments.SCALES["cpu"], "fewshot", TINY | {"algorithm.iterations": 3})
    threads = torch.get_num_threads()
    (whole,) = experiments.cells_for("cx-star", "5w1s", ["rabo-c1"], "cpu", tmp_path / "whole", fresh=True)
    experiments.run_cell(whole, "plain", threads, ["cx-star"])
    # the same torch threads in every part (round-off follows the thread count)
    args = ["cx-star", "--rows", "rabo-c1", "--jobs", "1", "--threads", str(threads), "--out", str(tmp_path / "first")]
    (cell,) = experiments.cells_for("cx-star", "5w1s", ["rabo-c1"], "cpu", tmp_path / "first")
    carried = experiments.carried_path(cell.published)
    assert carried == experiments.PUBLISHED / "cpu" / "cx-star" / "checkpoints" / "rabo-c1"

    cut_short_at_3(cell, monkeypatch)
    experiments.main(args + ["--carry"])
    assert sorted(p.name for p in carried.iterdir()) == ["cell.json", "checkpoint.pt", "scenario.yaml"]

    # a new machine: no results here, the carried folder committed; a changed scenario never takes it over
    (moved,) = experiments.cells_for("cx-star", "5w1s", ["rabo-c1"], "cpu", tmp_path / "second")
    assert experiments.cell_status(moved.scenario(), moved.published) == "carried"
    (other,) = experiments.cells_for("cx-star", "5w1s", ["rabo-c1"], "cpu", tmp_path / "other",
                                     {"algorithm.alpha": 0.5})
    with pytest.raises(experiments.CellConflict, match="algorithm.alpha"):
        experiments.cell_status(other.scenario(), other.published)
    experiments.main([*args[:-1], str(tmp_path / "second"), "--publish"])

    resumed = read_metrics(moved.scenario().results_path / "metrics.jsonl")
    assert without_times(resumed) == without_times(read_metrics(whole.scenario().results_path / "metrics.jsonl"))
    info = json.loads((moved.scenario().results_path / "cell.json").read_text())
    assert [i["action"] for i in info["invocations"]] == ["started", "resumed from its carried checkpoint"]
    assert (moved.published / "summary.json").is_file() and not carried.exists()
    experiments.main([*args[:-1], str(tmp_path / "second"), "--carry"])  # finished: nothing to carry
    assert not carried.exists()


def test_loss_tuning_sweep_chooses_on_validation_publishes_and_the_set_reads_its_choice(tmp_path, monkeypatch):
    monkeypatch.setitem(experiments.SCALES["cpu"], "loss-tuning", TINY_LOSS_TUNING)
    monkeypatch.setitem(experiments.SWEEP_BUDGET, "loss-tuning",
                        {"algorithm.iterations": 2, "run.eval_every": 1, "run.patience": 0, "run.final_test": False})
    monkeypatch.setattr(experiments, "GRID", (0.1, 1.0))
    monkeypatch.setattr(experiments, "STEP_SIZES", tmp_path / "step_sizes")
    monkeypatch.setattr(experiments, "PUBLISHED", tmp_path / "docs")
    with pytest.raises(SystemExit, match="no step sizes for row 'ce'"):
        experiments.cells_for("loss-tuning", "5w1s", None, "cpu", tmp_path / "lt")
    experiments.main(["loss-tuning-sweep", "--jobs", "2", "--out", str(tmp_path / "sweep"), "--publish"])

    runs = {c: read_metrics(tmp_path / "sweep" / "runs" / c / "metrics.jsonl") for c in ("ce-beta0.1", "ce-beta1.0")}
    assert all(r["phase"] != "test" for records in runs.values() for r in records)  # a sweep never reads the test set
    best = {c: max(r["val_balanced_accuracy"] for r in records if r["phase"] == "eval") for c, records in runs.items()}
    winner = 0.1 if best["ce-beta0.1"] >= best["ce-beta1.0"] else 1.0
    chosen = yaml.safe_load((tmp_path / "step_sizes" / "loss-tuning-sweep-cpu.yaml").read_text())
    assert chosen["rows"] == {"ce": {"algorithm.beta": winner}} and chosen["grid"] == [0.1, 1.0]
    table = (tmp_path / "sweep" / "loss-tuning-sweep.md").read_text()
    assert table.count("**chosen**") == 1 and f"beta {winner:g} |" in table
    published = tmp_path / "docs" / "cpu" / "loss-tuning-sweep" / "runs" / "ce-beta0.1"
    compact = read_metrics(published / "records.jsonl")
    assert [r["phase"] for r in compact] == ["eval", "eval", "eval", "done"]
    assert compact[-1]["flops_so_far"] > compact[1]["flops_so_far"] > 0 and "clients" not in json.dumps(compact)
    assert (published / "scenario.yaml").is_file() and (published / "cell.json").is_file()
    # every loss-tuning row reads the chosen lower-level step
    cells = experiments.cells_for("loss-tuning", "5w1s", None, "cpu", tmp_path / "lt")
    assert {c.label for c in cells} == set(experiments.LOSS_TUNING_ROWS)
    assert {c.scenario().algorithm.beta for c in cells} == {winner}


def test_table2_rows_read_the_sweeps_step_sizes_and_add_the_full_only_and_twenty_way_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "STEP_SIZES", tmp_path)
    sweep = experiments.cells_for("lr-sweep", "5w1s", None, "cpu", tmp_path / "sweep")
    rows = {c.row for c in sweep}
    assert rows == set(experiments.TABLE2_ROWS) | {"fedmbo-full-only"} | {f"{r}-full-only" for r in experiments.SINGLE_LEVEL_ROWS}
    per_row = {row: [c for c in sweep if c.row == row] for row in rows}
    assert len(per_row["rabo"]) == len(per_row["dist-maml"]) == 16 and len(per_row["fiarse"]) == 4
    assert all(c.scenario().run.final_test is False for c in sweep)
    fiarse = per_row["fiarse"][2].scenario().algorithm
    assert fiarse.alpha == fiarse.beta == experiments.GRID[2]  # one local rate for both sides

    fake = [{"cell": c.label, "status": "budget", "kept_validation": 0.5 + 0.01 * i} for i, c in enumerate(sweep)]
    chosen = experiments.choose_step_sizes(fake, sweep, "lr-sweep", "5w1s", "cpu")
    assert chosen["rows"]["rabo"] == {"algorithm.alpha": 1.0, "algorithm.beta": 1.0}  # the last point scored best
    best = chosen["best_single_level"]
    assert best == max(experiments.SINGLE_LEVEL_ROWS, key=lambda r: chosen["validation"][r])
    (tmp_path / "lr-sweep-cpu.yaml").write_text(yaml.safe_dump(chosen))

    cells = {c.label: c.scenario() for c in experiments.cells_for("table2", "5w1s", None, "cpu", tmp_path / "t")}
    assert set(cells) == set(experiments.TABLE2_ROWS) | {"fedmbo-full-only", f"{best}-full-only"}
    assert (cells["rabo"].algorithm.alpha, cells["dist-maml"].algorithm.adapt_lr) == (1.0, 1.0)
    full_only = cells["fedmbo-full-only"]
    assert full_only.clients.min_capacity == 1.0 and full_only.clients.capacities == [1.0, 0.5, 0.25, 0.125, 0.0625]
    twenty = {c.label: c.scenario() for c in experiments.cells_for("table2", "20w5s", None, "cpu", tmp_path / "t20")}
    assert set(twenty) == {"dist-protonet", "fedmbo", best, "rabo", "rafbo"}
    assert all((s.task.n_way, s.task.k_shot) == (20, 5) for s in twenty.values())
    fifty = {c.label: c.scenario() for c in experiments.cells_for("scalability", "5w1s", ["rabo"], "cpu", tmp_path)}
    assert fifty["rabo-50"].clients.num == 50 and fifty["rabo-50"].task.shard_by == "character"
    assert fifty["rabo-20"].task.shard_by == "alphabet" and fifty["rabo-50"].algorithm.alpha == 1.0


def test_every_set_resolves_to_valid_cells_at_the_paper_scale(tmp_path):
    """Every set's scenario files and overrides validate (nothing runs); the paper scale needs no sweep."""
    sizes = {"table2": 10, "cx-star": 4, "loss-tuning": 7, "scalability": 8, "lr-sweep": 116, "loss-tuning-sweep": 4}
    for name, count in sizes.items():
        cells = experiments.cells_for(name, "20w5s", None, "paper", tmp_path)
        assert len(cells) == count, name
        for cell in cells:
            scenario = cell.scenario()
            assert scenario.results_path == tmp_path / "runs" / cell.label
            if scenario.task.name == "fewshot" and name != "cx-star":
                assert (scenario.task.n_way, scenario.task.k_shot) == (20, 5)
    placements = {c.label: c.scenario().algorithm.placement for c in experiments.cells_for("cx-star", "5w1s", None, "cpu", tmp_path)}
    assert placements["rabo-c1"] == [0, 1, 2, 3, 0, 0, 0, 0] and placements["rabo-c2"] == [0, 1, 2, 3, 0, 1, 2, 3]


def test_cost_ratios_are_per_iteration_relative_to_fedmbo_on_every_client():
    rows = [{"task": "fewshot", "algorithm": "fedmbo", "flops": 10.0, "bytes": 4.0, "iterations_run": 10},
            {"task": "fewshot", "algorithm": "fedmbo", "min_capacity": 1.0, "flops": 2.0, "bytes": 1.0, "iterations_run": 10},
            {"task": "fewshot", "algorithm": "rabo", "flops": 5.0, "bytes": 2.0, "iterations_run": 20}]
    experiments.add_cost_ratios(rows)
    assert (rows[2]["flops_vs_fedmbo"], rows[2]["bytes_vs_fedmbo"]) == (0.25, 0.25)
    assert rows[2]["total_flops_vs_fedmbo"] == 0.5 and rows[0]["flops_vs_fedmbo"] == 1.0
    assert rows[1]["flops_vs_fedmbo"] == 0.2  # the full-only row against FedMBO on all ten clients


def test_published_cells_count_as_finished_on_a_new_machine_and_fresh_reproduces_them(tmp_path, monkeypatch, capsys):
    """A set spread over machines: each cell is published as it finishes; a clone without the local
    runs skips the published cells and writes the same table; --fresh reruns them to the same numbers."""
    monkeypatch.setitem(experiments.SCALES["cpu"], "fewshot", TINY)
    monkeypatch.setattr(experiments, "PUBLISHED", tmp_path / "docs")
    first = ["cx-star", "--jobs", "1", "--rows", "rabo-c1", "--out", str(tmp_path / "machine1"), "--publish"]
    experiments.main(first)
    published = tmp_path / "docs" / "cpu" / "cx-star" / "runs" / "rabo-c1"
    summary = json.loads((published / "summary.json").read_text())
    assert summary["status"] == "budget" and summary["cell"] == "rabo-c1"
    assert (published / "records.jsonl").is_file() and not (published / "metrics.jsonl").exists()

    capsys.readouterr()
    second = tmp_path / "machine2"  # a new machine: no local runs, the published folder committed
    experiments.main(["cx-star", "--jobs", "1", "--rows", "rabo-c1", "rabo-c2", "--out", str(second), "--publish"])
    out = capsys.readouterr().out
    assert f"rabo-c1: already finished in {published}" in out and not (second / "runs" / "rabo-c1").exists()
    rows = {r["cell"]: r for r in json.loads((second / "cx-star.json").read_text())}
    assert set(rows) == {"rabo-c1", "rabo-c2"}
    assert (rows["rabo-c1"]["test"], rows["rabo-c1"]["curve"]) == (summary["test"], summary["curve"])
    assert (tmp_path / "docs" / "cpu" / "cx-star" / "runs" / "rabo-c2" / "summary.json").is_file()

    # a published run of another scenario stops the set before anything runs, and stays as it was
    with pytest.raises(experiments.CellConflict, match=r"algorithm.iterations: 2 there, 3 now.*remove that folder"):
        experiments.main(["cx-star", "--rows", "rabo-c1", "--out", str(tmp_path / "machine3"),
                          "--override", "algorithm.iterations=3"])
    assert json.loads((published / "summary.json").read_text()) == summary

    experiments.main(["cx-star", "--jobs", "1", "--rows", "rabo-c1", "--out", str(tmp_path / "again"), "--fresh"])
    again = read_metrics(tmp_path / "again" / "runs" / "rabo-c1" / "metrics.jsonl")
    compact = read_metrics(published / "records.jsonl")
    assert without_times([{k: r[k] for k in r if not k.endswith("_so_far")} for r in compact]) == \
        without_times([r for r in again if r["phase"] in ("eval", "test", "done")])


def test_a_published_run_of_older_code_keeps_its_overrides_line(tmp_path, monkeypatch, capsys):
    """A run published with another phase timeout (the first cells ran at 600 s, later ones waited a
    day; only injected faults make a client late), or before a key existed, is the same cell, and its
    table lists no such key."""
    monkeypatch.setitem(experiments.SCALES["cpu"], "fewshot", TINY)
    monkeypatch.setattr(experiments, "PUBLISHED", tmp_path / "docs")
    experiments.main(["cx-star", "--jobs", "1", "--rows", "rabo-c1", "--out", str(tmp_path / "machine1"), "--publish"])
    published = tmp_path / "docs" / "cpu" / "cx-star" / "runs" / "rabo-c1"
    older = yaml.safe_load((published / "scenario.yaml").read_text())
    older["run"]["phase_timeout"] = 86400.0  # as the cells of 2026-12-03's third session ran
    del older["algorithm"]["topology"]  # a key added since, at its default
    (published / "scenario.yaml").write_text(yaml.safe_dump(older))

    capsys.readouterr()
    experiments.main(["cx-star", "--jobs", "1", "--rows", "rabo-c1", "--out", str(tmp_path / "machine2")])
    assert f"rabo-c1: already finished in {published}" in capsys.readouterr().out
    (row,) = json.loads((tmp_path / "machine2" / "cx-star.json").read_text())
    assert row["overrides"] and None not in row["overrides"].values()
    assert "run.phase_timeout" not in row["overrides"] and "algorithm.topology" not in row["overrides"]
    assert row["overrides"]["algorithm.iterations"] == TINY["algorithm.iterations"]


def test_every_override_flag_reaches_the_cells(tmp_path, monkeypatch):
    """`--override` may be repeated or list several pairs: each one is applied (a repeated flag once
    replaced the ones before it)."""
    ran = []
    monkeypatch.setattr(experiments, "run_cells", lambda cells, *args, **kwargs: ran.extend(cells))
    with pytest.raises(SystemExit, match="no finished runs"):
        experiments.main(["cx-star", "--rows", "rabo-c1", "--out", str(tmp_path), "--override", 'algorithm.mask_x="rolling"',
                          "--override", 'algorithm.mask_y="rolling"', "algorithm.iterations=40"])
    (scenario,) = [cell.scenario() for cell in ran]
    assert (scenario.algorithm.mask_x, scenario.algorithm.mask_y, scenario.algorithm.iterations) == ("rolling", "rolling", 40)


def test_fresh_never_publishes_and_a_rows_call_tables_the_whole_set_under_its_overrides(tmp_path, monkeypatch):
    """--fresh --publish would replace the published table by one of the reproduced rows alone: refused before
    anything runs. After --rows, the table lists the whole set with the same --override (the cells it ran)."""
    ran = []
    monkeypatch.setattr(experiments, "run_cells", lambda cells, *args, **kwargs: ran.extend(cells))
    with pytest.raises(SystemExit):
        experiments.main(["cx-star", "--rows", "rabo-c1", "--out", str(tmp_path), "--fresh", "--publish"])
    assert ran == []
    tabled = []
    monkeypatch.setattr(experiments, "summarize", lambda cell, scale: tabled.append(cell))
    with pytest.raises(SystemExit, match="no finished runs"):
        experiments.main(["cx-star", "--rows", "rabo-c1", "--out", str(tmp_path), "--override", "algorithm.iterations=40"])
    assert [c.label for c in ran] == ["rabo-c1"] and len(tabled) == 4
    assert {c.scenario().algorithm.iterations for c in tabled} == {40}
    assert next(c for c in tabled if c.label == "rabo-c1").scenario().results_path == ran[0].scenario().results_path


def test_two_invocations_of_a_set_write_and_publish_its_tables_one_after_the_other(tmp_path, monkeypatch):
    """Two processes running rows of one set (``--rows`` each) both table the whole set when their rows end: the
    set's tables, here and under docs/results, are written and copied under the set's locks, so neither copies the
    other's half-written files (the writes are plain, and the two ends can meet)."""
    import fcntl

    def held(path):
        if not path.is_file():
            return False
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle, fcntl.LOCK_UN)
            return False

    out, published = tmp_path / "out", experiments.PUBLISHED / "cpu"
    locks = [out / ".cx-star.lock", published / ".cx-star.lock"]
    seen = []
    row = {"task": "fewshot", "algorithm": "rabo", "flops": 1, "bytes": 1, "iterations_run": 1}
    monkeypatch.setattr(experiments, "run_cells", lambda *args, **kwargs: None)
    monkeypatch.setattr(experiments, "summarize", lambda cell, scale: row | {"cell": cell.label})

    def write_outputs(name, rows, directory, *args):
        seen.append(("write", [held(lock) for lock in locks]))
        (directory / f"{name}.md").write_text("table\n")

    monkeypatch.setattr(experiments, "write_outputs", write_outputs)
    monkeypatch.setattr(experiments, "publish", lambda *args: seen.append(("publish", [held(lock) for lock in locks])))
    out.mkdir()
    experiments.main(["cx-star", "--rows", "rabo-c1", "--out", str(out), "--publish"])
    assert seen == [("write", [True, True]), ("publish", [True, True])]
    assert not any(held(lock) for lock in locks)  # released with the invocation


def test_a_key_added_since_a_run_at_its_default_is_no_difference():
    new = {"algorithm": {"name": "rabo", "alpha": 0.1, "outer_steps": 1}, "run": {"results_dir": "elsewhere"}}
    assert experiments.scenario_diff({"algorithm": {"name": "rabo", "alpha": 0.1}}, new) == {}
    assert experiments.scenario_diff({"algorithm": {"name": "rabo", "alpha": 0.1}},
                                     new | {"algorithm": new["algorithm"] | {"outer_steps": 2}}) == {
        "algorithm.outer_steps": (None, 2)}
    assert experiments.scenario_diff(new, {"algorithm": {"name": "rabo", "alpha": 0.3}}) == {
        "algorithm.alpha": (0.1, 0.3), "algorithm.outer_steps": (1, None)}


# ---------------------------------------------------------------------------- the family side by side (issue 15)

TINY_QUADRATIC = {"algorithm.iterations": 6, "run.eval_every": 1, "run.patience": 0, "algorithm.inner_steps": 2,
                  "task.channels": 4, "clients.num": 4}


def test_a_cell_that_fails_is_reported_and_the_others_run_and_are_tabled(tmp_path, capsys):
    """Through the set's command and process pool (spawned workers, as a set runs): the first cell's
    corrupt checkpoint makes its worker raise; the second cell still runs and is tabled, and the command
    then exits with the failed cell named (also where no cell finished, so there is no table)."""
    labels = ["rabo-alpha1-beta0.03", "rabo-alpha1-beta0.1"]

    def command(out, rows):
        return ["family-quadratic-sweep", "--rows", *rows, "--fresh", "--jobs", "1", "--threads", "1", "--out", str(out),
                "--override", *(f"{k}={v}" for k, v in TINY_QUADRATIC.items())]

    def corrupt(out):
        broken, sound = experiments.cells_for("family-quadratic-sweep", "5w1s", labels, "cpu", out, TINY_QUADRATIC,
                                              fresh=True)
        directory = broken.scenario().results_path
        directory.mkdir(parents=True)
        (directory / "scenario.yaml").write_text(yaml.safe_dump(broken.scenario().to_dict()))
        (directory / "checkpoint.pt").write_bytes(b"not a checkpoint")  # a disk that failed mid-write
        assert experiments.cell_status(broken.scenario()) == "resumable"
        return broken, sound

    broken, sound = corrupt(tmp_path / "both")
    with pytest.raises(SystemExit, match=f"1 of 2 cells failed: {broken.label} "):
        experiments.main(command(tmp_path / "both", labels))
    out, err = capsys.readouterr()
    assert f"{broken.label}: failed (" in out and f"{sound.label}: done" in out and "Traceback" in err
    assert "UnpicklingError" in out  # the worker's own error, named in its line
    assert experiments.cell_status(sound.scenario()) == "finished"
    table = (tmp_path / "both" / "family-quadratic-sweep.md").read_text().splitlines()
    assert "| rabo | alpha 1, beta 0.03 | | | not run |  |" in table  # the failed cell
    assert any(line.startswith("| rabo | alpha 1, beta 0.1 |") and "(budget)" in line for line in table)

    corrupt(tmp_path / "alone")
    with pytest.raises(SystemExit, match=f"1 of 1 cells failed: {broken.label} "):  # not "no finished runs"
        experiments.main(command(tmp_path / "alone", labels[:1]))


def test_family_sets_cover_every_row_at_full_capacity_and_the_paper_capacities_and_read_the_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(experiments, "STEP_SIZES", tmp_path)
    sweep = experiments.cells_for("family-quadratic-sweep", "5w1s", None, "cpu", tmp_path / "sweep")
    rows = {c.row for c in sweep}
    partial = {r + "-submodels" for r in experiments.FAMILY_ROWS} - {"fedmbo-submodels", "sldbo-submodels", "s3ldbo-submodels"}
    assert rows == set(experiments.FAMILY_ROWS) | partial  # the full-model rows take capacity 1 only
    assert len(sweep) == 21 * 16 and all(c.scenario().run.final_test is False for c in sweep)
    cell = next(c for c in sweep if c.label == "rafbo-submodels-alpha0.1-beta1")
    scenario = cell.scenario()
    assert (scenario.algorithm.name, scenario.algorithm.alpha, scenario.algorithm.beta) == ("rafbo", 0.1, 1.0)
    assert scenario.clients.capacities == [1.0, 0.5, 0.25, 0.125, 0.0625] and scenario.algorithm.iterations == 40
    full = next(c for c in sweep if c.label == "rabo-alpha1-beta0.03").scenario()
    assert full.clients.capacities == [1.0]  # rabo.yaml's own profile is the paper's: the full row overrides it
    assert next(c for c in sweep if c.label == "simfbo-alpha0.03-beta0.1").scenario().algorithm.v_step == 0  # follows beta

    cleaning = experiments.cells_for("family-hyper-cleaning-sweep", "5w1s", None, "cpu", tmp_path / "hc")
    # full capacity only, every row, the gossip rows included (their nodes hold their own blocks of the owned x)
    assert {c.row for c in cleaning} == set(experiments.FAMILY_ROWS) and len(cleaning) == 12 * 16
    assert all(c.scenario().clients.capacities == [1.0] for c in cleaning)
    assert {c.scenario().algorithm.alpha for c in cleaning} == {30.0, 100.0, 300.0, 1000.0}  # GRID times 1000
    assert {c.scenario().algorithm.beta for c in cleaning} == set(experiments.GRID)
    assert {c.scenario().task.name for c in cleaning} == {"hyper-cleaning"}
    assert all(c.scenario().run.final_test is False for c in cleaning)

    # few-shot: the quadratic's rows (submodels included) on Table II's 5-way 1-shot task, at the family's own size
    fewshot = experiments.cells_for("family-fewshot-sweep", "5w1s", None, "cpu", tmp_path / "fs")
    assert {c.row for c in fewshot} == rows and len(fewshot) == 21 * 16
    s = next(c for c in fewshot if c.label == "fednest-submodels-alpha0.3-beta0.03").scenario()
    assert (s.task.name, s.task.n_way, s.task.k_shot, s.algorithm.name, s.algorithm.alpha, s.algorithm.beta) == (
        "fewshot", 5, 1, "fednest", 0.3, 0.03)
    assert (s.model.backbone, s.model.width, s.clients.num, s.algorithm.inner_steps, s.task.val_episodes) == ("conv4", 32, 5, 5, 100)
    assert s.clients.capacities == [1.0, 0.5, 0.25, 0.125, 0.0625] and (s.algorithm.iterations, s.run.patience) == (40, 0)
    assert all(c.scenario().run.final_test is False for c in fewshot)
    assert {c.scenario().clients.capacities[0] for c in fewshot if not c.row.endswith("-submodels")} == {1.0}
    # Table II keeps its own scale on the same task
    (table2,) = experiments.cells_for("lr-sweep", "5w1s", ["rabo-alpha0.1-beta0.3"], "cpu", tmp_path / "t2")
    assert (table2.scenario().model.width, table2.scenario().clients.num, table2.scenario().algorithm.inner_steps) == (64, 10, 20)

    with pytest.raises(SystemExit, match="family-quadratic-sweep-cpu.yaml: no step sizes for row 'fedmbo'"):
        experiments.cells_for("family-quadratic", "5w1s", None, "cpu", tmp_path / "set")
    fake = [{"cell": c.label, "status": "budget", "kept_validation": 1.0 / (1 + i), "higher_is_better": False}
            for i, c in enumerate(sweep)]
    chosen = experiments.choose_step_sizes(fake, sweep, "family-quadratic-sweep", "5w1s", "cpu")
    assert chosen["rows"]["rabo"] == {"algorithm.alpha": 1.0, "algorithm.beta": 1.0}  # lower is better: the last
    (tmp_path / "family-quadratic-sweep-cpu.yaml").write_text(yaml.safe_dump(chosen))
    cells = {c.label: c for c in experiments.cells_for("family-quadratic", "5w1s", None, "cpu", tmp_path / "set")}
    assert set(cells) == rows
    assert cells["shrofbo-submodels"].command == \
        "python -m rabo_flwr.experiments family-quadratic --scale cpu --rows shrofbo-submodels"
    s = cells["shrofbo-submodels"].scenario()
    assert (s.algorithm.alpha, s.clients.capacities, s.clients.local_steps) == (1.0, [1.0, 0.5, 0.25, 0.125, 0.0625], [5, 4, 3, 2, 1])
    assert (s.algorithm.iterations, s.run.eval_every, s.run.patience) == (150, 1, 0)


def test_family_sweep_chooses_on_the_upper_objective_lower_is_better_and_a_diverged_run_is_the_worst():
    cells = [experiments.Cell(f"rabo-{i}", experiments.FAMILY_TASKS["quadratic"] / "rabo.yaml", {}, "rabo",
                              point={"algorithm.alpha": a}) for i, a in enumerate((0.03, 0.1, 0.3))]
    rows = [{"cell": "rabo-0", "status": "budget", "kept_validation": float("nan"), "higher_is_better": False},
            {"cell": "rabo-1", "status": "budget", "kept_validation": 2e-6, "higher_is_better": False},
            {"cell": "rabo-2", "status": "budget", "kept_validation": 3e-6, "higher_is_better": False}]
    chosen = experiments.choose_step_sizes(rows, cells, "family-quadratic-sweep", "5w1s", "cpu")
    assert chosen["rows"]["rabo"] == {"algorithm.alpha": 0.1}


def test_a_chosen_step_at_the_grids_edge_is_named():
    assert experiments.grid_edges({"algorithm.alpha": 1.0, "algorithm.beta": 0.1}, "fewshot") == ["alpha at the upper edge"]
    assert experiments.grid_edges({"algorithm.alpha": 0.03, "algorithm.beta": 0.03}, "fewshot") == [
        "alpha at the lower edge", "beta at the lower edge"]
    assert experiments.grid_edges({"algorithm.alpha": 0.3, "algorithm.beta": 0.1}, "fewshot") == []
    # hyper-cleaning's alpha grid is the grid times 1000: 1.0 is inside it, 1000 its upper edge
    assert experiments.grid_edges({"algorithm.alpha": 1000.0, "algorithm.beta": 1.0}, "hyper-cleaning") == [
        "alpha at the upper edge", "beta at the upper edge"]
    assert experiments.grid_edges({"algorithm.alpha": 100.0}, "hyper-cleaning") == []


def test_a_diverged_quadratic_run_is_summarised_and_tabled_from_its_records_and_from_its_published_summary(tmp_path):
    """Step sizes of 1e3 overflow x_error to infinity by iteration 15, which the records write as null (strict JSON):
    the summary reads it as NaN (the target never reached, the best x_error the finite one, the curve NaN there),
    and the tables and plots are written, from the run and from its published summary alike (they crashed)."""
    cell = experiments.Cell("rabo-diverged", experiments.FAMILY_TASKS["quadratic"] / "rabo.yaml",
                            TINY_QUADRATIC | {"algorithm.iterations": 15, "run.eval_every": 5, "run.final_test": False,
                                              "algorithm.alpha": 1e3, "algorithm.beta": 1e3,
                                              "run.results_dir": str(tmp_path / "run")},
                            "rabo", set="family-quadratic-sweep")
    run_plain(cell.scenario(), logging.getLogger("quiet"))
    written = [r["x_error"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["phase"] == "eval"]
    assert written[-1] is None and all(v is not None for v in written[:2])  # the overflow, null in the file
    row = experiments.summarize(cell, "cpu")
    assert math.isnan(row["final_x_error"]) and row["best_x_error"] == min(written[:2])
    assert row["iterations_to_target"] is None and math.isnan(row["curve"][-1][1])
    published = tmp_path / "summary.json"
    published.write_text(experiments.to_json(row, indent=1))
    for name, summary in (("run", row), ("published", experiments.read_summary(published))):
        experiments.write_outputs("diverged", [summary], tmp_path / name, "t", None)
    for suffix in (".csv", "_curves.csv", ".json", ".md"):
        assert (tmp_path / "run" / f"diverged{suffix}").read_text() == \
            (tmp_path / "published" / f"diverged{suffix}").read_text()


def test_family_quadratic_columns_count_to_the_target_from_the_records_and_the_sweep_reads_no_test(tmp_path, monkeypatch):
    monkeypatch.setitem(experiments.SWEEP_BUDGET, "family-quadratic", TINY_QUADRATIC | {"run.final_test": False})
    monkeypatch.setattr(experiments, "GRID", (0.1, 0.3))
    monkeypatch.setattr(experiments, "FAMILY_ROWS", ["rabo", "fedmbo", "sldbo"])
    monkeypatch.setattr(experiments, "TARGET_X_ERROR", 0.5)  # reached within the tiny budget
    monkeypatch.setattr(experiments, "STEP_SIZES", tmp_path / "step_sizes")
    experiments.main(["family-quadratic-sweep", "--jobs", "2", "--threads", "1", "--out", str(tmp_path / "sweep"), "--publish"])
    summary = {r["cell"]: r for r in json.loads((tmp_path / "sweep" / "family-quadratic-sweep.json").read_text())}
    assert set(summary) == {f"{row}-alpha{a}-beta{b}" for row in ("rabo", "fedmbo", "sldbo", "rabo-submodels")
                            for a in (0.1, 0.3) for b in (0.1, 0.3)}
    for label, row in summary.items():
        records = read_metrics(tmp_path / "sweep" / "runs" / label / "metrics.jsonl")
        assert all(r["phase"] != "test" for r in records)  # a sweep never reads the test split
        evals = [r for r in records if r["phase"] == "eval"]
        phases = [r for r in records if r["phase"] not in ("eval", "test", "done")]
        # the kept evaluation is the lowest F(x) - F(x*), never chosen on x_error
        kept = min(evals, key=lambda r: r["suboptimality"])
        assert (row["validation_metric"], row["kept_iteration"], row["test"]) == ("suboptimality", kept["iteration"], kept["x_error"])
        # "to the target", by hand: the first evaluation at or below it, and every phase up to its iteration
        # bytes: through the server, but a gossip method's peer-to-peer traffic over the ring's edges
        sent = (lambda r: r["bytes_p2p"]) if row["row"] == "sldbo" else (lambda r: r["bytes_down"] + r["bytes_up"])
        assert row["bytes_per_iteration"] == sum(sent(r) for r in phases) / 6 > 0
        first = [r["iteration"] for r in evals if r["x_error"] <= 0.5]
        if first:
            q = first[0]
            assert row["iterations_to_target"] == q
            assert row["rounds_to_target"] == sum(1 for r in phases if r["iteration"] <= q)
            assert row["bytes_to_target"] == sum(sent(r) for r in phases if r["iteration"] <= q)
            assert row["flops_to_target"] == sum(r["flops"] for r in phases if r["iteration"] <= q) > 0
        else:
            assert row["iterations_to_target"] is row["rounds_to_target"] is row["bytes_to_target"] is None
        # rabo and fedmbo: inner and outer phase; sldbo: one local round
        assert row["rounds_per_iteration"] == len(phases) / 6 == (1 if row["row"] == "sldbo" else 2)
        assert row["final_x_error"] == evals[-1]["x_error"]
    assert any(r["iterations_to_target"] is not None for r in summary.values())
    chosen = yaml.safe_load((tmp_path / "step_sizes" / "family-quadratic-sweep-cpu.yaml").read_text())
    for row in ("rabo", "fedmbo", "sldbo", "rabo-submodels"):
        best = min((r for r in summary.values() if r["row"] == row), key=lambda r: r["kept_validation"])
        assert chosen["rows"][row] == {"algorithm.alpha": best["scenario"]["algorithm"]["alpha"],
                                       "algorithm.beta": best["scenario"]["algorithm"]["beta"]}
    table = (tmp_path / "sweep" / "family-quadratic-sweep.md").read_text()
    assert table.count("**chosen**") == 4 and "F(x) - F(x*)" in table

    # the set reads the choices and writes the side-by-side table, with "not reached" where it was not
    monkeypatch.setitem(experiments.SCALES["cpu"], "family-quadratic", TINY_QUADRATIC)
    monkeypatch.setattr(experiments, "TARGET_X_ERROR", 1e-9)
    experiments.main(["family-quadratic", "--jobs", "2", "--threads", "1", "--out", str(tmp_path / "set")])
    rows = list(csv.DictReader(open(tmp_path / "set" / "family-quadratic.csv")))
    assert {r["cell"] for r in rows} == {"rabo", "fedmbo", "sldbo", "rabo-submodels"}
    assert all(float(r["bytes_vs_fedmbo"]) > 0 for r in rows)
    table = (tmp_path / "set" / "family-quadratic.md").read_text()
    # iterations, rounds, bytes and FLOPs to the target, in every row
    assert table.count("not reached") == 4 * 4 and "Capacity 1 only: fedmbo, sldbo (FedMBO" in table
    assert (tmp_path / "set" / "family-quadratic_accuracy.png").is_file()


TINY_FEWSHOT = TINY | {"clients.num": 5, "algorithm.iterations": 3, "run.patience": 2}


@pytest.mark.parametrize("row", experiments.FAMILY_ROWS)
def test_every_family_algorithm_runs_on_few_shot_learning_with_every_reply_accepted(row, tmp_path):
    """No estimator or option of the family's few-shot files works on the quadratic only: two iterations at
    the paper's capacities (capacity 1 for the full-model rows), every reply accepted."""
    partial = row + experiments.SUBMODELS
    path, capacities = experiments._family_row_file("fewshot", partial if partial in experiments.family_rows("fewshot") else row)
    scenario = experiments.load_scenario(path, TINY_FEWSHOT | capacities | {"algorithm.iterations": 2, "run.results_dir": str(tmp_path)})
    run_plain(scenario)
    records = read_metrics(tmp_path / "metrics.jsonl")
    phases = [r for r in records if r["phase"] not in ("eval", "test", "done")]
    assert sum(r["rejected"] + r["failures"] for r in phases) == 0
    assert all(r["clients_aggregated"] == r["clients_sent"] > 0 for r in phases)
    assert [r["iteration"] for r in records if r["phase"] == "eval"] == [0, 1, 2] and records[-1]["phase"] == "done"


def test_family_fewshot_sweep_chooses_on_validation_and_the_set_reads_it_once_on_the_test_episodes(tmp_path, monkeypatch):
    monkeypatch.setitem(experiments.SWEEP_BUDGET, "family-fewshot", TINY_FEWSHOT | {"run.patience": 0, "run.final_test": False})
    monkeypatch.setitem(experiments.SCALES["cpu"], "family-fewshot", TINY_FEWSHOT)
    monkeypatch.setattr(experiments, "GRID", (0.1, 1.0))
    monkeypatch.setattr(experiments, "FAMILY_TUNED", [("algorithm.alpha",)])
    monkeypatch.setattr(experiments, "FAMILY_ROWS", ["fedmbo", "rabo", "sldbo"])
    monkeypatch.setattr(experiments, "STEP_SIZES", tmp_path / "step_sizes")
    experiments.main(["family-fewshot-sweep", "--jobs", "2", "--threads", "1", "--out", str(tmp_path / "sweep"), "--publish"])
    summary = {r["cell"]: r for r in json.loads((tmp_path / "sweep" / "family-fewshot-sweep.json").read_text())}
    assert set(summary) == {f"{row}-alpha{a}" for row in ("fedmbo", "rabo", "sldbo", "rabo-submodels") for a in (0.1, 1)}
    for label, row in summary.items():
        records = read_metrics(tmp_path / "sweep" / "runs" / label / "metrics.jsonl")
        assert all(r["phase"] != "test" for r in records)  # a sweep never reads the test episodes
        assert row["validation_metric"] == "val_accuracy" and row["test"] is None  # strict JSON: no NaN
    chosen = yaml.safe_load((tmp_path / "step_sizes" / "family-fewshot-sweep-cpu.yaml").read_text())
    for row in ("fedmbo", "rabo", "sldbo", "rabo-submodels"):
        low, high = summary[f"{row}-alpha0.1"]["kept_validation"], summary[f"{row}-alpha1"]["kept_validation"]
        assert chosen["rows"][row] == {"algorithm.alpha": 1.0 if high > low else 0.1}  # the first on a tie

    experiments.main(["family-fewshot", "--jobs", "2", "--threads", "1", "--out", str(tmp_path / "set")])
    summary = {r["cell"]: r for r in json.loads((tmp_path / "set" / "family-fewshot.json").read_text())}
    assert set(summary) == {"fedmbo", "rabo", "sldbo", "rabo-submodels"}
    for label, row in summary.items():
        assert row["alpha"] == chosen["rows"][label]["algorithm.alpha"] and row["beta"] == 0.3  # beta: the file's
        records = read_metrics(tmp_path / "set" / "runs" / label / "metrics.jsonl")
        evals = [r for r in records if r["phase"] == "eval"]
        phases = [r for r in records if r["phase"] not in ("eval", "test", "done")]
        (test,) = [r for r in records if r["phase"] == "test"]  # read once, on the model kept on validation
        kept = max(evals, key=lambda r: r["val_accuracy"])
        assert (row["test"], row["test_se"], row["kept_iteration"]) == (test["test_accuracy"], test["test_accuracy_se"], kept["iteration"])
        assert test["iteration"] == kept["iteration"]
        # the cost of the kept model, by hand; a gossip row's bytes are its peer-to-peer traffic
        sent = (lambda r: r["bytes_p2p"]) if label == "sldbo" else (lambda r: r["bytes_down"] + r["bytes_up"])
        spent = [r for r in phases if r["iteration"] <= kept["iteration"]]
        assert (row["flops_to_kept"], row["bytes_to_kept"]) == (sum(r["flops"] for r in spent), sum(sent(r) for r in spent))
        assert row["bytes_per_iteration"] == sum(sent(r) for r in phases) / row["iterations_run"]
        assert row["rounds_per_iteration"] == (1 if label == "sldbo" else 2)
    assert summary["fedmbo"]["flops_vs_fedmbo"] == 1.0 and summary["rabo-submodels"]["bytes_vs_fedmbo"] < 1
    table = (tmp_path / "set" / "family-fewshot.md").read_text()
    assert table.startswith("# The federated bilevel family on 5-way 1-shot few-shot learning (cpu scale)")
    assert ("| row | capacities | alpha, beta | test accuracy (kept at, validation) | iterations run (end) | FLOPs to kept | "
            "bytes to kept | FLOPs/it vs FedMBO | bytes/it vs FedMBO | rounds / it | bytes / it |") in table
    assert "| rabo-submodels | 1, 1/2, 1/4, 1/8, 1/16 |" in table and "Capacity 1 only: fedmbo, sldbo" in table
    assert "Rows stop early on validation" in table and "scenarios/fewshot/<row>.yaml" in table


def test_summaries_read_the_tasks_own_metrics(tmp_path):
    """The metric names come from the task (main_metric, test_metric, higher_is_better), as the tables had them."""
    for path, expected in ((experiments.PAPER / "table2" / "rabo.yaml", ("val_accuracy", True, "test_accuracy")),
                           (experiments.PAPER / "losstuning" / "ce.yaml", ("val_balanced_accuracy", True, "balanced_accuracy")),
                           (experiments.FAMILY_TASKS["hyper-cleaning"] / "rabo.yaml", ("val_accuracy", True, "test_accuracy")),
                           (experiments.FAMILY_TASKS["quadratic"] / "rabo.yaml", ("suboptimality", False, "x_error"))):
        assert experiments.validation_metric(experiments.load_scenario(path)) == expected


def test_family_hyper_cleaning_columns_read_the_cleaning_scores_of_the_kept_model():
    scenario = experiments.load_scenario(experiments.FAMILY_TASKS["hyper-cleaning"] / "fednest.yaml")
    phases = [{"iteration": q, "bytes_down": 10 * q, "bytes_up": 1} for q in (1, 1, 2, 2, 2)]
    test = {"test_accuracy": 0.4, "flip_precision": 0.6, "flip_recall": 0.5, "downweighted": 0.45}
    row = experiments.family_columns(scenario, [], phases, test, 2)
    assert (row["rounds_per_iteration"], row["bytes_per_iteration"]) == (2.5, (10 + 10 + 20 * 3 + 5) / 2)
    assert (row["flip_precision"], row["flip_recall"], row["downweighted"]) == (0.6, 0.5, 0.45)
    assert "iterations_to_target" not in row and row["capacities"] == [1.0] and row["alpha"] == 100.0
    assert math.isnan(experiments.family_columns(scenario, [], phases, None, 2)["flip_recall"])  # cut short: no test


# ---------------------------------------------------------------- reading runs, strict JSON


def strict_loads(text: str):
    """JSON as a strict parser reads it: a bare NaN or Infinity is an error."""
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")
    return json.loads(text, parse_constant=refuse)


def test_metrics_are_read_while_written_and_a_malformed_line_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"phase": "eval", "iteration": 0}\n{"phase": "inner", "iter')  # the writer is mid-record
    assert read_metrics(path) == [{"phase": "eval", "iteration": 0}]
    path.write_text('{"phase": "eval", "iteration": 0}\n{"phase": "inner"}')  # complete JSON, its newline not yet
    assert read_metrics(path) == [{"phase": "eval", "iteration": 0}]
    path.write_text('{"phase": "eval", "iteration": 0}\n\n{"phase": "inn\n{"phase": "done"}\n')
    with pytest.raises(ValueError, match=rf"^{path}: line 3: not a JSON record"):
        read_metrics(path)


def test_a_resumed_writer_rewrites_its_history_in_one_write(tmp_path, monkeypatch):
    """On resume the history is the file's whole content from its first write (a reader never sees the run
    shorter than it was), NaN written as null and kept as NaN in memory."""
    history = [{"iteration": 0, "phase": "eval", "x_error": 1.0}, {"iteration": 1, "phase": "eval", "x_error": math.nan}]
    writes = []
    real = results.atomic_write
    monkeypatch.setattr(results, "atomic_write", lambda path, write, *a: writes.append(path) or real(path, write, *a))
    writer = results.ResultsWriter(tmp_path, load_scenario(experiments.APP_DIR / "scenarios" / "quickstart.yaml"), history=history)
    assert writes == [tmp_path / "scenario.yaml", tmp_path / "metrics.jsonl"]
    assert read_metrics(tmp_path / "metrics.jsonl") == [history[0], history[1] | {"x_error": None}]
    assert writer.records[0] == history[0] and math.isnan(writer.records[1]["x_error"])


def quadratic_sweep_cell(tmp_path, monkeypatch, out):
    monkeypatch.setitem(experiments.SWEEP_BUDGET, "family-quadratic", TINY_QUADRATIC | {"run.final_test": False})
    monkeypatch.setattr(experiments, "TARGET_X_ERROR", 1e-12)  # not reached: the "to target" columns are None
    (cell,) = experiments.cells_for("family-quadratic-sweep", "5w1s", ["rabo-alpha0.1-beta0.1"], "cpu", out)
    return cell


def test_publishing_holds_the_cells_lock_until_its_files_are_copied(tmp_path, monkeypatch):
    """publish_cell summarises a run, then copies its records, scenario and cell.json: another process that resumed
    the cell in between (a stopped cell, published cut short) would rewrite metrics.jsonl and cell.json under it,
    and the published records would not be the published summary's. Its lock is held to the last copy."""
    cell = quadratic_sweep_cell(tmp_path, monkeypatch, tmp_path / "out")
    experiments.run_cell(cell, "plain", 1, ["family-quadratic-sweep"])
    compact, copy, free = experiments.compact_records, experiments.shutil.copy2, []

    def another_process_may_start(directory):
        with experiments.cell_lock(cell.scenario().results_path) as ours:
            free.append(ours)

    monkeypatch.setattr(experiments, "compact_records", lambda d: another_process_may_start(d) or compact(d))
    monkeypatch.setattr(experiments.shutil, "copy2", lambda a, b: another_process_may_start(a) or copy(a, b))
    experiments.publish_cell(replace(cell, published=tmp_path / "published" / cell.label), "cpu")
    assert free == [False, False, False]  # records, scenario.yaml, cell.json
    assert (tmp_path / "published" / cell.label / "records.jsonl").is_file()


def test_a_flower_cell_waits_for_every_client_and_runs_to_its_end(tmp_path, monkeypatch):
    """Under ``--engine flower`` a client is late by the real clock (the plain engine's rule is for injected faults
    only), so the cell waits a day for every reply, as published cells did: the machine's load never drops a
    client (README: "same loop, same numbers"); the phase timeout is no scenario difference (IGNORED_KEYS)."""
    from rabo_flwr import flower_run

    cell = quadratic_sweep_cell(tmp_path, monkeypatch, tmp_path / "out")
    configs, timeouts = [], []

    class Home:
        def __init__(self, *args):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def run(self, app_dir, run_config=None, federation_config=None, **options):
            configs.append(run_config)
            timeouts.append(options.get("timeout", "FlowerHome.run's default"))
            return flower_run.RunOutcome("1", "finished:completed", {}, "")

    monkeypatch.setattr(flower_run, "FlowerHome", Home)
    assert experiments.run_cell(cell, "flower", 1, ["family-quadratic-sweep"]) == f"{cell.label}: done"
    assert configs[0]["run.phase_timeout"] == experiments.WAIT_FOR_EVERY_CLIENT["run.phase_timeout"] >= 86400
    assert "run.phase_timeout" in experiments.IGNORED_KEYS
    assert timeouts == [None]  # flwr run itself is never stopped by a clock either (it was at 30 minutes)


def test_a_run_this_code_cannot_read_is_an_error_naming_the_file_and_key_not_a_missing_cell(tmp_path, monkeypatch):
    cell = quadratic_sweep_cell(tmp_path, monkeypatch, tmp_path / "out")
    assert experiments.summarize(cell, "cpu") is None  # no run here yet
    experiments.run_cell(cell, "plain", 1, ["family-quadratic-sweep"])
    assert experiments.summarize(cell, "cpu")["status"] == "budget"
    saved = cell.scenario().results_path / "scenario.yaml"
    scenario = yaml.safe_load(saved.read_text())
    scenario["algorithm"]["retired_key"] = 1  # a run of a version whose schema this code does not know
    saved.write_text(yaml.safe_dump(scenario))
    with pytest.raises(ScenarioError, match=rf"^{saved}: algorithm.retired_key: unknown key"):
        experiments.summarize(cell, "cpu")
    with pytest.raises(ScenarioError, match="algorithm.retired_key"):
        experiments.publish_cell(replace(cell, published=tmp_path / "published" / cell.label), "cpu")
    assert not (tmp_path / "published" / cell.label).exists()
    saved.unlink()  # records without the scenario they ran: an error, not "no run yet"
    with pytest.raises(FileNotFoundError, match=rf"^{saved}: missing beside the run's metrics.jsonl"):
        experiments.summarize(cell, "cpu")


def test_published_json_is_strict_and_its_tables_are_the_runs_byte_for_byte(tmp_path, monkeypatch):
    """A sweep cell has no test number's SE (NaN in memory) and never reaches the target (None): its published
    summary and the set's JSON are strict (null for both), and the tables rebuilt from the published cell alone
    (another --out: no run there) are the tables of the run itself, byte for byte."""
    cell = quadratic_sweep_cell(tmp_path, monkeypatch, tmp_path / "first")
    args = ["family-quadratic-sweep", "--rows", cell.label, "--jobs", "1", "--threads", "1"]
    experiments.main(args + ["--out", str(tmp_path / "first"), "--publish"])
    published = tmp_path / "published" / "cpu" / "family-quadratic-sweep"
    summary = strict_loads((published / "runs" / cell.label / "summary.json").read_text())
    assert summary["test_se"] is None and summary["iterations_to_target"] is None
    strict_loads((tmp_path / "first" / "family-quadratic-sweep.json").read_text())
    for line in (published / "runs" / cell.label / "records.jsonl").read_text().splitlines():
        strict_loads(line)
    row = experiments.summarize(cell, "cpu")
    assert math.isnan(row["test_se"]) and row["iterations_to_target"] is None
    again = experiments.read_summary(published / "runs" / cell.label / "summary.json")
    assert math.isnan(again["test_se"]) and again["iterations_to_target"] is None

    experiments.main(args + ["--out", str(tmp_path / "second"), "--plot-only"])
    assert not (tmp_path / "second" / "runs" / cell.label).exists()  # the published cell was read
    for suffix in (".md", ".csv", "_curves.csv", ".json", "_accuracy.png"):
        name = f"family-quadratic-sweep{suffix}"
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    assert ",nan," in (tmp_path / "first" / "family-quadratic-sweep.csv").read_text()  # test_se, as before


def test_a_null_in_a_runs_records_is_the_nan_its_published_summary_reads_back(tmp_path, monkeypatch):
    """A diverged evaluation's value is null in metrics.jsonl (strict JSON); the row summarised from the run has
    NaN there, as the row read back from its published summary does, so both make the same tables."""
    cell = quadratic_sweep_cell(tmp_path, monkeypatch, tmp_path / "out")
    experiments.run_cell(cell, "plain", 1, ["family-quadratic-sweep"])
    metrics = cell.scenario().results_path / "metrics.jsonl"
    records = read_metrics(metrics)
    last = max(i for i, r in enumerate(records) if r["phase"] == "eval")
    records[last]["suboptimality"] = None
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    row = experiments.summarize(cell, "cpu")
    assert math.isnan(row["final_validation"]) and row["iterations_to_target"] is None
    experiments.publish_cell(replace(cell, published=tmp_path / "published" / cell.label), "cpu")
    again = experiments.read_summary(tmp_path / "published" / cell.label / "summary.json")
    assert list(again) == list(row) and math.isnan(again["final_validation"])


def test_the_submodel_table_gives_each_capacitys_elements_and_share_of_the_full_x():
    fresh = {"cell": "rabo", "x_elements_by_capacity": {1.0: 111680.0, 0.5: 28192.0, 0.0625: 500.0}}
    published = {"cell": "fedmbo", "x_elements_by_capacity": {"1.0": 111680.0}}  # summary.json's string keys
    lines = experiments._submodel_sizes([fresh, published])
    assert lines[3] == "| row | capacity 1 | capacity 1/2 | capacity 1/16 |"
    assert lines[5] == "| rabo | 111,680 (100.0%) | 28,192 (25.2%) | 500 (0.4%) |"
    assert lines[6] == "| fedmbo | 111,680 (100.0%) |  |  |"
    assert experiments._submodel_sizes([{"cell": "ce", "x_elements_by_capacity": {}}]) == []
