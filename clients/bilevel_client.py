"""A RABO/RAFBO client: runs its phase on the slices it was sent and returns only its slices.

Flower-free on purpose: ``rabo_flwr/client_app.py`` converts messages to dicts of tensors and
back, so the same class runs under simulation, deployment and the plain-loop benchmark.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from clients.faults import before_phase, corrupt_update, matching
from rabo_flwr.local import CostMeter, LocalResult, inner_phase, outer_phase
from rabo_flwr.scenario import Scenario
from rabo_flwr.tasks import BilevelTask

ArrayLike = torch.Tensor | np.ndarray


def _as_tensors(arrays: Mapping[str, ArrayLike], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (torch.from_numpy(np.asarray(v)) if not isinstance(v, torch.Tensor) else v).to(device) for k, v in arrays.items()}


class BilevelClient:
    """One partition's client. ``capacity`` is what it announces (node config or scenario profile)."""

    def __init__(self, task: BilevelTask, scenario: Scenario, partition: int, device: torch.device):
        self.task = task
        self.scenario = scenario
        self.partition = partition
        self.device = device

    def _run(self, phase: str, iteration: int, x, y, work) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        faults = matching(self.scenario.run.faults, self.partition, phase, iteration)
        before_phase(faults)
        x, y = _as_tensors(x, self.device), _as_tensors(y, self.device)
        batch = self.task.client_batch(self.partition, iteration, self.device)
        with CostMeter(self.device, self.scenario.run.count_flops) as meter:
            result: LocalResult = work(batch, x, y)
        metrics = {
            "partition": self.partition,
            "x_elements": sum(t.numel() for t in x.values()),
            "y_elements": sum(t.numel() for t in y.values()),
            **result.metrics,
            **meter.metrics(),
        }
        return corrupt_update(faults, {k: v.detach().cpu() for k, v in result.update.items()}), metrics

    def inner(self, iteration: int, x: Mapping[str, ArrayLike], y: Mapping[str, ArrayLike]):
        """T steps on g over the y-slices; returns G_i = (y_0 - y_T)/beta and metrics."""
        algo = self.scenario.algorithm
        return self._run("inner", iteration, x, y,
                         lambda batch, xs, ys: inner_phase(self.task, batch, xs, ys, algo.inner_steps, algo.beta))

    def outer(self, iteration: int, x: Mapping[str, ArrayLike], y: Mapping[str, ArrayLike]):
        """The hypergradient H_i for the x-slices at (x_q, y_{q+1}) and metrics."""
        algo = self.scenario.algorithm
        options = estimator_options(self.scenario, iteration, self.partition)
        return self._run("outer", iteration, x, y,
                         lambda batch, xs, ys: outer_phase(self.task, batch, xs, ys, algo.resolved_estimator, options))


def estimator_options(scenario: Scenario, iteration: int, partition: int) -> dict:
    """The scenario's estimator options, completed with what depends on the run.

    fd-coordinate's Jacobian scale defaults to -beta (see ``rabo_flwr.hypergrad``), so it needs
    the run's beta; its coordinate sample is seeded per iteration and client.
    """
    algo = scenario.algorithm
    options = dict(algo.estimator_options)
    if algo.resolved_estimator == "fd-coordinate":
        options.setdefault("beta", algo.beta)
        options.setdefault("seed", scenario.seed * 1_000_003 + iteration * 1009 + partition)
    return options
