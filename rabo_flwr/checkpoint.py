"""Checkpoints: everything a run needs to continue exactly where it stopped.

Mask policies, client sampling and episodes are all seeded by (seed, iteration, client), so
the global x and y, the iteration, the metrics so far and the loop's bookkeeping (which
elements were ever trained, FLOP estimates for failed clients, an algorithm's persistent server
variables such as SimFBO's v, and what the plain engine's clients keep between iterations, their
``ClientState``) are the whole state; the file is written atomically, so a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write

CHECKPOINT = "checkpoint.pt"


@dataclass
class Checkpoint:
    iteration: int
    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    scenario: dict[str, Any]
    state: dict[str, Any]


def save_checkpoint(directory: Path, checkpoint: Checkpoint) -> Path:
    path = directory / CHECKPOINT
    atomic_write(path, lambda f: torch.save(checkpoint.__dict__, f))
    return path


def load_checkpoint(directory: Path) -> Checkpoint:
    path = directory / CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (run.resume=true needs one)")
    return Checkpoint(**torch.load(path, weights_only=True))
