"""Bilevel tasks: each builds its models, data and losses from a scenario."""

from __future__ import annotations

import importlib

from ..scenario import Scenario
from .base import BilevelTask, ClientBatch


def task_class(name: str) -> type:
    """The class a custom ``task.name`` ("package.module:ClassName") names."""
    module_name, _, class_name = name.partition(":")
    if not module_name or not class_name.isidentifier():
        raise ValueError(f"{name!r} is not \"package.module:ClassName\"")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ImportError(f"cannot import {module_name} ({err})") from None
    if not hasattr(module, class_name):
        raise AttributeError(f"module {module_name} has no {class_name}")
    return getattr(module, class_name)


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
    if scenario.task.name == "hyper-cleaning":
        from .hyper_cleaning import HyperCleaningTask

        return HyperCleaningTask(scenario)
    if ":" in scenario.task.name:
        return task_class(scenario.task.name)(scenario)
    raise ValueError(f"unknown task {scenario.task.name!r}")


__all__ = ["BilevelTask", "ClientBatch", "build_task", "task_class"]
