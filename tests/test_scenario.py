"""Scenarios: every file loads, overrides apply, and bad input names the file and the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from rabo_flwr.scenario import ScenarioError, load_scenario, scenario_from_run_config, scenario_keys

REPO = Path(__file__).resolve().parent.parent
# scenarios/paper/step_sizes/ holds the sweeps' chosen step sizes, which the experiment sets read (not scenarios)
SCENARIOS = sorted(p for p in (REPO / "scenarios").rglob("*.yaml") if "step_sizes" not in p.parts)


@pytest.mark.parametrize("path", SCENARIOS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_scenario_is_valid(path):
    assert load_scenario(path).name


def test_default_run_config_is_the_quickstart():
    scenario = scenario_from_run_config({"scenario": "scenarios/quickstart.yaml", "algorithm.iterations": ""})
    assert scenario.name == "quickstart" and scenario.clients.capacities == [1.0, 0.5, 0.25, 0.125, 0.0625]
    assert scenario.capacity(6, 0) == 0.5  # tiers assigned round-robin


def test_run_config_overrides_single_values():
    scenario = scenario_from_run_config({"scenario": "scenarios/quickstart.yaml", "algorithm.iterations": 3,
                                         "algorithm.name": "rafbo", "clients.num": 2})
    assert (scenario.algorithm.iterations, scenario.algorithm.name, scenario.clients.num) == (3, "rafbo", 2)
    assert scenario.algorithm.resolved_estimator == "fd-coordinate"


@pytest.mark.parametrize("name,estimator,mask_x,mask_y", [
    ("rabo", "exact", "importance", "importance"), ("rafbo", "fd-coordinate", "importance", "importance"),
    ("static", "", "static", "static"), ("oap", "", "oap", "oap"), ("fedrolex", "", "rolling", "rolling"),
    ("fiarse", "", "fiarse", "fiarse"),
])
def test_an_algorithm_brings_its_own_estimator_and_masks(name, estimator, mask_x, mask_y):
    labels = {"task.labels": "episode" if estimator else "global"}
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", {"algorithm.name": name} | labels)
    assert (scenario.algorithm.resolved_estimator, scenario.algorithm.mask("x"), scenario.algorithm.mask("y")) == \
        (estimator, mask_x, mask_y)
    scenario = load_scenario(REPO / "scenarios" / "quickstart.yaml", {"algorithm.name": name, "algorithm.mask_x": "random"} | labels)
    assert scenario.algorithm.mask("x") == "random"


def test_pyproject_offers_every_scalar_scenario_key():
    """Flower accepts only the run-config keys the app's pyproject lists: every scalar key, and every option of
    every estimator (``algorithm.estimator_options.<option>``; a user's own task's options are its app's to list)."""
    from rabo_flwr.hypergrad import METHODS, method_options

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flat = set(config)
    expected = {k for k in scenario_keys() if k not in ("clients.capacities", "clients.schedule", "clients.local_steps",
                                                         "algorithm.estimator_options", "run.faults", "task.options",
                                                         "algorithm.placement", "algorithm.mixing")}
    options = {f"algorithm.estimator_options.{option}" for method in METHODS for option in method_options(method)}
    assert flat - {"scenario"} == expected | options


OPTIONS = "scenarios/paper/losstuning/rabo.yaml"  # estimator exact, estimator_options {max_iter: 10, damping: 5.0}


def test_an_estimator_option_is_set_alone_through_flowers_run_config():
    """``flwr run --run-config algorithm.estimator_options.warm_start=true``, as Flower parses it, checks it against
    the app's keys (the SuperLink refuses a key the pyproject does not list) and fuses it, then the ServerApp's
    scenario: the option is set and the file's other options stay."""
    from flwr.common.config import flatten_dict, fuse_dicts, get_project_config, parse_config_args

    overrides = parse_config_args([f'scenario="{OPTIONS}" algorithm.estimator_options.warm_start=true'])
    defaults = flatten_dict(get_project_config(REPO)["tool"]["flwr"]["app"]["config"])
    run_config = fuse_dicts(defaults, overrides, check_keys=True)
    options = scenario_from_run_config(run_config).algorithm.estimator_options
    assert options == {"max_iter": 10, "damping": 5.0, "warm_start": True}


def test_an_estimator_option_is_set_alone_through_the_harness_override(tmp_path):
    """``python -m rabo_flwr.experiments ... --override algorithm.estimator_options.warm_start=true``: every cell's
    scenario takes it; an option the estimator does not take is one line naming the override and the key."""
    import argparse

    from rabo_flwr import experiments

    parser = argparse.ArgumentParser()
    overrides = experiments.parse_overrides(parser, ["algorithm.estimator_options.warm_start=true"])
    cells = experiments.cells_for("family-quadratic-sweep", "5w1s", ["rabo-curvature"], "cpu", tmp_path, overrides)
    assert cells and all(c.scenario().algorithm.estimator_options["warm_start"] is True for c in cells)
    with pytest.raises(ScenarioError) as err:
        load_scenario(REPO / OPTIONS, experiments.parse_overrides(parser, ["algorithm.estimator_options.warm=true"]))
    assert str(err.value) == (f"{REPO / OPTIONS} (run config override): algorithm.estimator_options.warm: "
                              "not an option of exact (it takes tol, max_iter, damping, warm_start)")


def write(tmp_path, text):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,key,fragment", [
    ("clients:\n  capacities: [1.0, 1.5]\n", "clients.capacities[1]", "(0, 1]"),
    ("clients:\n  capacities: [0]\n", "clients.capacities[0]", "(0, 1]"),
    ("algorithm:\n  iterations: ten\n", "algorithm.iterations", "integer"),
    ("algorithm:\n  itertions: 10\n", "algorithm.itertions", "unknown key"),
    ("algorithm:\n  mask_x: diagonal\n", "algorithm.mask_x", "not one of"),
    ("algorithm:\n  name: fedmbo\n", "clients.capacities", "every capacity must be 1"),
    ("algorithm:\n  name: dist-maml\nclients:\n  capacities: [1.0]\n  schedule: [{from_iteration: 3, capacities: [0.5]}]\n",
     "clients.schedule[0].capacities", "every capacity must be 1"),
    ("algorithm:\n  name: sgd\n", "algorithm.name", "not one of"),
    ("task:\n  labels: characters\n", "task.labels", "not one of"),
    ("algorithm:\n  name: static\n  estimator: exact\ntask:\n  labels: global\n", "algorithm.estimator", "computes no hypergradient"),
    ("algorithm:\n  name: dist-protonet\nclients:\n  capacities: [1.0]\ntask:\n  name: loss-tuning\n",
     "algorithm.name", "task.name must be fewshot"),
    ("algorithm:\n  placement: [0, -1]\n", "algorithm.placement[1]", ">= 0"),
    ("algorithm:\n  submodel: frozen\n", "algorithm.submodel", "not one of"),
    ("algorithm:\n  name: fednest\n  submodel: segment\n", "algorithm.submodel", "fednest does not train segments"),
    ("run:\n  faults:\n  - {kind: block, seconds: 5}\n", "run.faults[0].release", "file that releases it"),
    ("task:\n  upper_objective: accuracy\n", "task.upper_objective", "not one of"),
    ("run:\n  divergence_factor: 0.5\n", "run.divergence_factor", "must be 0 (off) or > 1"),
    ("run:\n  faults:\n  - kind: explode\n", "run.faults[0].kind", "not one of"),
    ("run:\n  faults:\n  - phase: local\n", "run.faults[0].phase", "not one of"),
    ("task: 3\n", "task", "mapping"),
    ("algorithm:\n  name: rabo\n  estimator_options: {K: 5}\n", "algorithm.estimator_options.K", "not an option of exact"),
])
def test_bad_scenarios_name_file_and_key(tmp_path, text, key, fragment):
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as err:
        load_scenario(path)
    message = str(err.value)
    assert message.startswith(f"{path}: {key}:") and fragment in message


def test_bad_override_is_named_as_such(tmp_path):
    with pytest.raises(ScenarioError, match=r"run config override\): clients.fraction: must be in \(0, 1\]"):
        load_scenario(REPO / "scenarios" / "quickstart.yaml", {"clients.fraction": 2.0})


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ScenarioError, match="nope.yaml: scenario file not found"):
        load_scenario(tmp_path / "nope.yaml")


def test_base_files_are_overlaid_and_cycles_named(tmp_path):
    (tmp_path / "base.yaml").write_text("algorithm:\n  iterations: 7\n  alpha: 0.2\nclients:\n  num: 4\n")
    (tmp_path / "cell.yaml").write_text("base: base.yaml\nalgorithm:\n  alpha: 0.5\n")
    scenario = load_scenario(tmp_path / "cell.yaml")
    assert (scenario.algorithm.iterations, scenario.algorithm.alpha, scenario.clients.num) == (7, 0.5, 4)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ScenarioError, match="loop.yaml: base: loop.yaml includes itself"):
        load_scenario(tmp_path / "loop.yaml")
