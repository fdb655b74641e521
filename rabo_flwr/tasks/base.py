"""What a bilevel task gives the algorithm: two layouts, two losses, data per client, evaluation."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

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

    A call puts the tensors in the template's parameter and buffer slots for the duration of the
    forward pass, as ``torch.func.functional_call`` does (same operations on the same tensors,
    the same outputs and gradients), but through slots found once here instead of walking the
    module tree at every call, which cost more than a narrow client's arithmetic. So one instance
    serves one call at a time (every engine here calls it from one thread per process); threads
    that share one set of tensors call the module inside :meth:`bound` (the evaluation does).
    """

    def __init__(self, build: Callable[[], nn.Module]):
        with torch.device("meta"):
            self.module = build()
        self._slots: dict[str, tuple[dict, str]] = {}
        for prefix, owner in self.module.named_modules():
            for store in (owner._parameters, owner._buffers):
                for attr, value in store.items():
                    if value is not None:
                        self._slots[f"{prefix}.{attr}" if prefix else attr] = (store, attr)

    def __call__(self, tensors: Mapping[str, torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        templates = self._bind(tensors)  # not through bound(): a generator costs a microsecond per call
        try:
            return self.module(*inputs)
        finally:
            self._unbind(templates)

    @contextmanager
    def bound(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[nn.Module]:
        """The module with ``tensors`` in its slots for the block: calls inside it may run in several
        threads at once (each forward pass reads the same tensors)."""
        templates = self._bind(tensors)
        try:
            yield self.module
        finally:
            self._unbind(templates)

    def _bind(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Put ``tensors`` in the slots; returns the templates they replaced."""
        if tensors.keys() != self._slots.keys():
            missing = sorted(self._slots.keys() - tensors.keys())
            unexpected = sorted(tensors.keys() - self._slots.keys())
            raise KeyError(f"{type(self.module).__name__}: tensors missing {missing}, unexpected {unexpected}")
        templates = {name: store[attr] for name, (store, attr) in self._slots.items()}
        for name, tensor in tensors.items():
            store, attr = self._slots[name]
            store[attr] = tensor
        return templates

    def _unbind(self, templates: dict[str, torch.Tensor]) -> None:
        for name, (store, attr) in self._slots.items():
            store[attr] = templates[name]


class BilevelTask:
    """Interface of a task: min_x F(x) = f(x, y*(x)) with y*(x) = argmin_y g(x, y), summed over clients.

    x is the upper-level variable, y the lower-level one; each is a dict of named tensors
    (``Tensors``). The algorithm only ever sees such dicts, possibly sliced to a client's submodel,
    so every method taking x or y must work on the slices its layouts allow.

    To use a task of your own, subclass this, give the scenario ``task.name:
    "package.module:ClassName"`` and, if it takes options, give the class an attribute ``Options``,
    a dataclass of them (defaults and types); the scenario's ``task.options`` mapping is validated into it
    (unknown keys and wrong types fail with the file and key; raise ``ValueError`` in its
    ``__post_init__`` for range checks) and reaches the constructor as ``scenario.task.options``.

    Required: the constructor ``__init__(scenario)``, the attributes below, :meth:`init_tensors`,
    :meth:`client_batch`, :meth:`lower_loss`, :meth:`upper_loss`, :meth:`evaluate`.
    Optional: :meth:`prepare`, :meth:`lower_objective` (a faster g for the inner steps),
    :meth:`evaluate_client` (only with ``run.federated_eval``).

    Attributes
    ----------
    x_layout, y_layout : Layout
        The names of x's and y's tensors and, per dimension, the channel group it belongs to
        (``None``: never sliced). Submodel masks are optional: a side whose dims are all ``None``
        (``Layout(groups={}, dims={name: (None,) * ndim})``) always travels whole; a model-shaped
        side declares groups (e.g. ``{"features": 16}``) and ``dims`` naming them, and a client of
        capacity r then holds ``ceil(r * size)`` of each group's channels.
    num_partitions : int
        Number of client data partitions (usually ``scenario.clients.num``).
    main_metric : str
        A key of :meth:`evaluate`'s result on ``"val"``: early stopping, the choice of the model
        kept and summaries follow it.
    higher_is_better : bool
        The direction of :attr:`main_metric` (default True; False for an error, such as the
        ``quadratic`` task's ``x_error``).
    test_metric : str
        A key of :meth:`evaluate`'s result on ``"test"``: the number reported for the model kept.
    """

    x_layout: Layout
    y_layout: Layout
    num_partitions: int
    main_metric: str
    test_metric: str
    higher_is_better: bool = True

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        """The initial global ``(x, y)``, full size, floating point, seeded by ``seed`` (same seed, same tensors).

        Their names are exactly the layouts' names; shapes are the full model's.
        """
        raise NotImplementedError

    def prepare(self) -> None:
        """Load (and cache) every data set the run needs, so missing or corrupt data stops the
        server before any client trains. Optional."""

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        """A partition's data for one global iteration (seeded by iteration and partition), ``steps`` inner steps.

        Returns a :class:`ClientBatch`: ``lower_steps`` (``steps`` batches, one per inner SGD step on g),
        ``lower`` (the batch of g in the hypergradient), ``upper`` (the batch of f), ``examples``
        (how many examples the client used, an int). Batches may be anything ``lower_loss`` and
        ``upper_loss`` accept, on ``device``.
        """
        raise NotImplementedError

    def lower_loss(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """g(x, y) on ``batch``: a scalar tensor, twice differentiable in x and y (hypergradients
        differentiate it twice); strongly convex in y for the hypergradient estimators to be exact."""
        raise NotImplementedError

    def upper_loss(self, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor], batch: Any) -> torch.Tensor:
        """f(x, y) on ``batch``: a scalar tensor, differentiable in x and y (it may ignore x)."""
        raise NotImplementedError

    def lower_objective(self, x: Mapping[str, torch.Tensor], batch: Any,
                        meter: CostMeter) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
        """g(x, .) on one batch for the inner steps. Optional.

        Tasks override it to precompute what does not depend on y, metering that work with ``meter``.
        """
        return lambda y: self.lower_loss(x, y, batch)

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device, split: str) -> dict[str, float]:
        """Server-side metrics of the full global model on ``split``: "val" (held out from the training
        data; every choice reads it; recorded at iteration 0, every ``run.eval_every`` and at the end)
        or "test" (read once, on the model kept, for reported numbers). A dict of floats (or lists of
        floats) including :attr:`main_metric` ("val") or :attr:`test_metric` ("test"), named after
        the split where the metric reads data (``val_accuracy``, ``test_accuracy``). It runs on the
        server's torch thread; work it splits into independent parts may use the run's threads
        (:func:`~rabo_flwr.threads.map_one_thread_each`, as the few-shot evaluation does)."""
        raise NotImplementedError

    def evaluate_client(self, partition: int, x: Tensors, y: Tensors, device: torch.device) -> dict[str, float]:
        """Federated evaluation: the full global model on the partition's own held-out data. Optional
        (needed with ``run.federated_eval``).

        Returns a dict of floats with ``examples`` (the number of held-out examples, the weight of
        this client in the mean the server records as ``client_<metric>``).
        """
        raise NotImplementedError(f"{type(self).__name__} has no client-side evaluation (run.federated_eval)")

    @property
    def layouts(self) -> dict[str, Layout]:
        return {"x": self.x_layout, "y": self.y_layout}


def init_module_tensors(module: nn.Module, layout: Layout) -> Tensors:
    """The tensors a layout names, taken from a freshly initialised module."""
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    return {name: state[name].detach().clone() for name in layout.dims}
