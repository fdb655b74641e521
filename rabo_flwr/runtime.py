"""Per-process caches and device choice shared by the server and client apps.

Data sets and models are costly to build; in simulation one process serves many messages,
so they are built once per process and scenario. In deployment every message may run in a
fresh process, where the data layer's on-disk cache keeps this cheap.
"""

from __future__ import annotations

import json
import torch

from .scenario import Scenario
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
