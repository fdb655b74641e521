"""The results directory of a run: metrics.jsonl, the resolved scenario, the final model.

Every file is written atomically (temporary file, then rename), so an interrupted run never
leaves a half-written model or scenario behind; metrics are appended line by line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import yaml

from .files import atomic_write
from .scenario import Scenario


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class ResultsWriter:
    """Writes one run's results; ``history`` (from a checkpoint) restarts metrics.jsonl from there."""

    def __init__(self, directory: Path, scenario: Scenario, history: list[dict[str, Any]] | None = None):
        self.directory = directory
        self.metrics_path = directory / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "scenario.yaml", lambda f: yaml.safe_dump(scenario.to_dict(), f, sort_keys=False), "w")
        atomic_write(self.metrics_path, lambda f: None, "w")
        for record in history or []:
            self.log(record)

    def log(self, record: dict[str, Any]) -> None:
        record = _jsonable(record)
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save_model(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], name: str = "model.pt") -> Path:
        path = self.directory / name
        atomic_write(path, lambda f: torch.save({"x": x, "y": y}, f))
        return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
