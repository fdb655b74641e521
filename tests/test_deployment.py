"""End to end through Flower's deployment runtime: a SuperLink and three SuperNodes as real processes.

Unlike the simulation e2e test, every client is its own ``flower-supernode`` that announces its
capacity in ``--node-config``, as an edge device would. The announced capacities are a
permutation of the scenario's own profile, so the test fails if the server ignores them.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rabo_flwr.deployment import LocalDeployment, TlsFiles
from rabo_flwr.masks import build_plan, scenario_policies
from rabo_flwr.results import read_metrics
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from rabo_flwr.submodel import numel_in_plan

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
SCENARIO = REPO / "scenarios" / "quickstart.yaml"  # the run config's default scenario
CAPACITIES = {0: 0.25, 1: 1.0, 2: 0.5}  # partition -> announced capacity (the scenario's profile gives 1.0, 0.5, 0.25)


@pytest.fixture
def deployment(tmp_path):
    env = {k: os.environ[k] for k in ("RABO_DATA_DIR", "RABO_CACHE_DIR")}
    dep = LocalDeployment(tmp_path / "flower", env=env | {"OMP_NUM_THREADS": "1"}, connection="rabo-test")  # 3 clients, 2 cores
    try:
        yield dep
    finally:
        dep.close()
    assert not dep.leftovers(), "a SuperLink, SuperNode or app process outlived the test"


def expected_x_elements(run_config: dict, capacity: float, iteration: int, partition: int) -> int:
    """Elements of x in the plan the server builds for this client (the project's own plan code)."""
    scenario = load_scenario(SCENARIO, run_config)
    task = cached_task(scenario)
    x, _ = task.init_tensors(scenario.seed)
    # static masks: the size depends on the capacity alone, whatever the model looks like by then
    return numel_in_plan(x, task.layouts["x"], build_plan(task.layouts, scenario_policies(scenario), capacity, iteration, partition))


def test_deployment_superlink_and_three_supernodes_train_their_announced_submodels(deployment, tmp_path):
    superlink = deployment.start_superlink()
    for partition, capacity in CAPACITIES.items():
        deployment.start_supernode(superlink, {"partition-id": partition, "capacity": capacity})
    deployment.wait_for_nodes(len(CAPACITIES))

    results = tmp_path / "results"
    run_config = {"algorithm.iterations": 2, "clients.num": 3, "task.eval_episodes": 10, "task.val_episodes": 10, "model.width": 16,
                  "algorithm.inner_steps": 3, "algorithm.mask_x": "static", "algorithm.mask_y": "static",
                  "run.results_dir": str(results)}
    outcome = deployment.run(REPO, run_config, timeout=300)
    assert outcome.status == "finished:completed", outcome.log[-3000:] + "\n" + deployment.logs_tail()

    records = read_metrics(results / "metrics.jsonl")
    phases = [(r["iteration"], r["phase"]) for r in records if r["phase"] in ("inner", "outer")]
    assert phases == [(1, "inner"), (1, "outer"), (2, "inner"), (2, "outer")]
    profile = load_scenario(SCENARIO, run_config)
    for r in records:
        if r["phase"] not in ("inner", "outer"):
            continue
        assert (r["clients_aggregated"], r["failures"], r["rejected"]) == (3, 0, 0), r
        assert math.isfinite(r["lower_loss"] if r["phase"] == "inner" else r["upper_loss"])
        by_partition = {c["partition"]: c for c in r["clients"]}
        assert sorted(by_partition) == sorted(CAPACITIES)
        for partition, capacity in CAPACITIES.items():
            client = by_partition[partition]
            expected = expected_x_elements(run_config, capacity, r["iteration"], partition)
            # the announcement must matter: the scenario's profile would give this client another size
            profiled = expected_x_elements(run_config, profile.capacity(partition, r["iteration"]), r["iteration"], partition)
            assert expected != profiled
            assert client["capacity"] == capacity
            assert client["x_elements"] == expected, (r["iteration"], r["phase"], partition)
    evals = [r for r in records if r["phase"] == "eval"]
    assert [e["iteration"] for e in evals] == [0, 2]
    assert (results / "model.pt").is_file()


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("ssh-keygen")), reason="needs openssl and ssh-keygen")
def test_tls_superlink_admits_only_registered_supernodes(deployment, tmp_path):
    """The README's secure set-up: certificates from scripts/make_test_certs.sh, SuperNode keys
    registered with `flwr supernode register`; an unregistered SuperNode is turned away."""
    subprocess.run([REPO / "scripts" / "make_test_certs.sh", tmp_path / "certs"], check=True, capture_output=True)
    keys = {}
    for name in ("registered", "stranger"):
        keys[name] = tmp_path / "keys" / name
        keys[name].parent.mkdir(exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-C", "", "-f", keys[name]], check=True)
    tls = TlsFiles.in_dir(tmp_path / "certs")
    superlink = deployment.start_superlink(tls=tls, supernode_auth=True)
    deployment.register_supernode(keys["registered"].with_suffix(".pub"))
    deployment.start_supernode(superlink, {"partition-id": 0, "capacity": 1.0}, root_certificates=tls.ca,
                               auth_private_key=keys["registered"])
    deployment.wait_for_nodes(1)
    stranger = deployment.start_supernode(superlink, {"partition-id": 1, "capacity": 1.0}, root_certificates=tls.ca,
                                          auth_private_key=keys["stranger"])
    assert stranger.process.wait(timeout=60) != 0, stranger.log_tail()
    assert "Failed to activate SuperNode" in stranger.log.read_text()
    assert deployment.online_nodes() == 1
