"""One client's work in a global iteration, on its submodel slices (plain PyTorch).

Both functions take and return name->tensor dicts holding only the client's slices and know
nothing of how they travelled.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from .hypergrad import hypergradient
from .tasks.base import BilevelTask, ClientBatch

Tensors = dict[str, torch.Tensor]


@dataclass
class LocalResult:
    update: Tensors
    metrics: dict[str, float] = field(default_factory=dict)


class CostMeter:
    """FLOPs (``torch.utils.flop_counter``), wall time and peak memory of one phase.

    Counting FLOPs dispatches every operator through Python and roughly triples a phase's
    wall time on a CPU (benchmarks/README.md); ``count_flops=False`` skips it (flops = -1).
    """

    def __init__(self, device: torch.device, count_flops: bool = True):
        self.device = device
        self.counter = FlopCounterMode(display=False) if count_flops else None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        self.start = time.perf_counter()
        if self.counter is not None:
            self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        if self.counter is not None:
            self.counter.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall_time = time.perf_counter() - self.start
        return False

    def metrics(self) -> dict[str, float]:
        flops = float(self.counter.get_total_flops()) if self.counter is not None else -1.0
        return {"flops": flops, "wall_time": self.wall_time, "peak_memory": float(_peak_memory(self.device))}


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS count, so the peak is this phase's, not the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's lifetime peak


def _peak_memory(device: torch.device) -> int:
    """CUDA peak allocation on GPU; on CPU the peak resident set size since the phase began."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def inner_phase(
    task: BilevelTask, batch: ClientBatch, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
    steps: int, beta: float,
) -> LocalResult:
    """T SGD steps on g over the y-submodel; returns G = (y_0 - y_T) / beta.

    Correction to the paper: Algorithm 1 prints G = (y_T - y_0) / beta, which together with the
    server's y <- y - beta * avg(G) would move y *up* the lower-level loss. With
    G = (y_0 - y_T) / beta the server step reproduces the clients' descent.
    """
    objective = task.lower_objective({k: v.detach() for k, v in x.items()}, batch.lower)
    y_t = {k: v.detach().clone().requires_grad_(True) for k, v in y.items()}
    losses = []
    for _ in range(steps):
        loss = objective(y_t)
        grads = torch.autograd.grad(loss, list(y_t.values()), allow_unused=True)
        losses.append(float(loss.detach()))
        with torch.no_grad():
            for (name, t), g in zip(y_t.items(), grads):
                if g is not None:
                    t.sub_(beta * g)
    update = {k: (y[k].detach() - y_t[k].detach()) / beta for k in y}
    return LocalResult(update, {"lower_loss_start": losses[0], "lower_loss": losses[-1], "examples": batch.examples})


def outer_phase(
    task: BilevelTask, batch: ClientBatch, x: Mapping[str, torch.Tensor], y: Mapping[str, torch.Tensor],
    estimator: str, options: Mapping[str, Any],
) -> LocalResult:
    """The client's hypergradient H_i for its x-submodel at (x_q, y_{q+1})."""
    x_names, y_names = list(x), list(y)

    def upper(xs, ys):
        return task.upper_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.upper)

    def lower(xs, ys):
        return task.lower_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.lower)

    xs = [x[n].detach() for n in x_names]
    ys = [y[n].detach() for n in y_names]
    grads = hypergradient(upper, lower, xs, ys, method=estimator, **options)
    with torch.no_grad():
        upper_value = float(upper(xs, ys))
    return LocalResult(dict(zip(x_names, grads)), {"upper_loss": upper_value, "examples": batch.examples})
