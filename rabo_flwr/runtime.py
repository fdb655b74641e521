"""Per-process caches and device choice shared by the server and client apps.

Data sets and models are costly to build; in simulation one process serves many messages,
so they are built once per process and scenario, and a Flower run's scenario is parsed once
per process and run, not per message. In deployment every message may run in a fresh process,
where the data layer's on-disk cache keeps this cheap.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import Context

from .scenario import Scenario, scenario_from_run_config
from .tasks import BilevelTask, build_task


def choose_device(scenario: Scenario) -> torch.device:
    """CUDA when available (or asked for), else CPU."""
    if scenario.run.device == "cuda" or (scenario.run.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


_TASKS: dict[str, BilevelTask] = {}


def cached_task(scenario: Scenario) -> BilevelTask:
    """One task (models, data, shards) per distinct scenario in this process."""
    key = json.dumps(scenario.to_dict(), sort_keys=True)
    if key not in _TASKS:
        _TASKS[key] = build_task(scenario)
    return _TASKS[key]


@dataclass(frozen=True)
class RunSetup:
    """What every message of a run needs: its scenario, task and device."""

    scenario: Scenario
    task: BilevelTask
    device: torch.device


_RUNS: dict[str, RunSetup] = {}


def project_scenario(context: Context) -> Scenario:
    """The project's scenario: ``scenario`` of the run config, relative to the project (with overrides)."""
    return scenario_from_run_config(context.run_config)


def run_setup(context: Context, scenario_of: Callable[[Context], Scenario] = project_scenario) -> RunSetup:
    """The run's scenario (read by ``scenario_of``), task and device, resolved once per process and run.

    Flower fixes a run's config when the run starts, so (reader, run id, run config) names the
    same scenario for every message of the run: the YAML is read and validated, and the task
    looked up, once instead of per message.
    """
    key = json.dumps([id(scenario_of), context.run_id, sorted(context.run_config.items())])
    setup = _RUNS.get(key)
    if setup is None:
        scenario = scenario_of(context)
        setup = _RUNS[key] = RunSetup(scenario, cached_task(scenario), choose_device(scenario))
    return setup
