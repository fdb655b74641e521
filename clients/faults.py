"""Injected faults, so tests (and users rehearsing a deployment) can see a run survive them.

A scenario's ``run.faults`` names partitions, phases and iterations; the matching client then
raises, sleeps past the phase timeout, or returns a malformed update that the server must reject.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from rabo_flwr.scenario import Fault


class InjectedFault(RuntimeError):
    """Raised by a client told to fail."""


def matching(faults: Sequence[Fault], partition: int, phase: str, iteration: int) -> list[Fault]:
    return [
        f for f in faults
        if f.partition == partition and f.phase in (phase, "any") and (not f.iterations or iteration in f.iterations)
    ]


def before_phase(faults: Sequence[Fault]) -> None:
    """Faults that strike before the work: an exception, or a straggler's sleep."""
    for fault in faults:
        if fault.kind == "raise":
            raise InjectedFault(f"injected failure ({fault})")
        if fault.kind == "sleep":
            time.sleep(fault.seconds)


def corrupt_update(faults: Sequence[Fault], update: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Faults that spoil the reply: NaN values or a wrong shape."""
    for fault in faults:
        name = next(iter(update))
        if fault.kind == "nan":
            update = dict(update, **{name: torch.full_like(update[name], float("nan"))})
        elif fault.kind == "wrong-shape":
            update = dict(update, **{name: torch.zeros(update[name].numel() + 1)})
    return update
