"""Bilevel tasks: each builds its models, data and losses from a scenario."""

from __future__ import annotations

from ..scenario import Scenario
from .base import BilevelTask, ClientBatch


def build_task(scenario: Scenario) -> BilevelTask:
    if scenario.task.name == "fewshot":
        from .fewshot import FewShotTask

        return FewShotTask(scenario)
    if scenario.task.name == "loss-tuning":
        from .loss_tuning import LossTuningTask

        return LossTuningTask(scenario)
    if scenario.task.name == "quadratic":
        from .quadratic import QuadraticTask

        return QuadraticTask(scenario)
    raise ValueError(f"unknown task {scenario.task.name!r}")


__all__ = ["BilevelTask", "ClientBatch", "build_task"]
