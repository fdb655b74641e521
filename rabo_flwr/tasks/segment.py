"""The restricted problem of a segment client (``algorithm.submodel: segment``).

A segment client is sent x and y whole and its plan; it holds the elements of its kept output
channels (:func:`~rabo_flwr.submodel.held_layout`): its variables are those held slices, R of x
and S of y, and every other element is a constant at the server's value. Its problem is the
task's, restricted to them:

    min over x_R of f(x_R, y_S*(x_R)),   y_S*(x_R) = argmin over y_S of g(x_R, y_S),  the rest fixed,

whose hypergradient is grad_{x_R} f - H_{x_R y_S} [H_{y_S y_S}]^-1 grad_{y_S} f.

:class:`SegmentTask` is the task seen through that restriction: its losses take the held slices,
write them into copies of the whole tensors (``scatter_into``, differentiable to any order) and
evaluate the task's own loss on the full model. Every derivative an algorithm takes of them is
then the restricted problem's, with no change to the algorithm or the estimators: T SGD steps on
g move only y_S, and the exact estimator's conjugate gradient runs on H_{y_S y_S} alone. The
client pays the full model's forward and backward passes; it sends back only its held slices,
which the server counts per element as it counts sliced ones.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..cost import CostMeter
from ..submodel import Layout, Plan, held_layout, scatter_into, slice_tensors
from .base import BilevelTask, ClientBatch, Tensors


class SegmentTask(BilevelTask):
    """``task`` restricted to the held elements of ``whole`` (side -> the whole tensors sent) under ``plan``.

    Only what an algorithm's client work calls is here (``Algorithm.segments`` names the
    algorithms whose work reads nothing else); its layouts are the held ones.
    """

    def __init__(self, task: BilevelTask, whole: Mapping[str, Tensors], plan: Plan):
        self.task = task
        self.whole = whole
        self.plan = plan
        self.x_layout = held_layout(task.x_layout, "segment")
        self.y_layout = held_layout(task.y_layout, "segment")

    def held(self, side: str) -> Tensors:
        """The client's variables of ``side``: the held slices of the whole tensors it was sent."""
        return slice_tensors(self.whole[side], self.layouts[side], self.plan)

    def _full(self, side: str, held: Mapping[str, torch.Tensor]) -> Tensors:
        layout: Layout = self.layouts[side]
        return {n: scatter_into(self.whole[side][n], t, layout.dims[n], self.plan) for n, t in held.items()}

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        return self.task.client_batch(partition, iteration, device, steps)

    def lower_loss(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.task.lower_loss(self._full("x", x), self._full("y", y), batch)

    def upper_loss(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        return self.task.upper_loss(self._full("x", x), self._full("y", y), batch)

    def lower_objective(self, x: Mapping[str, torch.Tensor], batch: Any, meter: CostMeter):
        objective = self.task.lower_objective(self._full("x", x), batch, meter)
        return lambda y: objective(self._full("y", y))
