"""The paper's experiments, one command per set: run every cell, then write CSV, Markdown and plots.

    python -m rabo_flwr.experiments lr-sweep --column 5w1s --publish   # step sizes of every Table II row
    python -m rabo_flwr.experiments table2 --column 5w1s               # Table II, one column, every row
    python -m rabo_flwr.experiments cx-star                            # the C_x* study (Fig. 3)
    python -m rabo_flwr.experiments loss-tuning-sweep --publish        # the lower-level step of loss tuning
    python -m rabo_flwr.experiments loss-tuning                        # the loss-tuning rows (Fig. 5)
    python -m rabo_flwr.experiments family-quadratic-sweep --publish   # the family's step sizes (issue 15)
    python -m rabo_flwr.experiments family-quadratic                   # the family side by side on quadratic
    python -m rabo_flwr.experiments family-hyper-cleaning-sweep --publish
    python -m rabo_flwr.experiments family-hyper-cleaning
    python -m rabo_flwr.experiments family-fewshot-sweep --publish
    python -m rabo_flwr.experiments family-fewshot

A cell is a scenario file under ``scenarios/paper/`` (the family's: ``scenarios/quadratic/``,
``scenarios/hyper_cleaning/`` and ``scenarios/fewshot/``) plus overrides (the column, the capacities, the scale, the step sizes
chosen by a sweep). ``--scale cpu`` (default) applies :data:`SCALES` ``["cpu"]``: a
Conv4 backbone instead of ResNet12, a small CNN instead of ResNet18, early stopping on the
validation split, checkpoints; ``--scale paper`` runs the files as they are (a GPU's work).
Every choice reads validation: early stopping, the model kept (the best validation evaluation),
the step sizes (a sweep's ``--publish`` writes :func:`step_sizes_path`, which the sets it tunes
read); the test split is read once per run, on the kept model. Cells run in parallel processes
(``--jobs``) through the plain engine or ``--engine flower`` (``flwr run``).

A cell's results directory is never overwritten by another scenario: a finished run of the same
resolved scenario is skipped, an unfinished one resumes from its checkpoint, and a directory
holding a different scenario stops the set with the keys that differ. Each cell's ``cell.json``
records the command that makes exactly it and every invocation that ran it. With ``--publish``
each cell is published (compact records, summary, resolved scenario, cell.json under
``docs/results/<scale>/<set>/runs/<cell>/``) as soon as it finishes, and a published cell of the
same resolved scenario counts as finished: a set spread over several machines continues from
what was committed (``--fresh`` runs such cells again, to reproduce their numbers), and ``--carry``
copies each unfinished cell's last checkpoint beside them (:func:`carry_cell`), from which the next
machine resumes it.
"""

from __future__ import annotations

import argparse
import csv
import fcntl
import json
import logging
import math
import os
import shlex
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import matplotlib
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .checkpoint import CHECKPOINT  # noqa: E402
from .files import atomic_write  # noqa: E402
from .results import read_metrics, to_json, validation_score  # noqa: E402
from .scenario import APP_DIR, Scenario, load_scenario  # noqa: E402

PAPER = APP_DIR / "scenarios" / "paper"
STEP_SIZES = PAPER / "step_sizes"  # the sweeps' chosen step sizes (committed; the sets they tune read them)
PUBLISHED = APP_DIR / "docs" / "results"  # --publish: tables, plots, each cell's compact records

# Table II: rows in the paper's order, columns as task overrides; the paper's accuracies.
SINGLE_LEVEL_ROWS = ["static", "oap", "fedrolex", "fiarse"]
BILEVEL_ROWS = ["fedmbo", "rabo", "rafbo"]
TABLE2_ROWS = ["dist-protonet", "dist-maml", "fedmbo", *SINGLE_LEVEL_ROWS, "rabo", "rafbo"]
FULL_ONLY = "-full-only"  # a row trained by the capacity-1 clients alone (2 of 10): is adaptivity worth it?
COLUMNS = {"5w1s": {"task.n_way": 5, "task.k_shot": 1}, "5w5s": {"task.n_way": 5, "task.k_shot": 5},
           "20w1s": {"task.n_way": 20, "task.k_shot": 1}, "20w5s": {"task.n_way": 20, "task.k_shot": 5}}
# The 20-way columns at CPU scale run these rows ("best-single-level": the sweep's best single-level row).
TWENTY_WAY_ROWS = ["dist-protonet", "fedmbo", "best-single-level", "rabo", "rafbo"]
PAPER_TABLE2 = {  # arXiv 2512.24667, Table II (ResNet12, 10 clients)
    "dist-protonet": (80.76, 89.33, 60.05, 78.01), "dist-maml": (81.46, 92.01, 61.36, 78.35),
    "fedmbo": (82.66, 93.69, 63.18, 81.64), "static": (72.34, 85.09, 42.99, 51.01), "oap": (73.58, 86.16, 45.45, 51.92),
    "fedrolex": (73.74, 86.95, 47.25, 55.29), "fiarse": (74.33, 87.78, 49.52, 55.87), "rabo": (76.05, 89.12, 54.97, 77.41),
    "rafbo": (75.09, 88.57, 51.37, 71.16)}
PAPER_COST = {"rabo": 0.267, "rafbo": 0.178}  # FLOPs relative to FedMBO (Fig. 4); bytes: 0.267 for both
LOSS_TUNING_ROWS = ["ce", "ce-full", "vs-fixed", "fedmbo", "rabo", "rafbo", "rabo-vs-objective"]

# The federated bilevel family side by side (issue 15): every algorithm on the two tasks with checkable
# answers and on Table II's 5-way 1-shot few-shot learning, one set (and one sweep) per task: ``family-<task>``
# and ``family-<task>-sweep``. A row is a file of the task's folder (``rabo-curvature``: RABO with the
# curvature-aware estimator) at full capacity; ``<row>-submodels`` is the same at the paper's capacities
# (round-robin over the clients).
FAMILY_TASKS = {"quadratic": APP_DIR / "scenarios" / "quadratic", "hyper-cleaning": APP_DIR / "scenarios" / "hyper_cleaning",
                "fewshot": APP_DIR / "scenarios" / "fewshot"}
FAMILY_ROWS = ["fedmbo", "rabo", "rafbo", "rabo-curvature", "fednest", "lfednest", "simfbo", "shrofbo", "aggitd",
               "memfbo", "sldbo", "s3ldbo"]
SUBMODELS = "-submodels"
PAPER_CAPACITIES = [1.0, 0.5, 0.25, 0.125, 0.0625]
# Tasks whose rows also run at the paper's capacities. Not hyper-cleaning at CPU scale: x is owned (each
# client is sent its own example weights whatever its capacity) and the linear classifier has no channel
# group, so a capacity changes nothing there (the same run, byte for byte); its Conv4 classifier, which
# submodels would slice, costs a hypergradient over every training image per client per iteration.
SUBMODEL_TASKS = ("quadratic", "fewshot")
TARGET_X_ERROR = 1e-3  # the quadratic table's "to 1e-3" columns
# What the harness chooses on where it is not the task's main metric: quadratic's main metric, x_error,
# needs x* (an oracle); a user computes F(x) (the clients' upper losses at y*(x)) without it, and
# F(x) - F(x*) (``suboptimality``) ranks runs as F(x) does, F(x*) being one constant. Lower is better.
VALIDATION = {"quadratic": ("suboptimality", False)}

# What each scale changes, per set (:func:`scale_key`: the scenario's task for the paper's sets, ``family-<task>``
# for the family's, so the family's few-shot column has its own size beside Table II's on the same task).
# "paper" runs the scenario files unchanged.
SCALES: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": {
        "fewshot": {"model.backbone": "conv4", "model.width": 64, "algorithm.iterations": 800,
                    "run.eval_every": 40, "run.patience": 3, "run.min_delta": 0.005, "run.checkpoint_every": 20},
        "loss-tuning": {"model.backbone": "conv4", "model.width": 32, "algorithm.iterations": 400,
                        "run.eval_every": 20, "run.patience": 5, "run.min_delta": 0.005, "run.checkpoint_every": 10},
        # the family (issue 15): quadratic and hyper-cleaning without early stopping, so every row runs the same
        # budget; quadratic evaluates at every iteration (closed forms, no data) so the "to 1e-3" columns are exact
        "family-quadratic": {"algorithm.iterations": 150, "run.eval_every": 1, "run.patience": 0},
        "family-hyper-cleaning": {"algorithm.iterations": 100, "run.eval_every": 10, "run.patience": 0},
        # few-shot: Table II's task at a size that fits 21 rows x 16 sweep points in about 4 hours on 2 cores
        # (measured per-iteration times in the README): Conv4 of width 32, 5 clients (one per capacity of the
        # paper's profile), T = 5; Table II's early stopping rule (3 evaluations without a 0.5-point gain)
        "family-fewshot": {"model.backbone": "conv4", "model.width": 32, "clients.num": 5, "algorithm.inner_steps": 5,
                           "algorithm.iterations": 200, "task.val_episodes": 100, "task.eval_episodes": 600,
                           "run.eval_every": 20, "run.patience": 3, "run.min_delta": 0.005, "run.checkpoint_every": 20},
    },
    "paper": {"fewshot": {}, "loss-tuning": {}, "family-quadratic": {}, "family-hyper-cleaning": {}, "family-fewshot": {}},
}

# Step-size sweeps: one grid for every step size of every row, one budget, judged on validation
# only (run.final_test off: a sweep never reads the test split). Each row lists the keys it tunes;
# a row with two step sizes is swept over the grid's product.
GRID = (0.03, 0.1, 0.3, 1.0)
TUNED_KEYS = {
    **{row: [("algorithm.alpha",), ("algorithm.beta",)] for row in BILEVEL_ROWS},  # upper and lower level
    **{row: [("algorithm.alpha", "algorithm.beta")] for row in SINGLE_LEVEL_ROWS},  # one local rate, both sides
    "dist-protonet": [("algorithm.alpha",)],
    "dist-maml": [("algorithm.alpha", "algorithm.beta"), ("algorithm.adapt_lr",)],  # meta step, adaptation rate
}
SWEEP_BUDGET = {
    "fewshot": {"algorithm.iterations": 100, "run.eval_every": 25, "run.patience": 0, "run.final_test": False},
    "loss-tuning": {"algorithm.iterations": 100, "run.eval_every": 20, "run.patience": 0, "run.final_test": False},
    # quadratic: short enough that F stays far above its rounding (RABO at alpha 0.3, beta 0.3: F - F* 3e-7 at
    # iteration 40, measured), so the lowest F within the budget ranks the grid points by speed
    "family-quadratic": {"algorithm.iterations": 40, "run.eval_every": 1, "run.patience": 0, "run.final_test": False},
    "family-hyper-cleaning": {"algorithm.iterations": 30, "run.eval_every": 10, "run.patience": 0, "run.final_test": False},
    "family-fewshot": {"algorithm.iterations": 40, "run.eval_every": 10, "run.patience": 0, "run.final_test": False},
}
# The sweep of loss tuning tunes the lower-level step (y's training, the same in every row) on
# plain cross-entropy, the row whose budget matters most; every loss-tuning row reads it.
LOSS_TUNING_SWEEP = {"ce": [("algorithm.beta",)]}
# The family's sweeps tune alpha and beta of every row (v_step, where a method has one, follows beta: its
# default 0; FedNest's Neumann step stays its file's, a property of the series (inside 2/L), not a rate).
FAMILY_TUNED = [("algorithm.alpha",), ("algorithm.beta",)]
# A task's grid factor per key: on hyper-cleaning, alpha steps per-example weights whose hypergradient is of
# order 1/n_i (n_i about 800 training examples per client), so alpha's grid is GRID times 1000 (30 to 1000,
# around the files' 100): the same grid in units of a step per example.
GRID_SCALE = {"hyper-cleaning": {"algorithm.alpha": 1000.0}}


def grid_points(keys: list[tuple[str, ...]], scale: dict[str, float] | None = None) -> list[dict[str, float]]:
    """Every combination of grid values, one per group of keys (a group shares its value); ``scale``:
    a factor per key (:data:`GRID_SCALE`)."""
    points: list[dict[str, float]] = [{}]
    for group in keys:
        points = [point | {key: value * (scale or {}).get(key, 1.0) for key in group} for point in points for value in GRID]
    return points


def family_task(name: str) -> str | None:
    """The task of a family set (``family-<task>`` or ``family-<task>-sweep``); None for other sets."""
    task = name.removeprefix("family-").removesuffix("-sweep")
    return task if name.startswith("family-") and task in FAMILY_TASKS else None


def scale_key(name: str, task: str) -> str:
    """A set's entry in :data:`SCALES` and :data:`SWEEP_BUDGET` (``name``: the set, a sweep's included; ``task``:
    its scenarios' task): ``family-<task>`` for the family's sets, whose few-shot column is Table II's task at its
    own size, and the task for every other set."""
    return f"family-{family_task(name)}" if family_task(name) else task


def family_rows(task: str) -> list[str]:
    """A family set's rows: every algorithm at full capacity, then at the paper's
    capacities where the task has submodels and the algorithm takes them (not FedMBO, SLDBO, S3LDBO: they
    train the full model)."""
    from .algorithms import ALGORITHMS

    partial = [] if task not in SUBMODEL_TASKS else [
        row + SUBMODELS for row in FAMILY_ROWS if not ALGORITHMS[load_scenario(FAMILY_TASKS[task] / f"{row}.yaml").algorithm.name].full_model]
    return [*FAMILY_ROWS, *partial]


def _family_row_file(task: str, row: str) -> tuple[Path, dict[str, Any]]:
    """A family row's scenario file and the capacities that make it (full, or the paper's)."""
    capacities = PAPER_CAPACITIES if row.endswith(SUBMODELS) else [1.0]
    return FAMILY_TASKS[task] / f"{row.removesuffix(SUBMODELS)}.yaml", {"clients.capacities": capacities}


def step_sizes_path(sweep: str, scale: str) -> Path:
    """Where a sweep's ``--publish`` writes the chosen step sizes (committed: the sets read them)."""
    return STEP_SIZES / f"{sweep}-{scale}.yaml"


def read_step_sizes(sweep: str, scale: str) -> dict[str, Any] | None:
    path = step_sizes_path(sweep, scale)
    return yaml.safe_load(path.read_text()) if path.is_file() else None


@dataclass
class Cell:
    """One run: a scenario file, the overrides that make it this cell, and where its results go."""

    label: str
    path: Path
    overrides: dict[str, Any]
    row: str = ""  # the row it belongs to (a sweep has several cells per row)
    command: str = ""  # the command that runs exactly this cell
    point: dict[str, float] = field(default_factory=dict)  # a sweep's step sizes for this cell
    published: Path | None = None  # its folder under docs/results/<scale>/<set>/runs/ (None: --fresh)
    set: str = ""  # the set it belongs to (a family set's rows get the family's columns)

    def scenario(self) -> Scenario:
        return load_scenario(self.path, self.overrides)


def _row_file(directory: str, row: str) -> tuple[Path, dict[str, Any]]:
    """A row's scenario file and the overrides that make it: ``<row>-full-only`` is ``<row>`` with the
    paper's capacity profile and only the capacity-1 clients training."""
    if not row.endswith(FULL_ONLY):
        return PAPER / directory / f"{row}.yaml", {}
    profile = load_scenario(PAPER / "fewshot.yaml").clients.capacities
    return PAPER / directory / f"{row.removesuffix(FULL_ONLY)}.yaml", {"clients.capacities": profile,
                                                                       "clients.min_capacity": 1.0}


def _tuned(sweep: str, scale: str, row: str) -> dict[str, Any]:
    """The step sizes a sweep chose for a row; a clear error when the sweep has not been published."""
    chosen = read_step_sizes(sweep, scale)
    if chosen is None or row not in chosen["rows"]:
        column = " --column 5w1s" if sweep == "lr-sweep" else ""
        raise SystemExit(f"{step_sizes_path(sweep, scale)}: no step sizes for row {row!r}; run "
                         f"`python -m rabo_flwr.experiments {sweep}{column} --scale {scale} --publish` first (README, Experiments)")
    return chosen["rows"][row]


def set_rows(name: str, column: str, scale: str) -> list[str]:
    """Every row of a set (Table II's full-only and 20-way rows depend on the sweep's best single-level row)."""
    if name == "lr-sweep":
        return [*TABLE2_ROWS, "fedmbo" + FULL_ONLY, *(row + FULL_ONLY for row in SINGLE_LEVEL_ROWS)]
    if name == "table2":
        chosen = read_step_sizes("lr-sweep", scale)
        best = chosen["best_single_level"] if chosen else None
        if column.startswith("20w") and scale == "cpu":
            return [best if row == "best-single-level" else row for row in TWENTY_WAY_ROWS if best or row != "best-single-level"]
        return [*TABLE2_ROWS, "fedmbo" + FULL_ONLY, *([best + FULL_ONLY] if best else [])]
    if name == "cx-star":
        return [f"{a}-c{c}" for a in ("rabo", "rafbo") for c in (1, 2)]
    if name in ("loss-tuning", "loss-tuning-sweep"):
        return LOSS_TUNING_ROWS if name == "loss-tuning" else list(LOSS_TUNING_SWEEP)
    if name == "scalability":
        return ["rabo", "rafbo"]
    if family_task(name):
        return family_rows(family_task(name))
    raise ValueError(f"unknown set {name!r}")


def set_name(name: str, column: str) -> str:
    """A set's name in file names: the column-specific sets carry their column."""
    return f"{name}-{column}" if name in ("table2", "lr-sweep", "scalability") else name


def cells_for(name: str, column: str, rows: list[str] | None, scale: str, out: Path,
              extra_overrides: dict[str, Any] | None = None, fresh: bool = False) -> list[Cell]:
    """The cells of a set (``rows``: row names or cell labels; None: every row), every scenario
    validated before anything runs; ``fresh``: published runs do not count as finished."""
    specs = []  # (row, label, path, overrides, sweep point)
    for row in set_rows(name, column, scale):
        if name in ("table2", "scalability"):
            path, extra = _row_file("table2", row)
            extra = COLUMNS[column] | extra | (_tuned("lr-sweep", scale, row) if scale == "cpu" else {})
            if name == "table2":
                specs.append((row, row, path, extra, {}))
            for n in (10, 20, 30, 50) if name == "scalability" else ():
                # 25 training alphabets (5 validate), so more clients than that shard by character
                specs.append((row, f"{row}-{n}", path, extra | {"clients.num": n,
                                                                 "task.shard_by": "character" if n > 25 else "alphabet"}, {}))
        elif name == "cx-star":
            algorithm, coverage = row.rsplit("-c", 1)
            specs.append((row, row, PAPER / "cx_star" / f"{algorithm}_c{coverage}.yaml", {}, {}))
        elif name == "loss-tuning":
            extra = _tuned("loss-tuning-sweep", scale, "ce") if scale == "cpu" else {}
            specs.append((row, row, PAPER / "losstuning" / f"{row}.yaml", extra, {}))
        elif family_task(name) and not name.endswith("sweep"):
            path, extra = _family_row_file(family_task(name), row)
            specs.append((row, row, path, extra | (_tuned(name + "-sweep", scale, row) if scale == "cpu" else {}), {}))
        elif family_task(name):
            path, extra = _family_row_file(family_task(name), row)
            for point in grid_points(FAMILY_TUNED, GRID_SCALE.get(family_task(name))):
                label = f"{row}-" + "-".join(f"{k.split('.')[1]}{v:g}" for k, v in point.items())
                specs.append((row, label, path, extra | point, point))
        else:  # a sweep
            path, extra = _row_file("table2" if name == "lr-sweep" else "losstuning", row)
            keys = (TUNED_KEYS[row.removesuffix(FULL_ONLY)] if name == "lr-sweep" else LOSS_TUNING_SWEEP[row])
            for point in grid_points(keys):
                label = f"{row}-" + "-".join(f"{group[0].split('.')[1]}{point[group[0]]}" for group in keys)
                columns = COLUMNS[column] if name == "lr-sweep" else {}
                specs.append((row, label, path, columns | extra | point, point))
    wanted = set(rows or [])
    cells = []
    for row, label, path, extra, point in specs:
        if wanted and row not in wanted and label not in wanted:
            continue
        key = scale_key(name, load_scenario(path).task.name)
        sweep = SWEEP_BUDGET[key] if name.endswith("sweep") else {}
        overrides = SCALES[scale][key] | sweep | extra | (extra_overrides or {})
        published = None if fresh else PUBLISHED / scale / set_name(name, column) / "runs" / label
        cells.append(Cell(label, path, overrides | {"run.results_dir": str(out / "runs" / label)}, row,
                          _command(name, column, scale, label, extra_overrides or {}), point, published, name))
    unknown = wanted - {c.row for c in cells} - {c.label for c in cells}
    if unknown:
        raise SystemExit(f"{name}: no rows or cells named {sorted(unknown)} (rows: {', '.join(set_rows(name, column, scale))})")
    for cell in cells:
        cell.scenario()  # a bad file or override stops the set here, before any cell runs
    return cells


def _command(name: str, column: str, scale: str, label: str, overrides: dict[str, Any]) -> str:
    """The command line that runs exactly one cell."""
    parts = ["python", "-m", "rabo_flwr.experiments", name]
    if name in ("table2", "lr-sweep", "scalability"):
        parts += ["--column", column]
    parts += ["--scale", scale, "--rows", label]
    if overrides:
        parts += ["--override", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
    return shlex.join(parts)


# ---------------------------------------------------------------------------- running cells


# How and where a run was started, not what it computes. Under the plain engine the phase timeout changes a
# number only when injected faults hold a client back (its lateness rule: loop.call_client), and no cell has
# faults; cells published before that rule waited a day for every reply (run.phase_timeout 86400).
IGNORED_KEYS = ("run.resume", "run.results_dir", "run.phase_timeout")
# Under Flower a client is late by the real clock, so a loaded or paused machine would drop clients and change a
# cell's numbers: a cell run with --engine flower waits a day for every reply.
WAIT_FOR_EVERY_CLIENT = {"run.phase_timeout": 86400.0}


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested mapping (a resolved scenario)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def scenario_diff(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two resolved scenarios: key -> (old, new). A key the
    old run did not have yet, at its default now, is no difference: a key is added with a default that
    keeps every existing run's numbers."""
    a, b, default = flatten(old), flatten(new), flatten(Scenario().to_dict())
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in IGNORED_KEYS and a.get(k) != b.get(k) and not (k not in a and k in default and b[k] == default[k])}


class CellConflict(RuntimeError):
    """A cell's results directory holds a run of another scenario (never overwritten)."""


def _same_scenario(directory: Path, scenario: Scenario, remedy: str) -> None:
    """Raise CellConflict when ``directory`` holds a run of another resolved scenario."""
    differs = scenario_diff(yaml.safe_load((directory / "scenario.yaml").read_text()), scenario.to_dict())
    if differs:
        listed = "; ".join(f"{k}: {old!r} there, {new!r} now" for k, (old, new) in differs.items())
        raise CellConflict(f"{directory} holds a run of another scenario ({listed}); it is never overwritten: {remedy}")


def _published_finished(published: Path | None) -> bool:
    path = published / "summary.json" if published else None
    return bool(path and path.is_file() and json.loads(path.read_text())["status"] != "cut short")


# What a carried cell is, in copy order: its checkpoint last, since the checkpoint makes the folder count
CARRIED_FILES = ("scenario.yaml", "cell.json", CHECKPOINT)


def carried_path(published: Path | None) -> Path | None:
    """Where ``--carry`` leaves an unfinished cell's last checkpoint, beside the published runs
    (``docs/results/<scale>/<set>/checkpoints/<cell>/``), so that a set continues on another machine
    (this project's sessions each get a new one) from where the last one stopped."""
    return published.parent.parent / "checkpoints" / published.name if published else None


def cell_status(scenario: Scenario, published: Path | None = None) -> str:
    """``new``, ``finished``, ``resumable`` (a checkpoint of this scenario), ``restart`` (an unfinished
    run of this scenario without a checkpoint), ``published`` (no run here, a finished one of this
    scenario in ``published``) or ``carried`` (no run here, a carried checkpoint of this scenario:
    :func:`carried_path`); raises CellConflict for a run of another scenario, here, published or carried."""
    directory = scenario.results_path
    if not (directory / "scenario.yaml").is_file():
        if _published_finished(published):
            _same_scenario(published, scenario, "remove that folder to run the cell again")
            return "published"
        carried = carried_path(published)
        if carried and (carried / CHECKPOINT).is_file():
            _same_scenario(carried, scenario, "remove that folder to start the cell again")
            return "carried"
        return "new"
    _same_scenario(directory, scenario, "move it away, or give this run another --out")
    try:  # a malformed line stops the set (read_metrics names it): restarting would overwrite the run
        records = read_metrics(directory / "metrics.jsonl")
    except FileNotFoundError:
        records = []
    if records and records[-1]["phase"] == "done":
        return "finished"
    return "resumable" if (directory / CHECKPOINT).is_file() else "restart"


def code_version() -> str | None:
    """The commit of the code that runs (``+changes`` when its code or scenarios differ from it), so a
    published number names the version that regenerates it; None outside a git checkout."""
    git = ["git", "-C", str(APP_DIR)]
    try:
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run([*git, "diff", "--quiet", "HEAD", "--", "rabo_flwr", "strategies", "scenarios"]).returncode
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+changes" if changed else "")


def _record_invocation(cell: Cell, action: str, argv: list[str]) -> None:
    path = cell.scenario().results_path / "cell.json"
    info = json.loads(path.read_text()) if path.is_file() and action != "started" else {}
    info = {"label": cell.label, "command": cell.command, "invocations": info.get("invocations", [])}
    info["invocations"].append({"argv": shlex.join(["python", "-m", "rabo_flwr.experiments", *argv]),
                                "action": action, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "code": code_version()})
    atomic_write(path, lambda f: f.write(to_json(info, indent=1)), "w")


@contextmanager
def cell_lock(directory: Path) -> Iterator[bool]:
    """Hold a cell's lock while it runs or is published; yields False where another process holds it.
    Two invocations naming the same cell (a set and a ``--rows`` rerun of it, say) would otherwise both
    resume it and write its records twice (it happened, 2026-12-03). The lock goes with its process,
    so a killed run leaves none behind."""
    directory.parent.mkdir(parents=True, exist_ok=True)  # beside the cell: a published cell makes no folder here
    with open(directory.parent / f".{directory.name}.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


@contextmanager
def set_lock(path: Path) -> Iterator[None]:
    """Wait for, then hold, the lock of a set's tables at ``path``: two invocations of one set (``--rows`` of it
    in two processes, say) summarise, write and publish its tables one after the other, never into each other's
    half-written files. The lock goes with its process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


FINISHED = ("finished", "published")


def _already_finished(cell: Cell, status: str) -> str:
    where = cell.published if status == "published" else cell.scenario().results_path
    return f"{cell.label}: already finished in {where}"


def run_cell(cell: Cell, engine: str, threads: int, argv: list[str]) -> str:
    """Run one cell (in a worker process; ``argv``: the harness's arguments, for cell.json); its log
    goes to ``run.log`` in its results directory. A cell whose process is stopped resumes from its
    last checkpoint the next time its set runs; a cell running in another process is left to it."""
    with cell_lock(cell.scenario().results_path) as ours:
        if not ours:
            return f"{cell.label}: running in another process, left to it"
        try:
            return _run_cell(cell, engine, threads, argv)
        except Exception as error:  # noqa: BLE001 - whatever it is, it reaches the set as text
            first = (str(error).strip().splitlines() or [""])[0]
            raise CellFailed(f"{type(error).__name__}: {first}", traceback.format_exc()) from error


class CellFailed(RuntimeError):
    """A cell's run raised: ``args`` are a one-line summary and the traceback. Any exception crosses
    from the cell's worker process to the set this way: one the set's process could not rebuild (a
    class whose constructor takes other arguments than its message) would break the whole pool and
    fail every other cell."""


def _run_cell(cell: Cell, engine: str, threads: int, argv: list[str]) -> str:
    import torch

    torch.set_num_threads(threads)
    status = cell_status(cell.scenario(), cell.published)
    if status in FINISHED:
        return _already_finished(cell, status)
    action = {"resumable": "resumed from its checkpoint", "carried": "resumed from its carried checkpoint"}.get(status)
    if status == "carried":  # the run as it was where it stopped: its checkpoint (records included) and files
        cell.scenario().results_path.mkdir(parents=True, exist_ok=True)
        for file in CARRIED_FILES:
            shutil.copy2(carried_path(cell.published) / file, cell.scenario().results_path / file)
        status = "resumable"
    if status == "resumable":
        cell = replace(cell, overrides=cell.overrides | {"run.resume": True})
    scenario = cell.scenario()
    scenario.results_path.mkdir(parents=True, exist_ok=True)
    _record_invocation(cell, action or "started", argv)
    logger = logging.getLogger(f"rabo_flwr.experiments.{cell.label}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(scenario.results_path / "run.log", mode="a" if status == "resumable" else "w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger.addHandler(handler)
    if engine == "plain":
        from .loop import run_plain

        run_plain(scenario, logger)
        return f"{cell.label}: done" + (" (resumed)" if status == "resumable" else "")
    from .flower_run import FlowerHome, RunFailed

    with FlowerHome(scenario.results_path / "_flower", {"OMP_NUM_THREADS": str(threads)}) as home:
        outcome = home.run(APP_DIR, run_config={"scenario": str(cell.path), **cell.overrides, **WAIT_FOR_EVERY_CLIENT},
                           federation_config={"num-supernodes": scenario.clients.num, "client-resources-num-cpus": 1},
                           timeout=None)  # a cell runs for hours (FlowerHome.run's default stops it at 30 minutes)
    with open(scenario.results_path / "run.log", "a") as log:
        log.write(outcome.log)
    if outcome.status != "finished:completed":
        raise RunFailed(f"{cell.label}: run ended {outcome.status}\n{outcome.log[-4000:]}")
    return f"{cell.label}: done"


def run_cells(cells: list[Cell], engine: str, jobs: int, threads: int, argv: list[str],
              finished: Callable[[Cell], None] = lambda cell: None) -> list[str]:
    """Run the cells, ``jobs`` at a time; ``finished(cell)`` as each one ends (in order). A cell that
    raises is reported (its traceback on stderr) and the others run on and are published: a set runs
    for hours, and one failure (a corrupt checkpoint, a bug) should cost that cell only (a worker
    killed outright breaks the pool, and every cell not yet finished fails with it). Returns the
    labels of the cells that failed."""
    statuses = [cell_status(cell.scenario(), cell.published) for cell in cells]  # every conflict before any cell runs
    for cell, status in zip(cells, statuses):
        if status in FINISHED:  # reported here: a process per finished cell cost seconds each, minutes a set
            print(_already_finished(cell, status), flush=True)
            finished(cell)
    todo = [cell for cell, status in zip(cells, statuses) if status not in FINISHED]
    failed = []
    # a fresh process per cell: a worker that ran cell after cell kept every cell's task (its data)
    # in the per-process task cache, 8 GB after 37 hyper-cleaning cells
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        runs = [pool.submit(run_cell, cell, engine, threads, argv) for cell in todo]
        for cell, run in zip(todo, runs):
            try:
                message = run.result()
            except Exception as error:  # noqa: BLE001 - any failure of one cell; the others go on
                summary, detail = (error.args if isinstance(error, CellFailed) else
                                   (f"{type(error).__name__}: {error}", "".join(traceback.format_exception(error))))
                print(detail, file=sys.stderr, flush=True)
                print(f"{cell.label}: failed ({summary}); rerun the set's command to retry it", flush=True)
                failed.append(cell.label)
                continue
            print(message, flush=True)
            finished(cell)
    return failed


# ---------------------------------------------------------------------------- summaries


def _examples(phases: list[dict[str, Any]]) -> int:
    """Distinct examples the clients trained on: each iteration's first phase (later phases reuse its data)."""
    first = {}
    for r in phases:
        first.setdefault(r["iteration"], r)
    return sum(c.get("examples", 0) for r in first.values() for c in r.get("clients", []))


def summarize(cell: Cell, scale: str) -> dict[str, Any] | None:
    """One row of a set's table from a cell's metrics.jsonl and the scenario the run saved beside it.

    The reported number is the test metric of the model kept on validation (the run's ``test``
    record); curves are validation. A run without its ``done`` record (the process was stopped)
    is summarised up to its last evaluation and marked ``cut short``, with no test number; None
    when there is no evaluation after iteration 0. A cell with no run here reads its published summary,
    else is None (no run yet); a run this code cannot read (its resolved scenario, a malformed record)
    is an error naming the file and the key or line, never a cell left out of a table without a word.
    It may be read while another process writes it (:func:`~rabo_flwr.results.read_metrics`)."""
    directory = cell.scenario().results_path
    if not (directory / "metrics.jsonl").is_file() and _published_finished(cell.published):
        return read_summary(cell.published / "summary.json")
    if not (directory / "metrics.jsonl").is_file():
        return None
    if not (directory / "scenario.yaml").is_file():  # written before the first record: the run was tampered with
        raise FileNotFoundError(f"{directory / 'scenario.yaml'}: missing beside the run's metrics.jsonl")
    scenario = load_scenario(directory / "scenario.yaml")
    saved = yaml.safe_load((directory / "scenario.yaml").read_text())
    records = read_metrics(directory / "metrics.jsonl")
    evals = [r for r in records if r["phase"] == "eval"]
    if len(evals) < 2:
        return None
    done = records[-1] if records[-1]["phase"] == "done" else None
    test = next((r for r in records if r["phase"] == "test"), None)
    last = done["iteration"] if done else evals[-1]["iteration"]
    phases = [r for r in records if r["phase"] not in ("eval", "test", "done") and r["iteration"] <= last]
    status = ("stopped early" if done["stopped_early"] else "budget") if done else "cut short"
    val_key, higher, key = validation_metric(scenario)
    kept = max(evals, key=lambda r: validation_score(r[val_key], higher))  # the first best, as the loop keeps it
    if scenario.task.name in VALIDATION:  # the loop kept its model by another metric: report the kept evaluation's
        test = kept if done else None  # (the metric reads no data: "val" and "test" are one computation)
    to_kept = [r for r in phases if r["iteration"] <= kept["iteration"]]
    file_scenario = load_scenario(cell.path).to_dict()
    row = {
        "cell": cell.label, "row": cell.row, "scale": scale, "task": scenario.task.name,
        "algorithm": scenario.algorithm.name, "estimator": scenario.algorithm.resolved_estimator,
        "backbone": scenario.model.backbone, "clients": scenario.clients.num,
        "min_capacity": scenario.clients.min_capacity, "iterations_run": last, "status": status,
        "metric": key, "test": test[key] if test else math.nan, "test_se": test.get(f"{key}_se", math.nan) if test else math.nan,
        "validation_metric": val_key, "kept_iteration": kept["iteration"], "kept_validation": kept[val_key],
        "start_validation": evals[0][val_key], "final_validation": evals[-1][val_key],
        "C_x*": phases[-1].get("C_x*", 0),  # the run's, over all elements (0 if one was never trained)
        "trained_x": phases[-1]["trained_x"], "trained_y": phases[-1]["trained_y"],
        "flops": sum(r["flops"] for r in phases), "wasted_flops": sum(r["wasted_flops"] for r in phases),
        "flops_to_kept": sum(r["flops"] for r in to_kept), "bytes_to_kept": sum(traffic(r) for r in to_kept),
        "examples_to_kept": _examples(to_kept),
        "examples": _examples(phases), "uncounted_replies": sum(r.get("uncounted_replies", 0) for r in phases),
        "x_elements_by_capacity": x_elements_by_capacity(phases),
        "bytes": sum(traffic(r) for r in phases),
        "wasted_bytes": sum(r["wasted_bytes"] for r in phases),
        "rejected": sum(r["rejected"] for r in phases), "failures": sum(r["failures"] for r in phases),
        "negative_curvature_replies": sum(r["negative_curvature_clients"] for r in phases),
        "flops_per_iteration": sum(r["flops"] for r in phases) / max(1, last),
        "wall_time": sum(r["wall_time"] for r in phases) + sum(r.get("eval_time", 0.0) for r in evals),
        # what the run used, read from its own resolved scenario (not from the calling command)
        "overrides": {k: used for k, (used, _) in scenario_diff(saved, file_scenario).items()},
        "curve": [(r["iteration"], number(r[val_key]), number(r.get(f"{val_key}_se", 0.0))) for r in evals],
        "command": _cell_info(directory).get("command", cell.command),
        "invocations": _cell_info(directory).get("invocations", []),
        "scenario": saved,
    }
    if scenario.task.name == "loss-tuning" and test:
        row |= {k: test[k] for k in ("head_accuracy", "tail_accuracy", "per_class_accuracy", "w", "l", "Delta")}
    if family_task(cell.set):
        row |= family_columns(scenario, evals, phases, test, last) | {"higher_is_better": higher}
    return missing_as_nan(row)


# The summary's columns whose "no value" is None in memory (quadratic's target not reached); every other
# missing number of a summary is NaN in memory, as the tables render it ("nan" in the CSV, an empty Markdown cell).
TARGET_COLUMNS = ("iterations_to_target", "rounds_to_target", "bytes_to_target", "flops_to_target")


def number(value: float | None) -> float:
    """A number read from a record: NaN for null, what strict JSON writes for a non-finite one (a diverged value)."""
    return math.nan if value is None else value


def missing_as_nan(row: dict[str, Any]) -> dict[str, Any]:
    """A summary with each missing number NaN but in :data:`TARGET_COLUMNS`, the curve's points included: the JSON
    files write it as null (strict JSON, :func:`~rabo_flwr.results.to_json`; a run's records too, so a diverged
    validation value is null), and a summary read from its run or from its published file is then the same row,
    table for table."""
    row = {k: math.nan if v is None and k not in TARGET_COLUMNS else v for k, v in row.items()}
    if "curve" in row:
        row["curve"] = [type(point)(number(v) for v in point) for point in row["curve"]]
    return row


def read_summary(path: Path) -> dict[str, Any]:
    """A published summary as :func:`summarize` makes it (:func:`missing_as_nan`): every table and plot of it is
    the same, byte for byte, as the one of the run it was made from."""
    return missing_as_nan(json.loads(Path(path).read_text()))


def validation_metric(scenario: Scenario) -> tuple[str, bool, str]:
    """(the metric every choice reads, whether higher is better, the reported metric) of a scenario's task:
    its ``main_metric``, ``higher_is_better`` and ``test_metric``, unless :data:`VALIDATION` names another."""
    from .tasks import build_task

    task = build_task(scenario)  # cheap: the tasks load their data when first asked for it
    val_key, higher = VALIDATION.get(scenario.task.name, (task.main_metric, task.higher_is_better))
    return val_key, higher, task.test_metric


def family_columns(scenario: Scenario, evals: list[dict[str, Any]], phases: list[dict[str, Any]],
                   test: dict[str, Any] | None, last: int) -> dict[str, Any]:
    """The family table's columns from a run's records. Every task: message rounds (one phase is one round
    of messages) and bytes per iteration. quadratic: the first evaluation with x_error <= TARGET_X_ERROR
    (its iteration, the rounds and bytes spent up to it; None when no evaluation reached it) and x_error at
    the end. hyper-cleaning: precision and recall of the down-weighted examples of the model kept. fewshot: nothing
    more (its test accuracy and the FLOPs and bytes to the kept model are every summary's, as Table II's)."""
    iterations = max(1, last)
    row = {"capacities": scenario.clients.capacities, "alpha": scenario.algorithm.alpha, "beta": scenario.algorithm.beta,
           "rounds_per_iteration": len(phases) / iterations,
           "bytes_per_iteration": sum(traffic(r) for r in phases) / iterations}
    if scenario.task.name == "quadratic":
        errors = [number(r["x_error"]) for r in evals]  # NaN where it diverged (null in the records)
        reached = next((r["iteration"] for r, e in zip(evals, errors) if e <= TARGET_X_ERROR), None)
        spent = [r for r in phases if reached is not None and r["iteration"] <= reached]
        to_target = (reached, len(spent), sum(traffic(r) for r in spent), sum(r["flops"] for r in spent))
        row |= {"target_x_error": TARGET_X_ERROR, **dict(zip(TARGET_COLUMNS, to_target if reached is not None else
                                                             (None,) * len(TARGET_COLUMNS))),
                "final_x_error": errors[-1],
                "best_x_error": min((e for e in errors if not math.isnan(e)), default=math.nan)}
    if scenario.task.name == "hyper-cleaning":
        row |= {k: test[k] if test else math.nan for k in ("flip_precision", "flip_recall", "downweighted")}
    return row


def traffic(record: dict[str, Any]) -> int:
    """A phase's bytes on the network the method is for: sent and received through the server, or, for a
    decentralised method (``bytes_p2p``), what its peer-to-peer network sends over every edge (Flower relays
    it through the SuperLink instead; ``bytes_down`` and ``bytes_up`` keep that)."""
    return record["bytes_p2p"] if "bytes_p2p" in record else record["bytes_down"] + record["bytes_up"]


def x_elements_by_capacity(phases: list[dict[str, Any]]) -> dict[float, float]:
    """Mean size of the x-submodel the clients of each capacity held (phases that sent x), for the tables."""
    sizes: dict[float, list[int]] = {}
    for record in phases:
        for client in record["clients"]:
            if client["x_elements"]:
                sizes.setdefault(client["capacity"], []).append(client["x_elements"])
    return {capacity: sum(v) / len(v) for capacity, v in sorted(sizes.items(), reverse=True)}


def _cell_info(directory: Path) -> dict[str, Any]:
    path = directory / "cell.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def compact_records(directory: Path) -> list[dict[str, Any]]:
    """A run's evaluation, test and done records, each with the cost spent up to its iteration
    (FLOPs, bytes, distinct examples, phase wall time); the per-phase and per-client records stay out."""
    records = read_metrics(directory / "metrics.jsonl")
    phases = [r for r in records if r["phase"] not in ("eval", "test", "done")]
    out = []
    for r in records:
        if r["phase"] in ("eval", "test", "done"):
            spent = [p for p in phases if p["iteration"] <= r["iteration"]]
            out.append(r | {"flops_so_far": sum(p["flops"] for p in spent), "examples_so_far": _examples(spent),
                            "bytes_so_far": sum(traffic(p) for p in spent),
                            "phase_wall_time_so_far": sum(p["wall_time"] for p in spent)})
    return out


def add_cost_ratios(rows: list[dict[str, Any]]) -> None:
    """FLOPs and bytes relative to FedMBO's on the same task: per iteration (the paper's Figs. 4 and 6)
    and in total to the end of the run (rows stop at different iterations)."""
    fedmbo = {r["task"]: r for r in rows if r["algorithm"] == "fedmbo" and not r.get("min_capacity")}
    for row in rows:
        ref = fedmbo.get(row["task"])
        per = lambda r, k: r[k] / max(1, r["iterations_run"])  # noqa: E731
        row["flops_vs_fedmbo"] = per(row, "flops") / per(ref, "flops") if ref and ref["flops"] > 0 else math.nan
        row["bytes_vs_fedmbo"] = per(row, "bytes") / per(ref, "bytes") if ref and ref["bytes"] else math.nan
        row["total_flops_vs_fedmbo"] = row["flops"] / ref["flops"] if ref and ref["flops"] > 0 else math.nan


def _pct(value: float, se: float | None = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return f"{100 * value:.2f}%" + (f" ± {100 * se:.2f}" if se and not math.isnan(se) else "")


def _ratio(value: float) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.3f}"


def _sci(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3g}"


def write_outputs(name: str, rows: list[dict[str, Any]], out: Path, title: str, paper_column: int | None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
    with open(out / f"{name}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)
    with open(out / f"{name}_curves.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["cell", "iteration", rows[0]["validation_metric"], "se"])
        for r in rows:
            writer.writerows([r["cell"], *point] for point in r["curve"])
    (out / f"{name}.json").write_text(to_json(rows, indent=1))
    _plot_curves(name, rows, out, title)
    if any(r["algorithm"] == "fedmbo" for r in rows):
        _plot_cost(name, rows, out, title)
    if rows[0]["task"] == "loss-tuning" and any("w" in r for r in rows):
        _plot_hyperparameters(name, [r for r in rows if "w" in r], out, title)
    if family_task(name):
        _write_family_markdown(name, rows, out, title)
    else:
        _write_markdown(name, rows, out, title, paper_column)


def _plot_curves(name, rows, out, title):
    """Validation accuracy against global iterations (the paper's Fig. 2) and against FLOPs spent
    (cost-matched); the reported test numbers are in the tables."""
    colors = plt.cm.tab20.colors if len(rows) > 10 else plt.cm.tab10.colors
    higher = rows[0].get("higher_is_better", True)
    unit = 100 if higher else 1
    for suffix, xlabel, scale_x in (("accuracy", "global iteration", lambda r, its: its),
                                    ("accuracy_vs_flops", "FLOPs spent (all clients, all work sent; log scale)",
                                     lambda r, its: [q * r["flops_per_iteration"] for q in its])):
        if suffix == "accuracy_vs_flops" and any(r["flops_per_iteration"] <= 0 for r in rows):
            continue  # FLOPs were not counted
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for i, r in enumerate(rows):
            # on the log-scaled FLOPs axis there is no iteration 0
            its, acc, se = zip(*[point for point in r["curve"] if suffix == "accuracy" or point[0] > 0])
            xs = scale_x(r, its)
            line, = ax.plot(xs, [unit * a for a in acc], label=r["cell"], lw=1.4, color=colors[i % len(colors)])
            ax.fill_between(xs, [unit * (a - s) for a, s in zip(acc, se)], [unit * (a + s) for a, s in zip(acc, se)],
                            color=line.get_color(), alpha=0.15)
        if suffix == "accuracy_vs_flops":
            ax.set_xscale("log")
        if not higher:  # an error or a suboptimality: orders of magnitude
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{rows[0]['validation_metric'].replace('val_', 'validation ').replace('_', ' ')}" + (" (%)" if higher else ""))
        ax.set_title(f"{title} ({rows[0]['scale']} scale)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        fig.savefig(out / f"{name}_{suffix}.png", dpi=120)
        plt.close(fig)


def _plot_cost(name, rows, out, title):
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["flops_vs_fedmbo"] for r in rows], width=0.4, label="FLOPs per iteration")
    ax.bar([x + 0.2 for x in xs], [r["bytes_vs_fedmbo"] for r in rows], width=0.4, label="bytes per iteration")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(xs), [r["cell"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("relative to FedMBO")
    ax.set_title(f"{title}: cost ({rows[0]['scale']} scale)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"{name}_cost.png", dpi=120)
    plt.close(fig)


def _plot_hyperparameters(name, rows, out, title):
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    for ax, key in zip(axes, ("w", "l", "Delta", "per_class_accuracy")):
        for r in rows:
            ax.plot(range(10), r[key], marker="o", ms=3, label=r["cell"])
        ax.set_title(key.replace("_", " ") + (" (final)" if key == "per_class_accuracy" else ""))
        ax.set_xlabel("class (0 = most frequent)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}: learned VS-loss hyperparameters and per-class test accuracy ({rows[0]['scale']} scale)")
    fig.tight_layout()
    fig.savefig(out / f"{name}_hyperparameters.png", dpi=120)
    plt.close(fig)


def _submodel_sizes(rows: list[dict[str, Any]]) -> list[str]:
    """The x-submodel each row's clients held, by capacity (elements, and their share of the row's full x where
    a capacity-1 client held it): what a client at capacity r trains, checkable against r^2 of the weights."""
    sizes = [{float(c): n for c, n in r["x_elements_by_capacity"].items()} for r in rows]
    capacities = sorted({c for held in sizes for c in held}, reverse=True)
    if not capacities:
        return []
    lines = ["", "x-submodel per client, by capacity (elements of x held; share of the full x):", "",
             "| row | " + " | ".join(f"capacity {Fraction(c).limit_denominator(1024)}" for c in capacities) + " |",
             "|" + " --- |" * (len(capacities) + 1)]
    for r, held in zip(rows, sizes):
        full = held.get(1.0)
        lines.append("| " + " | ".join([r["cell"]] + [
            "" if c not in held else f"{held[c]:,.0f}" + (f" ({held[c] / full:.1%})" if full else "") for c in capacities])
            + " |")
    return lines


def _write_markdown(name, rows, out, title, paper_column):
    metric = rows[0]["metric"].replace("_", " ")
    metric = metric if metric.startswith("test") else f"test {metric}"
    lines = [f"# {title} ({rows[0]['scale']} scale)", ""]
    header = ["row", f"{metric} ± SE", "kept at iteration (validation)", "iterations run (end)",
              "examples to kept", "FLOPs to kept", "FLOPs/it vs FedMBO", "bytes/it vs FedMBO", "C_x*", "wasted FLOPs", "rejected"]
    if paper_column is not None:
        header.insert(1, "paper")
    if rows[0]["task"] == "loss-tuning":
        header[3:3] = ["head classes", "tail classes"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        cells = [r["cell"], _pct(r["test"], r["test_se"]), f"{r['kept_iteration']} ({_pct(r['kept_validation'])})",
                 f"{r['iterations_run']} ({r['status']})", f"{r['examples_to_kept']:,}", f"{r['flops_to_kept']:.3g}",
                 _ratio(r.get("flops_vs_fedmbo", math.nan)), _ratio(r.get("bytes_vs_fedmbo", math.nan)), str(r["C_x*"]),
                 f"{r['wasted_flops']:.3g}", str(r["rejected"])]
        if paper_column is not None:
            paper = PAPER_TABLE2.get(r["algorithm"])
            cells.insert(1, f"{paper[paper_column]:.2f}%" if paper and r["cell"] == r["algorithm"] else "")
        if r["task"] == "loss-tuning":
            cells[3:3] = [_pct(r.get("head_accuracy", math.nan)), _pct(r.get("tail_accuracy", math.nan))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _submodel_sizes(rows)
    common = {k: v for k, v in rows[0]["overrides"].items() if all(r["overrides"].get(k, object()) == v for r in rows)}
    lines += ["", f"Scale: {rows[0]['scale']}. Overrides of the scenario files that every run used (read from the runs' "
                  f"own resolved scenarios): `{json.dumps(common)}`."]
    own = {r["cell"]: {k: v for k, v in r["overrides"].items() if k not in common} for r in rows}
    lines.append("Each row's own overrides: " + ("; ".join(f"{c} `{json.dumps(o)}`" for c, o in own.items() if o) or "none") + ".")
    lines.append(
        "Protocol: every choice reads validation (held-out data, never the test split): early stopping, the model "
        "kept (the best validation evaluation) and the step sizes (the sweep). The test number is read once per run, "
        "on the kept model; the plots show validation curves. An iteration is the same client data in every row "
        "(one episode per client in few-shot learning; the `-full-only` rows train only the capacity-1 clients), so "
        "rows are compared at the model each kept, with the FLOPs and the distinct examples (all clients) spent to "
        "reach it; the accuracy-against-FLOPs plot compares them at equal FLOPs. Cost ratios are per global "
        "iteration, over all work sent (rejected and failed replies included; `wasted FLOPs` is that part; no "
        "client is ever late: the plain engine drops a client as late only when injected faults hold it back); "
        "SE = standard error over the test episodes.")
    short = [r["cell"] for r in rows if r["status"] == "cut short"]
    if short:
        lines.append(f"Cut short (the process ended before the run did; no test number until it is resumed): "
                     f"{', '.join(short)}.")
    if paper_column is not None:
        lines.append("Paper = Table II of arXiv 2512.24667 (ResNet12, full scale); paper cost ratios: RABO 0.267, "
                     "RAFBO 0.178 of FedMBO's FLOPs, 0.267 of its bytes.")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def _write_family_markdown(name, rows, out, title):
    """The family side by side on one task (issue 15): each row at full capacity and, where it takes
    submodels, at the paper's capacities; step sizes from the family sweep (chosen on validation)."""
    task = rows[0]["task"]
    lines = [f"# {title} ({rows[0]['scale']} scale)", ""]
    if task == "quadratic":
        target = f"{TARGET_X_ERROR:g}"
        header = ["row", "capacities", "alpha, beta", "rounds / it", f"iterations to x_error {target}",
                  f"rounds to {target}", f"bytes to {target}", f"FLOPs to {target}", "bytes / it",
                  "x_error at the end (iteration)",
                  "x_error kept on F", "FLOPs/it vs FedMBO"]
    else:  # the test number of the model kept on validation, beside what it cost
        cleaning = task == "hyper-cleaning"
        header = ["row", *([] if cleaning else ["capacities"]), "alpha, beta",
                  f"{rows[0]['metric'].replace('_', ' ')} (kept at, validation)",
                  *(["flip precision", "flip recall", "down-weighted"] if cleaning else
                    ["iterations run (end)", "FLOPs to kept", "bytes to kept"]),
                  "FLOPs/it vs FedMBO", "bytes/it vs FedMBO", "rounds / it", "bytes / it"]
    lines += ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in rows:
        capacities = "1" if r["capacities"] == [1.0] else "1, 1/2, 1/4, 1/8, 1/16" if r["capacities"] == PAPER_CAPACITIES \
            else ", ".join(f"{c:g}" for c in r["capacities"])
        steps = f"{r['alpha']:g}, {r['beta']:g}"
        if task == "quadratic":
            missing = "not reached" if r["status"] != "cut short" else "(cut short)"
            reached = r["iterations_to_target"] is not None
            cells = [r["cell"], capacities, steps, f"{r['rounds_per_iteration']:g}",
                     str(r["iterations_to_target"]) if reached else missing,
                     str(r["rounds_to_target"]) if reached else missing,
                     f"{r['bytes_to_target']:,}" if reached else missing,
                     _sci(r["flops_to_target"]) if reached else missing, f"{r['bytes_per_iteration']:,.0f}",
                     f"{_sci(r['final_x_error'])} ({r['iterations_run']}, {r['status']})", _sci(r["test"]),
                     _ratio(r.get("flops_vs_fedmbo", math.nan))]
        else:
            cells = [r["cell"], *([] if cleaning else [capacities]), steps,
                     f"{_pct(r['test'], r['test_se'])} ({r['kept_iteration']}, {_pct(r['kept_validation'])})",
                     *([_ratio(r["flip_precision"]), _ratio(r["flip_recall"]), _ratio(r["downweighted"])] if cleaning else
                       [f"{r['iterations_run']} ({r['status']})", _sci(r["flops_to_kept"]), f"{r['bytes_to_kept']:,}"]),
                     _ratio(r.get("flops_vs_fedmbo", math.nan)), _ratio(r.get("bytes_vs_fedmbo", math.nan)),
                     f"{r['rounds_per_iteration']:g}", f"{r['bytes_per_iteration']:,.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    common = {k: v for k, v in rows[0]["overrides"].items() if all(r["overrides"].get(k, object()) == v for r in rows)}
    lines += ["", f"Scale: {rows[0]['scale']}. Overrides of the scenario files that every run used (read from the runs' "
                  f"own resolved scenarios): `{json.dumps(common)}`. Rows are `scenarios/{FAMILY_TASKS[task].name}/<row>.yaml` "
                  "at capacity 1" + ("; `<row>-submodels` is the same file at the paper's capacities (1, 1/2, 1/4, 1/8, "
                  "1/16, round-robin over the clients, the file's mask policy; v follows y's submodel)."
                  if task in SUBMODEL_TASKS else ".")]
    every = family_rows(task)
    full = [row for row in every if not row.endswith(SUBMODELS) and row + SUBMODELS not in every]
    if task in SUBMODEL_TASKS:
        lines.append(f"Capacity 1 only: {', '.join(full)} (FedMBO trains the full model; SLDBO and S3LDBO hold the full "
                     "model on every node of the gossip network).")
    else:
        lines.append("Capacity 1 only, every row: on this task x is owned (each client is sent its own example weights "
                     "whatever its capacity) and the linear classifier has no channel group, so the paper's capacities "
                     "would repeat these runs byte for byte; submodels need `task.classifier: backbone`, beyond the CPU scale. "
                     "SLDBO's and S3LDBO's nodes each hold their own block of x, which no other node holds (its mixing is "
                     "the identity), and the whole classifier, mixed with the files' W (a ring).")
    stopping = ("Rows stop early on validation (Table II's rule: `run.patience` evaluations without a `run.min_delta` "
                "gain), so they are compared at the model each kept, with the FLOPs and bytes spent to reach it"
                if any(r["scenario"]["run"]["patience"] for r in rows) else
                "Rows run the same number of iterations (no early stopping)")
    lines.append(
        "Protocol (Table II's): alpha and beta of every row from one grid and one budget, chosen on validation only "
        f"(`{name}-sweep`; v_step, where a method has it, follows beta; FedNest's Neumann step is its file's). {stopping}; "
        "cost columns are over all work sent, per iteration; a "
        "round is one round of messages between the server and the clients (one phase). Bytes are sent and received "
        "by all clients through the server, but SLDBO's and S3LDBO's: what their peer-to-peer network sends over its "
        "edges (`bytes_p2p`; under Flower the SuperLink relays it, and the records' `bytes_down`/`bytes_up` keep that).")
    if task == "quadratic":
        lines.append(
            f"`iterations to x_error {target}`: the first evaluation (every iteration) at or below it, from the "
            "run's records; the rounds, bytes and FLOPs (all clients) spent up to and including that "
            "iteration. x_error = ||x - x*|| / ||x*|| is the oracle and reported only: validation is F(x) - F(x*), "
            "which ranks runs as the upper objective F(x) does, and `x_error kept on F` is x_error at the "
            "evaluation of lowest F.")
    elif task == "hyper-cleaning":
        lines.append(
            "Test accuracy on the clean test set of the model kept on validation (the clients' clean validation "
            "splits, pooled); flip precision and recall: of the examples that model's x down-weights (x_j < 0), "
            "against the flipped ones, and the share down-weighted. FLOPs and bytes per iteration relative to FedMBO's.")
    else:
        lines.append(
            "Test accuracy (± SE over the test episodes) on fixed episodes of the evaluation alphabets, of the model kept "
            "on validation (fixed episodes of the 5 held-out background alphabets; its iteration and validation "
            "accuracy); `FLOPs to kept` and `bytes to kept`: all work sent up to and including that iteration (the "
            "comparison at equal FLOPs and at equal bytes). FLOPs and bytes per iteration relative to FedMBO's.")
    short = [r["cell"] for r in rows if r["status"] == "cut short"]
    if short:
        lines.append(f"Cut short (the process ended before the run did): {', '.join(short)}.")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def choose_step_sizes(rows: list[dict[str, Any]], cells: list[Cell], name: str, column: str,
                      scale: str) -> dict[str, Any]:
    """Each row's grid point with the best validation metric (the first in grid order on a tie),
    and the best single-level row; only once every cell of the sweep has finished."""
    by_label = {r["cell"]: r for r in rows}
    unfinished = [c.label for c in cells if c.label not in by_label or by_label[c.label]["status"] == "cut short"]
    if unfinished:
        raise SystemExit(f"{name}: {len(unfinished)} cells not finished ({', '.join(unfinished[:5])}...): "
                         "rerun the sweep's command to finish them before publishing its step sizes")
    chosen: dict[str, Any] = {"set": name, "scale": scale, "grid": list(GRID), "rows": {}, "validation": {}}
    if name == "lr-sweep":
        chosen["column"] = column
    for cell in cells:
        row = by_label[cell.label]
        value, higher = row["kept_validation"], row.get("higher_is_better", True)
        best = chosen["validation"].get(cell.row)
        if cell.row not in chosen["rows"] or validation_score(value, higher) > validation_score(best, higher):
            chosen["rows"][cell.row], chosen["validation"][cell.row] = cell.point, value
    if name == "lr-sweep":
        chosen["best_single_level"] = max(SINGLE_LEVEL_ROWS, key=lambda row: chosen["validation"][row])
    return chosen


def grid_edges(point: dict[str, float], task: str) -> list[str]:
    """The step sizes of a sweep ``point`` that sit at the grid's lowest or highest value (the grid
    times :data:`GRID_SCALE`'s factor): a best point there may have its optimum beyond the grid."""
    edges = []
    for key, value in point.items():
        factor = GRID_SCALE.get(task, {}).get(key, 1.0)
        for bound, side in ((GRID[0], "lower"), (GRID[-1], "upper")):
            if math.isclose(value, bound * factor):
                edges.append(f"{key.split('.')[1]} at the {side} edge")
    return edges


def write_sweep_markdown(name: str, rows: list[dict[str, Any]], cells: list[Cell], chosen: dict[str, Any] | None,
                         out: Path, title: str) -> None:
    """Every cell of the sweep: its step sizes, its best validation evaluation, and the value chosen per row."""
    by_label = {r["cell"]: r for r in rows}
    metric = rows[0]["validation_metric"].replace("val_", "validation ").replace("_", " ")
    value = lambda v: _pct(v) if rows[0].get("higher_is_better", True) else _sci(v)  # noqa: E731
    lines = [f"# {title} ({rows[0]['scale']} scale)", "", f"| row | step sizes | best {metric} (iteration) | "
             f"{metric} at the end | end | chosen |", "| --- | --- | --- | --- | --- | --- |"]
    for cell in cells:
        r = by_label.get(cell.label)
        picked = chosen and chosen["rows"].get(cell.row) == cell.point
        steps = ", ".join(f"{k.split('.')[1]} {v:g}" for k, v in cell.point.items())
        edges = ", ".join(grid_edges(cell.point, rows[0]["task"]))
        mark = ("**chosen**" + (f" ({edges})" if edges else "")) if picked else ""
        lines.append(f"| {cell.row} | {steps} | " + (f"{value(r['kept_validation'])} ({r['kept_iteration']}) | "
                     f"{value(r['final_validation'])} | {r['iterations_run']} ({r['status']})" if r else "| | not run") +
                     f" | {mark} |")
    task = rows[0]["task"]
    budget = SWEEP_BUDGET[scale_key(name, task)]
    scaled = "".join(f"; {k} takes the grid times {f:g}" for k, f in GRID_SCALE.get(task, {}).items())
    lines += ["", f"One grid for every step size ({', '.join(f'{v:g}' for v in GRID)}; a row with two step sizes "
                  f"takes every pair{scaled}) and one budget for every row (`{json.dumps(budget)}`); each point is "
                  "judged on validation only (the test split is never read in a sweep). A row's chosen point is the one "
                  "with the best validation evaluation (the first in grid order on a tie; a diverged run is the worst)."]
    if task in VALIDATION:
        lines.append(f"Validation on {task} is `{VALIDATION[task][0]}` = F(x) - F(x*), lower is better: the upper "
                     "objective, which a user computes without x*; the oracle x_error is reported, never chosen on.")
    if chosen:
        lines.append("Chosen: " + "; ".join(f"{row} {json.dumps(point)} ({value(chosen['validation'][row])})"
                                            for row, point in chosen["rows"].items()) + ".")
        at_edge = [f"{row} ({', '.join(grid_edges(point, task))})" for row, point in chosen["rows"].items()
                   if grid_edges(point, task)]
        if at_edge:
            lines.append(f"Chosen at the grid's edge, so the best step may lie beyond the grid (one grid for every row, "
                         f"not extended for some): {'; '.join(at_edge)}.")
        if "best_single_level" in chosen:
            lines.append(f"Best single-level row on validation: {chosen['best_single_level']} (its `-full-only` row "
                         "and the 20-way columns use it).")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def publish_cell(cell: Cell, scale: str) -> None:
    """Copy a cell's run (compact records, its summary row, resolved scenario, cell.json) to its
    published folder, which then counts as finished for the same scenario; a published run of
    another scenario is never overwritten. Nothing happens for a cell with no run here, or one that another
    process runs; the cell's lock is held from its summary to the last file copied, so no process resumes it
    (rewriting its records and cell.json) in between: the published files are of one run, at one moment."""
    directory = cell.scenario().results_path
    with cell_lock(directory) as ours:  # not a run another process is writing
        row = summarize(cell, scale) if ours and (directory / "metrics.jsonl").is_file() else None
        if row is None or cell.published is None:
            return
        target = cell.published
        if (target / "scenario.yaml").is_file():
            _same_scenario(target, cell.scenario(), "remove that folder to publish this run")
        target.mkdir(parents=True, exist_ok=True)
        records = compact_records(directory)
        atomic_write(target / "records.jsonl", lambda f: f.writelines(to_json(r) + "\n" for r in records), "w")
        atomic_write(target / "summary.json", lambda f: f.write(to_json(row, indent=1)), "w")
        for file in ("scenario.yaml", "cell.json"):
            shutil.copy2(directory / file, target / file)
        if row["status"] != "cut short":  # finished: its carried checkpoint has served
            shutil.rmtree(carried_path(target), ignore_errors=True)


def carry_cell(cell: Cell) -> bool:
    """Copy an unfinished cell's last checkpoint (its records are in it), resolved scenario and cell.json to
    :func:`carried_path`, where a later machine resumes it from (``--carry``; commit the folder). The cell
    may be running: its checkpoint is written atomically and copied as it was at one moment. False where
    there is nothing to carry (no checkpoint, a finished run, or ``--fresh``)."""
    directory, target = cell.scenario().results_path, carried_path(cell.published)
    if target is None or cell_status(cell.scenario(), cell.published) != "resumable":  # resumable: a checkpoint here
        return False
    target.mkdir(parents=True, exist_ok=True)
    for file in CARRIED_FILES:
        atomic_write(target / file, lambda f, file=file: f.write((directory / file).read_bytes()))
    return True


def publish(name: str, out: Path, cells: list[Cell], scale: str) -> Path:
    """Copy a set's tables and plots, and each cell's run (:func:`publish_cell`), to docs/results/<scale>/
    (committed: every published number traces to its run's records)."""
    published = PUBLISHED / scale
    published.mkdir(parents=True, exist_ok=True)
    for path in out.glob(f"{name}*.*"):
        shutil.copy2(path, published / path.name)
    for cell in cells:
        publish_cell(cell, scale)
    return published


FAMILY_TITLES = {"fewshot": "5-way 1-shot few-shot learning"}
SET_TITLES = {"table2": "Table II, {column}", "cx-star": "C_x* study, 5-way 5-shot",
              "loss-tuning": "Loss tuning, long-tail CIFAR-10", "lr-sweep": "Step-size sweep, {column}",
              "loss-tuning-sweep": "Step-size sweep, loss tuning", "scalability": "Scalability (Table III), {column}",
              **{f"family-{task}": f"The federated bilevel family on {FAMILY_TITLES.get(task, task)}" for task in FAMILY_TASKS},
              **{f"family-{task}-sweep": f"Step-size sweep, the family on {FAMILY_TITLES.get(task, task)}"
                 for task in FAMILY_TASKS}}


def parse_overrides(parser: argparse.ArgumentParser, pairs: list[str]) -> dict[str, Any]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--override {pair!r}: expected KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("set", choices=sorted(SET_TITLES))
    parser.add_argument("--column", choices=sorted(COLUMNS), default="5w1s", help="Table II column (table2, lr-sweep)")
    parser.add_argument("--rows", nargs="*", help="run only these rows or cells (row names, or cell labels of a sweep)")
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--engine", choices=("plain", "flower"), default="plain")
    parser.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1), help="cells run at once")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per cell (default: cores / jobs)")
    parser.add_argument("--out", type=Path, default=None, help="default: results/experiments/<scale>/<set>")
    parser.add_argument("--override", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                        help="scenario keys for every cell, after the scale's (e.g. algorithm.iterations=200); "
                             "repeat the flag or list several pairs")
    parser.add_argument("--plot-only", action="store_true", help="only summarise the runs already there")
    parser.add_argument("--publish", action="store_true",
                        help="also copy the set's tables, plots and each run's compact records to docs/results/<scale>/ "
                             "(each cell as soon as it finishes); a finished sweep also writes the chosen step sizes "
                             "that the sets it tunes read")
    parser.add_argument("--carry", action="store_true",
                        help="run nothing: copy the last checkpoint of every unfinished cell here (running or not) "
                             "to docs/results/<scale>/<set>/checkpoints/<cell>/, from which a later machine resumes "
                             "it (commit that folder); a finished, published cell's folder is removed")
    parser.add_argument("--fresh", action="store_true",
                        help="run cells again even where a finished run of the same scenario is published "
                             "(to reproduce a published number)")
    args = parser.parse_args(argv)
    if args.fresh and args.publish:  # a fresh run's table holds only what ran here: it would replace the published one
        parser.error("--fresh reruns published cells to reproduce their numbers and cannot --publish: to publish "
                     "a new run of a cell, remove its folder under docs/results/<scale>/<set>/runs/ first")
    argv = list(sys.argv[1:] if argv is None else argv)
    name = set_name(args.set, args.column)
    out = (args.out or Path("results") / "experiments" / args.scale / name).resolve()
    overrides = parse_overrides(parser, args.override)
    cells = cells_for(args.set, args.column, args.rows, args.scale, out, overrides, args.fresh)
    if args.carry:
        carried = [cell.label for cell in cells if carry_cell(cell)]
        print(f"{name}: carried the checkpoints of {len(carried)} unfinished cells: {' '.join(carried) or '-'}")
        return
    failed, ran = [], len(cells)
    if not args.plot_only:
        failed = run_cells(cells, args.engine, args.jobs, args.threads or max(1, (os.cpu_count() or 1) // args.jobs),
                           argv, (lambda cell: publish_cell(cell, args.scale)) if args.publish else lambda cell: None)
    if args.rows:  # the table shows the whole set, whatever this call ran
        cells = cells_for(args.set, args.column, None, args.scale, out, overrides, args.fresh)
    try:
        with set_lock(out / f".{name}.lock"), \
                set_lock(PUBLISHED / args.scale / f".{name}.lock") if args.publish else nullcontext():
            tables(args, name, out, cells)
    except SystemExit:  # "no finished runs": where cells failed, the message below says why
        if not failed:
            raise
    if failed:  # after the tables, which show every cell that finished
        sys.exit(f"{name}: {len(failed)} of {ran} cells failed: {' '.join(failed)} (tracebacks above; their "
                 f"logs under {out / 'runs'})")


def tables(args: argparse.Namespace, name: str, out: Path, cells: list[Cell]) -> None:
    """The set's tables and plots from its cells' runs (and, with ``--publish``, their publication)."""
    rows = [row for row in (summarize(cell, args.scale) for cell in cells) if row]
    if not rows:
        sys.exit(f"no finished runs under {out / 'runs'}")
    add_cost_ratios(rows)
    title = SET_TITLES[args.set].format(column=args.column)
    write_outputs(name, rows, out, title, list(COLUMNS).index(args.column) if args.set == "table2" else None)
    if args.set.endswith("sweep"):
        complete = all(r["status"] != "cut short" for r in rows) and len(rows) == len(cells)
        chosen = choose_step_sizes(rows, cells, args.set, args.column, args.scale) if complete else None
        write_sweep_markdown(name, rows, cells, chosen, out, title)
        if args.publish and not chosen:
            unfinished = len(cells) - sum(r["status"] != "cut short" for r in rows)
            print(f"{name}: {unfinished} of {len(cells)} cells not finished: step sizes not published yet")
        elif args.publish:
            path = step_sizes_path(args.set, args.scale)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"# Written by `python -m rabo_flwr.experiments {args.set} --scale {args.scale} --publish` "
                            f"from {name}.md; the sets it tunes read it.\n" + yaml.safe_dump(chosen, sort_keys=False))
    if args.publish:
        publish(name, out, cells, args.scale)
    print((out / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
