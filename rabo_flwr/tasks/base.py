"""What a bilevel task gives the algorithm: two layouts, two losses, data per client, evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call

from ..cost import CostMeter
from ..submodel import Layout

Tensors = dict[str, torch.Tensor]


@dataclass
class ClientBatch:
    """The data a client uses in one global iteration.

    ``lower_steps[t]`` feeds inner step t (the same support set in few-shot learning, a fresh
    mini-batch per step in loss tuning); ``lower`` and ``upper`` feed g and f in the hypergradient.
    """

    lower_steps: list[Any]
    lower: Any
    upper: Any
    examples: int


class FunctionalModule:
    """Runs a module's architecture with whatever (sliced) tensors it is handed.

    The template lives on the ``meta`` device: it owns no memory, so a narrow client never
    materialises the full-width model; the tensors passed in decide the real shapes.
    """

    def __init__(self, build: Callable[[], nn.Module]):
        with torch.device("meta"):
            self.module = build()

    def __call__(self, tensors: Mapping[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, dict(tensors), inputs, strict=True)


class BilevelTask:
    """Interface of a task. x is the upper-level variable, y the lower-level one.

    Subclasses define the layouts, initial tensors and the two losses; the algorithm only
    ever sees name->tensor dicts (possibly sliced to a submodel).
    """

    x_layout: Layout
    y_layout: Layout
    num_partitions: int
    main_metric: str  # the evaluation metric that early stopping and summaries follow
    higher_is_better: bool = True  # direction of main_metric (False for an error such as quadratic's x_error)

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Load (and cache) every data set the run needs, so missing or corrupt data stops the
        server before any client trains."""

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        """A partition's data for one global iteration (seeded by iteration and partition), ``steps`` inner steps."""
        raise NotImplementedError

    def lower_loss(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def upper_loss(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def lower_objective(self, x: Mapping[str, torch.Tensor], batch: Any,
                        meter: CostMeter) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
        """g(x, .) on one batch for the inner steps.

        Tasks override it to precompute what does not depend on y, metering that work with ``meter``.
        """
        return lambda y: self.lower_loss(x, y, batch)

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device) -> dict[str, float]:
        raise NotImplementedError

    @property
    def layouts(self) -> dict[str, Layout]:
        return {"x": self.x_layout, "y": self.y_layout}


def init_module_tensors(module: nn.Module, layout: Layout) -> Tensors:
    """The tensors a layout names, taken from a freshly initialised module."""
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    return {name: state[name].detach().clone() for name in layout.dims}
