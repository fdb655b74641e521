"""A client: runs one phase of the scenario's algorithm on the slices it was sent, returns only its updates.

Flower-free on purpose: ``rabo_flwr/client_app.py`` turns messages into dicts of tensors and
back, and the plain engine calls :meth:`Client.run` directly, so simulation, deployment and the
plain loop run the same client code.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping

import numpy as np
import torch

from clients.faults import before_phase, corrupt_updates, matching
from rabo_flwr.algorithms import ALGORITHMS, ClientJob, ClientState
from rabo_flwr.cost import CostMeter
from rabo_flwr.protocol import PLAN, THRESHOLDS
from rabo_flwr.scenario import Scenario
from rabo_flwr.tasks import BilevelTask
from rabo_flwr.tasks.segment import SegmentTask
from rabo_flwr.threads import part_threads

ArrayLike = torch.Tensor | np.ndarray


def _as_tensors(arrays: Mapping[str, ArrayLike], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v))).to(device) for k, v in arrays.items()}


def cost_context(scenario: Scenario) -> str:
    """What, besides tensor shapes, decides a computation's FLOPs: the task and model settings, and
    the submodel kind (a segment client's units run the full model on its held slices' shapes)."""
    return json.dumps({"task": dataclasses.asdict(scenario.task), "model": dataclasses.asdict(scenario.model),
                       "submodel": scenario.algorithm.submodel}, sort_keys=True)


class Client:
    """One partition's client."""

    def __init__(self, task: BilevelTask, scenario: Scenario, partition: int, device: torch.device):
        self.task = task
        self.scenario = scenario
        self.partition = partition
        self.device = device
        self.algorithm = ALGORITHMS[scenario.algorithm.name]
        self.context = cost_context(scenario)
        self.injected_delay = 0.0  # seconds the last phase's injected faults held it back

    def run(self, phase: str, iteration: int, arrays: Mapping[str, Mapping[str, ArrayLike]],
            state: ClientState | None = None, submodel: str = ""
            ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
        """``(updates, metrics)`` of ``phase`` at ``iteration``; ``arrays`` maps each side sent (x, y, the
        algorithm's own server variables) to its slices (and ``THRESHOLDS`` to the mask's thresholds, when
        the server's policy has them). ``state``: what this partition's client kept so far, read as made on
        ``submodel`` (the digest of the plan that sliced ``arrays``) and updated in place with what the
        phase keeps (:class:`~rabo_flwr.algorithms.ClientState`). Under segment submodels x and y come whole
        with the plan (``PLAN``): the client works on their held slices, inside the full model (:class:`SegmentTask`)."""
        faults = matching(self.scenario.run.faults, self.partition, phase, iteration)
        self.injected_delay = before_phase(faults)
        x = _as_tensors(arrays.get("x", {}), self.device)
        y = _as_tensors(arrays.get("y", {}), self.device)
        task = self.task
        if self.scenario.algorithm.submodel == "segment":
            task = SegmentTask(self.task, {"x": x, "y": y}, _as_tensors(arrays[PLAN], self.device))
            x, y = task.held("x"), task.held("y")
        thresholds = _as_tensors(arrays.get(THRESHOLDS, {}), self.device)
        sides = {side: _as_tensors(a, self.device) for side, a in arrays.items()
                 if side not in ("x", "y", THRESHOLDS, PLAN)}
        meter = CostMeter(self.device, self.scenario.run.count_flops, self.context)
        kept = _as_tensors(state.readable(submodel), self.device) if state is not None else {}
        job = ClientJob(task, self.scenario, self.partition, iteration, self.device, x, y, meter, thresholds, sides, kept)
        with meter:
            result = self.algorithm.run(phase, job)
        if state is not None:
            state.keep(submodel, result.state)
        metrics = {
            "partition": self.partition,
            "x_elements": sum(t.numel() for t in x.values()),
            "y_elements": sum(t.numel() for t in y.values()),
            **({"local_steps": job.local_steps} if self.scenario.clients.local_steps else {}),
            **result.metrics,
            **meter.metrics(),
        }
        updates = {side: {k: v.detach().cpu() for k, v in u.items()} for side, u in result.updates.items()}
        return corrupt_updates(faults, updates), metrics

    def evaluate(self, x: Mapping[str, ArrayLike], y: Mapping[str, ArrayLike]) -> dict[str, float]:
        """The global model's metrics on this partition's held-out data (``BilevelTask.evaluate_client``);
        work it splits into independent parts runs them on this client's torch threads (part_threads)."""
        with part_threads(torch.get_num_threads()):
            metrics = self.task.evaluate_client(self.partition, _as_tensors(x, self.device),
                                                _as_tensors(y, self.device), self.device)
        if "examples" not in metrics:
            raise ValueError(f"{type(self.task).__name__}.evaluate_client returned no 'examples' (its weight in the mean)")
        return metrics
