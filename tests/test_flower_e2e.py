"""End to end through Flower's real simulation engine (Ray): `flwr run` on tiny scenarios."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from rabo_flwr.flower_run import FlowerHome
from rabo_flwr.loop import run_plain
from rabo_flwr.results import read_metrics
from rabo_flwr.scenario import load_scenario

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "scenarios" / "quickstart.yaml"
TINY = {"algorithm.iterations": 2, "task.eval_episodes": 10, "task.val_episodes": 10, "model.width": 16, "algorithm.inner_steps": 3}

pytestmark = pytest.mark.e2e


@pytest.fixture
def home(tmp_path):
    flower = FlowerHome(tmp_path / "flower")
    yield flower
    flower.close()
    assert not flower.leftovers(), "a SuperLink or Ray process outlived the test"


def phases(records):
    return [r for r in records if r["phase"] in ("inner", "outer", "local")]


def test_bare_flwr_run_with_flowers_default_federation_matches_the_plain_engine(home, tmp_path):
    """`flwr run .` with no federation settings: Flower's 2 simulated SuperNodes serve the
    scenario's 5 clients, and the run computes what the plain engine computes."""
    results = tmp_path / "flower-results"
    outcome = home.run(REPO, run_config=TINY | {"run.results_dir": str(results)}, timeout=600)
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    assert "2 simulated SuperNodes" in outcome.log
    assert "iteration 2/2 | elapsed" in outcome.log and "done: 2 iterations" in outcome.log
    flower = read_metrics(results / "metrics.jsonl")
    plain = run_plain(load_scenario(QUICKSTART, TINY | {"run.results_dir": str(tmp_path / "plain")}),
                      logging.getLogger("quiet")).records
    assert [(r["iteration"], r["phase"]) for r in phases(flower)] == [(1, "inner"), (1, "outer"), (2, "inner"), (2, "outer")]
    for f, p in zip(phases(flower), phases(plain)):
        assert (f["clients_aggregated"], f["failures"], f["rejected"]) == (5, 0, 0)
        assert sorted(c["partition"] for c in f["clients"]) == [0, 1, 2, 3, 4]
        # the same submodels, messages and work; losses equal up to the thread count's round-off (Flower's
        # actors run one torch thread, the plain engine here the process's), and so is the number of CG steps
        # of a hypergradient (its tolerance is below float32's reach): a client's FLOPs are equal where its
        # Hessian-vector products are as many, the phase's where every client's are
        for key in ("C_x*", "C_y*", "bytes_down", "bytes_up"):
            assert f[key] == p[key], key
        work = {side: {c["partition"]: (c.get("hg_hvp_evals"), c["flops"]) for c in r["clients"]} for side, r in (("f", f), ("p", p))}
        for partition, (products, flops) in work["f"].items():
            if products == work["p"][partition][0]:
                assert flops == work["p"][partition][1], (f["phase"], partition)
        if work["f"] == work["p"]:
            assert f["flops"] == p["flops"]
        loss = "lower_loss" if f["phase"] == "inner" else "upper_loss"
        assert f[loss] == pytest.approx(p[loss], rel=1e-4)
    evals = [r for r in flower if r["phase"] == "eval"]
    assert [e["iteration"] for e in evals] == [0, 2]
    assert evals[-1]["val_accuracy"] == pytest.approx([r for r in plain if r["phase"] == "eval"][-1]["val_accuracy"], abs=0.02)
    (test,) = [r for r in flower if r["phase"] == "test"]  # read once, on the model kept on validation
    assert test["test_accuracy"] == pytest.approx([r for r in plain if r["phase"] == "test"][0]["test_accuracy"], abs=0.02)
    assert (results / "model.pt").is_file() and (results / "scenario.yaml").is_file()


def test_straggler_past_the_phase_timeout_is_dropped_and_counted(home, tmp_path):
    """Partition 1 blocks in iteration 1's outer phase until a file appears, which this test creates
    only once metrics.jsonl holds that phase's record (the server gave up on it after the phase
    timeout): the iteration completes with the other two replies, the run goes on, and once the
    released straggler's late work is through, all three are aggregated again. No timing window:
    the straggler is late however loaded the machine is, and released whatever the timeout."""
    results, release = tmp_path / "results", tmp_path / "release"
    scenario = tmp_path / "straggler.yaml"
    scenario.write_text(
        f"base: {QUICKSTART}\n"
        "run:\n  phase_timeout: 60.0\n  faults:\n"
        f"  - {{partition: 1, phase: outer, iterations: [1], kind: block, seconds: 600, release: '{release}'}}\n")
    done = threading.Event()

    def recorded() -> bool:
        try:
            return any((r["iteration"], r["phase"]) == (1, "outer") for r in read_metrics(results / "metrics.jsonl"))
        except (OSError, ValueError):  # not written yet, or a line half written
            return False

    def release_once_recorded():
        while not done.is_set():
            if recorded():
                release.touch()
                return
            time.sleep(0.1)

    releaser = threading.Thread(target=release_once_recorded, daemon=True)
    releaser.start()
    try:
        outcome = home.run(
            REPO,
            run_config={"scenario": str(scenario), "algorithm.iterations": 3, "clients.num": 3, "task.eval_episodes": 4,
                        "model.width": 8, "algorithm.inner_steps": 2, "run.results_dir": str(results)},
            federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1},
            timeout=600,
        )
    finally:
        done.set()
        releaser.join()
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    assert release.exists()  # released by the test, not by the fault's own limit
    records = {(r["iteration"], r["phase"]): r for r in read_metrics(results / "metrics.jsonl")}
    straggled = records[(1, "outer")]
    assert (straggled["failures"], straggled["clients_aggregated"]) == (1, 2)
    assert sorted(c["partition"] for c in straggled["clients"]) == [0, 2]
    # the work sent to it is counted as wasted: its bytes exactly; its FLOPs only once a reply for a
    # submodel of its size exists (none yet in iteration 1)
    assert straggled["wasted_bytes"] > 0 and straggled["unestimated_failures"] == 1
    assert records[(3, "inner")]["clients_aggregated"] == records[(3, "outer")]["clients_aggregated"] == 3


def test_bad_run_config_fails_before_training_naming_file_and_key(home, tmp_path):
    results = tmp_path / "results"
    outcome = home.run(REPO, run_config={"clients.fraction": 2.0, "run.results_dir": str(results)}, timeout=300)
    assert outcome.status != "finished:completed"
    assert "scenarios/quickstart.yaml (run config override): clients.fraction: must be in (0, 1], got 2.0" in outcome.log
    assert not results.exists()


def test_flwr_run_loss_tuning_miniature(home, tmp_path):
    """The paper's second task, miniature: long-tail CIFAR-10, VS-loss hyperparameters as x."""
    results = tmp_path / "results"
    outcome = home.run(
        REPO, run_config={"scenario": "scenarios/loss_tuning_mini.yaml", "run.results_dir": str(results)},
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1}, timeout=600,
    )
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    records = read_metrics(results / "metrics.jsonl")
    assert [(r["iteration"], r["phase"]) for r in phases(records)] == [(1, "inner"), (1, "outer"), (2, "inner"), (2, "outer")]
    assert all(r["clients_aggregated"] == 3 and r["uncovered_x"] == 0.0 for r in records if r["phase"] == "outer")
    assert all({"hg_iterations", "hg_negative_curvature", "hg_residual"} <= set(c) for r in records
               if r["phase"] == "outer" for c in r["clients"])
    (final,) = [r for r in records if r["phase"] == "test"]
    assert len(final["per_class_accuracy"]) == 10 and final["balanced_accuracy"] == pytest.approx(
        sum(final["per_class_accuracy"]) / 10)


@pytest.mark.parametrize("row,capacities,sides", [("fedrolex", {1.0, 0.5, 0.25}, ("x", "y")), ("dist-protonet", {1.0}, ("x",))])
def test_a_single_phase_row_through_flwr_run(home, tmp_path, row, capacities, sides):
    """Table II's FedRolex row (backbone and head updated together, on submodels) and Dist-ProtoNet
    (the backbone alone is sent and updated): one `train.local` round per iteration."""
    results = tmp_path / "results"
    outcome = home.run(
        REPO, run_config=TINY | {"scenario": f"scenarios/paper/table2/{row}.yaml", "model.backbone": "conv4",
                                 "model.width": 8, "task.n_query": 2, "clients.num": 3, "algorithm.inner_steps": 2,
                                 "run.results_dir": str(results)},
        federation_config={"num-supernodes": 3, "client-resources-num-cpus": 1}, timeout=600,
    )
    assert outcome.status == "finished:completed", outcome.log[-3000:]
    records = read_metrics(results / "metrics.jsonl")
    assert [(r["iteration"], r["phase"]) for r in phases(records)] == [(1, "local"), (2, "local")]
    for r in phases(records):
        assert r["clients_aggregated"] == 3 and r["flops"] > 0 and {c["capacity"] for c in r["clients"]} == capacities
        assert all(f"C_{side}*" in r for side in sides) and ("C_y*" in r) == ("y" in sides)
        assert all((c["y_elements"] > 0) == ("y" in sides) for c in r["clients"])
