"""The results directory of a run: metrics.jsonl, the resolved scenario, the final model.

Every file is written atomically (temporary file, then rename), so an interrupted run never
leaves a half-written model or scenario behind; metrics are appended line by line. JSON is strict
(:func:`to_json`: a non-finite number is null), in every result file the project writes.
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


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, infinity) replaced by None, inside dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


def to_json(value: Any, **options: Any) -> str:
    """Strict JSON, what every result file of the project is written with: JSON has no NaN or infinity (Python's
    ``json`` writes a bare ``NaN``, which strict parsers reject), so a non-finite number, a value that does not
    exist (a cut-short run's test number, a diverged loss), is written as null. ``options``: ``json.dumps``'s."""
    return json.dumps(finite_or_null(value), allow_nan=False, **options)


def validation_score(value: float | None, higher_is_better: bool) -> float:
    """A validation value on a scale where larger is better; a diverged one (NaN in memory, null in a file) is the
    worst, so it is never the model kept, never a step size chosen, and no progress for early stopping."""
    if value is None or math.isnan(value):
        return -math.inf
    return value if higher_is_better else -value


class ResultsWriter:
    """Writes one run's results; ``history`` (from a checkpoint) restarts metrics.jsonl from there."""

    def __init__(self, directory: Path, scenario: Scenario, history: list[dict[str, Any]] | None = None):
        self.directory = directory
        self.metrics_path = directory / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write(directory / "scenario.yaml", lambda f: yaml.safe_dump(scenario.to_dict(), f, sort_keys=False), "w")
        # the history in one atomic write: a reader never sees a resumed run shorter than it was
        self.records = list(history or [])
        atomic_write(self.metrics_path, lambda f: f.writelines(to_json(r) + "\n" for r in self.records), "w")

    def log(self, record: dict[str, Any]) -> None:
        """Append one record: its line and newline in one write, so a reader never takes a partial line for a
        record (:func:`read_metrics`). In memory the record stays as given (a diverged value is NaN, which the
        loop compares as a number); the file has null there."""
        self.records.append(record)
        with open(self.metrics_path, "a") as f:
            f.write(to_json(record) + "\n")

    def save_model(self, x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], name: str = "model.pt") -> Path:
        path = self.directory / name
        atomic_write(path, lambda f: torch.save({"x": x, "y": y}, f))
        return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl (or a published records.jsonl), also while another process appends to it:
    a last line without its newline is a record still being written and is left out. Any other line that is not
    JSON is an error naming the file and the line (a run that cannot be read is never taken for a shorter one)."""
    path = Path(path)
    *lines, _partial = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number}: not a JSON record ({err})") from None
    return records
