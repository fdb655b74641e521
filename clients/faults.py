"""Injected faults, so tests (and users rehearsing a deployment) can see a run survive them.

A scenario's ``run.faults`` names partitions, phases and iterations; the matching client then
raises, sleeps past the phase timeout, blocks until a file appears (a straggler a test releases
once the server has given up on it), or returns an update the server must reject: NaN values,
a wrong shape, or a huge but finite one (what a diverging client sends).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

import torch

from rabo_flwr.scenario import Fault

HUGE = 1e6  # a "huge" update is the real one times this: finite, far outside any phase's spread


class InjectedFault(RuntimeError):
    """Raised by a client told to fail."""


def matching(faults: Sequence[Fault], partition: int, phase: str, iteration: int) -> list[Fault]:
    return [
        f for f in faults
        if f.partition == partition and f.phase in (phase, "any") and (not f.iterations or iteration in f.iterations)
    ]


def before_phase(faults: Sequence[Fault]) -> float:
    """Faults that strike before the work: an exception, a straggler's sleep or its wait for a release file.

    Returns the seconds the client was held back (the plain engine's lateness is this delay alone)."""
    start = time.monotonic()
    for fault in faults:
        if fault.kind == "raise":
            raise InjectedFault(f"injected failure ({fault})")
        if fault.kind == "sleep":
            time.sleep(fault.seconds)
        if fault.kind == "block":
            deadline = time.monotonic() + fault.seconds
            while not Path(fault.release).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
    return time.monotonic() - start if faults else 0.0


def corrupt_updates(faults: Sequence[Fault], updates: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Faults that spoil the reply, applied to the first tensor of the first side (NaN, wrong shape)
    or to all of it (huge)."""
    side = next(iter(updates))
    name = next(iter(updates[side]))
    for fault in faults:
        first = updates[side][name]
        if fault.kind == "nan":
            updates = updates | {side: updates[side] | {name: torch.full_like(first, float("nan"))}}
        elif fault.kind == "wrong-shape":
            updates = updates | {side: updates[side] | {name: torch.zeros(first.numel() + 1)}}
        elif fault.kind == "huge":
            updates = updates | {side: {k: v * HUGE for k, v in updates[side].items()}}
    return updates
