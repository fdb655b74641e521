"""Scenarios: one YAML file describes a whole run; run-config keys override single values.

Validation happens here, before any data is loaded or any client trains, and every error
names the file and the dotted key, e.g. ``scenarios/x.yaml: clients.capacities[2]: capacity
must be in (0, 1], got 1.5``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

TASKS = ("fewshot", "loss-tuning", "quadratic", "hyper-cleaning")
FAULT_KINDS = ("raise", "sleep", "block", "nan", "wrong-shape", "huge")


class ScenarioError(ValueError):
    """A scenario or run-config value is wrong; the message names the file and the key."""


@dataclass
class TaskConfig:
    name: str = "fewshot"  # a built-in task (TASKS) or your own: "package.module:ClassName" (a BilevelTask)
    options: Any = field(default_factory=dict)  # your own task's options: validated into its ``Options`` dataclass
    n_way: int = 5
    k_shot: int = 1
    n_query: int = 5  # query images per class; 0 means all remaining images of the class
    labels: str = "episode"  # the head's classes: "episode" (N-way, per episode) or "global" (every background character)
    image_size: int = 28
    lower_l2: float = 0.01  # ridge term that makes the head's problem strongly convex
    shard_by: str = "alphabet"  # "alphabet" or "character"
    eval_episodes: int = 100
    eval_steps: int = 50
    eval_lr: float = 0.5
    eval_l2: float = 0.1  # ridge of the evaluation heads (fixed, so runs stay comparable)
    eval_one_shot_runs: bool = False
    eval_seed: int = -1  # seed of the fixed test episodes; -1: the scenario's seed
    val_alphabets: int = 5  # background alphabets held out as validation (every choice reads them, never the test set)
    val_episodes: int = 200  # fixed validation episodes of those alphabets, evaluated at every evaluation
    download: bool = True  # fetch missing archives with torchvision's utilities; RABO_OFFLINE=1 turns it off
    # loss-tuning (long-tail CIFAR-10); hyper-cleaning shares val_fraction, batch_size and the subsamples
    imbalance_ratio: float = 100.0
    val_fraction: float = 0.2  # share of each client's data that validates x (upper level)
    batch_size: int = 128
    train_subsample: float = 1.0  # fraction of the (long-tail) training set used, per class (miniature runs)
    test_subsample: float = 1.0  # fraction of the balanced test set evaluated
    upper_objective: str = "balanced-ce"  # "balanced-ce" or "vs" (the paper's printed one; see tasks/loss_tuning.py)
    x_init: str = "neutral"  # "neutral" (plain cross-entropy) or "vs-recommended" (Kini et al.'s fixed values)
    vs_gamma: float = 0.3  # VS loss's recommended Delta_c = (n_c / n_max)^gamma
    vs_tau: float = 1.0  # VS loss's recommended l_c = tau * log(prior_c)
    # quadratic (synthetic, closed-form answer; tasks/quadratic.py gives the formulas)
    channels: int = 16  # rows h of x and y: the channel group a client of capacity r keeps ceil(r h) of
    x_dim: int = 4  # columns p of x (never pruned)
    y_dim: int = 6  # columns q of y (never pruned)
    condition: float = 2.0  # the lower level's Hessian A has eigenvalues spread over [1, condition]
    upper_l2: float = 0.1  # mu in f_i = 0.5 ||y - b_i||^2 + 0.5 mu ||x||^2
    heterogeneity: float = 1.0  # spread of the clients' linear terms c_i and targets b_i
    hessian_heterogeneity: float = 0.0  # spread of the clients' A_i and B_i (> 0: local hypergradients are biased)
    # hyper-cleaning (CIFAR-10 with flipped training labels; tasks/hyper_cleaning.py)
    flip_fraction: float = 0.4  # p: share of each client's training labels flipped to another class
    classifier: str = "linear"  # "linear" (on fixed random features) or "backbone" (model.backbone at model.width)
    random_filters: int = 32  # the linear classifier's features: random 3x3 filters, ReLU, 8x8 pooling (32 x 16 = 512)


@dataclass
class ModelConfig:
    backbone: str = "conv4"
    width: int = 64
    head: str = "linear"
    head_hidden: int = 64
    feature_norm: float = 0.0  # > 0: features L2-normalised to this norm; 0: raw features


@dataclass
class CapacityChange:
    from_iteration: int = 0
    capacities: list[float] = field(default_factory=list)


@dataclass
class ClientsConfig:
    num: int = 5
    capacities: list[float] = field(default_factory=lambda: [1.0, 0.5, 0.25, 0.125, 0.0625])
    schedule: list[CapacityChange] = field(default_factory=list)
    fraction: float = 1.0
    min_available: int = 0  # 0 means all ``num`` clients
    min_capacity: float = 0.0  # clients of a lower capacity sit out (the ``-full-only`` rows: 1.0, capacity-1 clients only)
    local_steps: list[int] = field(default_factory=list)  # local steps per partition, cycled as capacities are (empty: algorithm.inner_steps)


@dataclass
class AlgorithmConfig:
    name: str = "rabo"
    estimator: str = ""  # empty: the algorithm's own (rabo: exact, rafbo: fd-coordinate, fedmbo: neumann)
    estimator_options: dict[str, Any] = field(default_factory=dict)
    iterations: int = 100  # global iterations at most (run.patience may stop earlier)
    inner_steps: int = 5  # T: lower-level steps (bilevel) or local steps (single-level, ProtoNet, MAML)
    alpha: float = 0.05  # step of x (upper level; the backbone's local step for single-level rows)
    beta: float = 0.1  # step of y (lower level; the head's local step for single-level rows)
    mask_x: str = ""  # empty: the algorithm's own policy
    mask_y: str = ""
    rolling_step: int = 1
    placement: list[int] = field(default_factory=list)  # mask "placed": window index per partition
    # what a client holds of its kept channels (rabo_flwr/submodel.py, held_layout): "sliced", the sub-network
    # of those channels; "segment", their filters trained inside the full network, the rest frozen
    submodel: str = "sliced"
    adapt_steps: int = 3  # dist-maml: adaptation steps on the support set
    adapt_lr: float = 0.1  # dist-maml: adaptation step size
    inner_rounds: int = 1  # fednest, lfednest: T, lower-level rounds (FedInn calls) per iteration; aggitd: N, its rounds
    inner_optimizer: str = ""  # fednest, lfednest: "svrg" (FedSVRG) or "sgd" (FedAvg); empty: fednest svrg, lfednest sgd
    neumann_terms: int = 5  # fednest, lfednest: N, Neumann products of the inverse-Hessian-gradient product
    neumann_step: float = 0.0  # fednest, lfednest: the Neumann step eta; 0: alpha (as in ucr-optml/FedNest)
    outer_steps: int = 1  # fednest, lfednest: local x-steps per iteration
    v_step: float = 0.0  # simfbo, shrofbo, memfbo: step of v ~ H^-1 grad_y f, local and server; 0: beta
    fd_probe: float = 1e-3  # memfbo: how far y moves in the finite differences of grad g along v
    # sldbo, s3ldbo: the gossip network (rabo_flwr/gossip.py) and their own keys (rabo_flwr/algorithms/sldbo.py)
    topology: str = "ring"  # ring, torus, complete, erdos-renyi, or matrix (W given in mixing)
    edge_probability: float = 0.5  # erdos-renyi: each pair's probability of an edge (seeded; redrawn until connected)
    mixing: list[list[float]] = field(default_factory=list)  # matrix: W, clients.num rows, doubly stochastic
    v_radius: float = 0.0  # each node's v is projected onto the ball of this radius (0: no projection)
    snapshot_probability: float = 0.5  # s3ldbo: the probability that a node refreshes its snapshot in an iteration

    @property
    def resolved_estimator(self) -> str:
        """The hypergradient estimator: the scenario's, else the algorithm's own ("" for none)."""
        from .algorithms import ALGORITHMS

        return self.estimator or ALGORITHMS[self.name].default_estimator

    def mask(self, side: str) -> str:
        """The mask policy of ``side`` ("x" or "y"): the scenario's, else the algorithm's own."""
        from .algorithms import ALGORITHMS

        return getattr(self, f"mask_{side}") or ALGORITHMS[self.name].default_mask


@dataclass
class Fault:
    """A fault to inject, for testing how a run survives it (see clients/faults.py)."""

    partition: int = 0
    phase: str = "inner"  # inner, outer or any
    iterations: list[int] = field(default_factory=list)  # empty: every iteration
    kind: str = "raise"  # raise, sleep, block, nan, wrong-shape, huge
    seconds: float = 0.0  # for sleep: how long; for block: the longest it waits
    release: str = ""  # for block: the client waits until this file exists


@dataclass
class RunConfig:
    results_dir: str = ""  # empty: results/<name>
    eval_every: int = 0  # 0: evaluate only iteration 0 and the last
    patience: int = 0  # stop after this many evaluations without improvement (0: run every iteration)
    min_delta: float = 0.0  # improvement of the task's main metric that resets the patience
    divergence_factor: float = 100.0  # reject updates whose RMS exceeds this times the phase's median (0: off)
    device: str = "auto"  # auto: CUDA when available, else CPU
    phase_timeout: float = 600.0  # seconds a phase waits for replies; stragglers are dropped
    node_wait_timeout: float = 300.0  # seconds to wait for enough nodes to register
    final_test: bool = True  # evaluate the test split once, on the model selected on validation (the sweep: false)
    count_flops: bool = True  # FLOPs per phase via torch.utils.flop_counter, counted once per unit and shape
    federated_eval: bool = False  # at each evaluation, every client also evaluates on its own held-out data
    checkpoint_every: int = 0  # 0: no checkpoints
    workers: int = 1  # plain engine: clients of a phase run in this many worker processes (1: one after another)
    resume: bool = False  # continue from results_dir/checkpoint.pt
    faults: list[Fault] = field(default_factory=list)


@dataclass
class Scenario:
    name: str = "quickstart"
    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def local_steps(self, partition: int) -> int:
        """A partition's local steps: ``clients.local_steps`` assigned round-robin, else ``algorithm.inner_steps``."""
        steps = self.clients.local_steps
        return steps[partition % len(steps)] if steps else self.algorithm.inner_steps

    def capacity(self, partition: int, iteration: int) -> float:
        """Capacity of a partition at an iteration: tiers assigned round-robin, optionally rescheduled."""
        tiers = self.clients.capacities
        for change in self.clients.schedule:
            if iteration >= change.from_iteration:
                tiers = change.capacities
        return tiers[partition % len(tiers)]

    @property
    def results_path(self) -> Path:
        """Relative paths resolve against $RABO_RESULTS_ROOT (the SuperLink's working dir may be anywhere)."""
        path = Path(self.run.results_dir or f"results/{self.name}")
        return path if path.is_absolute() else Path(os.environ.get("RABO_RESULTS_ROOT", os.getcwd())) / path

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing and validation


def _fail(source: str, key: str, message: str) -> ScenarioError:
    err = ScenarioError(f"{source}: {key}: {message}")
    err.key, err.reason = key, message
    return err


def _coerce(value: Any, hint: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise _fail(source, key, f"expected a mapping, got {type(value).__name__}")
        return _build(hint, value, source, key)
    if origin is list:
        if not isinstance(value, list):
            raise _fail(source, key, f"expected a list, got {type(value).__name__}")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _fail(source, key, f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise _fail(source, key, f"expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _fail(source, key, f"expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _fail(source, key, f"expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise _fail(source, key, f"expected a string, got {value!r}")
        return value
    return value


def _build(cls: type, data: Mapping[str, Any], source: str, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in known:
            raise _fail(source, dotted, f"unknown key (known: {', '.join(sorted(known))})")
        kwargs[key] = _coerce(value, hints[key], source, dotted)
    return cls(**kwargs)


def _check_choice(source, key, value, choices):
    if value not in choices:
        raise _fail(source, key, f"{value!r} is not one of {', '.join(choices)}")


def _check_positive(source, key, value, allow_zero=False):
    if value < 0 or (value == 0 and not allow_zero):
        raise _fail(source, key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_capacities(source, key, capacities):
    if not capacities:
        raise _fail(source, key, "needs at least one capacity")
    for i, r in enumerate(capacities):
        if not 0.0 < r <= 1.0:
            raise _fail(source, f"{key}[{i}]", f"capacity must be in (0, 1], got {r}")


def validate(s: Scenario, source: str) -> Scenario:
    """Checks values that types alone cannot; raises ScenarioError naming file and key.

    Names are checked against the registries they select from (algorithms, estimators, masks,
    backbones), so each list exists once.
    """
    from .algorithms import ALGORITHMS
    from .hypergrad import METHODS, method_options
    from .masks import POLICIES
    from .models.backbones import BACKBONES
    from .submodel import SUBMODELS

    if ":" in s.task.name:
        _check_custom_task(s, source)
    else:
        _check_choice(source, "task.name", s.task.name, TASKS)
        if s.task.options:
            raise _fail(source, "task.options", f"only a task of your own (\"package.module:ClassName\") takes options")
    _check_choice(source, "algorithm.name", s.algorithm.name, tuple(ALGORITHMS))
    algorithm = ALGORITHMS[s.algorithm.name]
    if s.algorithm.estimator:
        if not algorithm.default_estimator:
            raise _fail(source, "algorithm.estimator", f"{s.algorithm.name} computes no hypergradient")
        _check_choice(source, "algorithm.estimator", s.algorithm.estimator, tuple(METHODS))
    estimator = s.algorithm.resolved_estimator
    if s.algorithm.estimator_options and not estimator:
        raise _fail(source, "algorithm.estimator_options", f"{s.algorithm.name} computes no hypergradient")
    if estimator:
        unknown = sorted(set(s.algorithm.estimator_options) - set(method_options(estimator)))
        if unknown:  # named by its dotted key, which a run config or --override sets one option at a time
            raise _fail(source, f"algorithm.estimator_options.{unknown[0]}",
                        f"not an option of {estimator} (it takes {', '.join(method_options(estimator))})")
        warm_start = s.algorithm.estimator_options.get("warm_start", False)
        if not isinstance(warm_start, bool):
            raise _fail(source, "algorithm.estimator_options.warm_start", f"must be true or false, got {warm_start!r}")
    for side in ("x", "y"):
        if getattr(s.algorithm, f"mask_{side}"):
            _check_choice(source, f"algorithm.mask_{side}", getattr(s.algorithm, f"mask_{side}"), tuple(POLICIES))
    for i, window in enumerate(s.algorithm.placement):
        _check_positive(source, f"algorithm.placement[{i}]", window, allow_zero=True)
    _check_choice(source, "algorithm.submodel", s.algorithm.submodel, SUBMODELS)
    if s.algorithm.submodel == "segment" and not algorithm.segments:
        supported = ", ".join(name for name, a in ALGORITHMS.items() if a.segments)
        raise _fail(source, "algorithm.submodel", f"{s.algorithm.name} does not train segments (those that do: {supported})")
    if algorithm.episodic and s.task.name != "fewshot":
        raise _fail(source, "algorithm.name", f"{s.algorithm.name} trains on few-shot episodes: task.name must be fewshot")
    _check_choice(source, "model.backbone", s.model.backbone, tuple(BACKBONES))
    _check_choice(source, "model.head", s.model.head, ("linear", "mlp"))
    _check_choice(source, "task.shard_by", s.task.shard_by, ("alphabet", "character"))
    _check_choice(source, "task.labels", s.task.labels, ("episode", "global"))
    _check_choice(source, "task.upper_objective", s.task.upper_objective, ("balanced-ce", "vs"))
    _check_choice(source, "task.x_init", s.task.x_init, ("neutral", "vs-recommended"))
    _check_choice(source, "task.classifier", s.task.classifier, ("linear", "backbone"))
    if not 0.0 <= s.task.flip_fraction < 1.0:
        raise _fail(source, "task.flip_fraction", f"must be in [0, 1), got {s.task.flip_fraction}")
    _check_choice(source, "run.device", s.run.device, ("auto", "cpu", "cuda"))
    _check_capacities(source, "clients.capacities", s.clients.capacities)
    phases = {phase.name for phase in algorithm.phases(s)}
    for i, fault in enumerate(s.run.faults):
        _check_choice(source, f"run.faults[{i}].phase", fault.phase, (*sorted(phases), "any"))
        _check_choice(source, f"run.faults[{i}].kind", fault.kind, FAULT_KINDS)
        if fault.kind == "block" and not (fault.release and fault.seconds > 0):
            raise _fail(source, f"run.faults[{i}].release", "a block fault needs the file that releases it and "
                        "seconds > 0, the longest it waits")
    for i, change in enumerate(s.clients.schedule):
        _check_capacities(source, f"clients.schedule[{i}].capacities", change.capacities)
        _check_positive(source, f"clients.schedule[{i}].from_iteration", change.from_iteration, allow_zero=True)
    if not 0.0 < s.clients.fraction <= 1.0:
        raise _fail(source, "clients.fraction", f"must be in (0, 1], got {s.clients.fraction}")
    if not 0.0 <= s.clients.min_capacity <= 1.0:
        raise _fail(source, "clients.min_capacity", f"must be in [0, 1], got {s.clients.min_capacity}")
    if not any(r >= s.clients.min_capacity for r in s.clients.capacities):
        raise _fail(source, "clients.min_capacity", f"{s.clients.min_capacity} exceeds every capacity: no client would train")
    for i, steps in enumerate(s.clients.local_steps):
        _check_positive(source, f"clients.local_steps[{i}]", steps)
    _check_choice(source, "algorithm.inner_optimizer", s.algorithm.inner_optimizer, ("", "svrg", "sgd"))
    if s.clients.min_available > s.clients.num:
        raise _fail(source, "clients.min_available", f"{s.clients.min_available} exceeds clients.num={s.clients.num}")
    for key in ("clients.num", "algorithm.iterations", "algorithm.inner_steps", "task.n_way", "task.k_shot",
                "task.image_size", "task.eval_episodes", "task.val_alphabets", "task.val_episodes", "model.width", "model.head_hidden", "algorithm.rolling_step",
                "algorithm.fd_probe",
                "algorithm.alpha", "algorithm.beta", "algorithm.adapt_steps", "algorithm.adapt_lr", "task.eval_lr",
                "algorithm.inner_rounds", "algorithm.neumann_terms", "algorithm.outer_steps",
                "task.imbalance_ratio", "task.batch_size", "task.random_filters", "run.phase_timeout", "run.node_wait_timeout", "run.workers"):
        section, name = key.split(".")
        _check_positive(source, key, getattr(getattr(s, section), name))
    for key in ("task.val_fraction", "task.train_subsample", "task.test_subsample"):
        value = getattr(s.task, key.split(".")[1])
        if not 0.0 < value <= 1.0:
            raise _fail(source, key, f"must be in (0, 1], got {value}")
    for key in ("run.checkpoint_every", "model.feature_norm", "task.lower_l2", "task.eval_l2", "task.n_query",
                "run.eval_every", "task.eval_steps", "run.patience", "run.min_delta", "run.divergence_factor",
                "task.vs_gamma", "task.vs_tau", "algorithm.neumann_step", "algorithm.v_step"):
        section, name = key.split(".")
        _check_positive(source, key, getattr(getattr(s, section), name), allow_zero=True)
    if s.task.eval_seed < -1:
        raise _fail(source, "task.eval_seed", f"must be -1 (the scenario's seed) or >= 0, got {s.task.eval_seed}")
    if s.run.divergence_factor and s.run.divergence_factor <= 1:
        raise _fail(source, "run.divergence_factor", f"must be 0 (off) or > 1, got {s.run.divergence_factor}")
    for key in ("task.channels", "task.x_dim", "task.y_dim", "task.upper_l2"):
        _check_positive(source, key, getattr(s.task, key.split(".")[1]))
    for key in ("task.heterogeneity", "task.hessian_heterogeneity"):
        _check_positive(source, key, getattr(s.task, key.split(".")[1]), allow_zero=True)
    if s.task.condition < 1:
        raise _fail(source, "task.condition", f"must be >= 1 (the ratio of the largest to the smallest eigenvalue), got {s.task.condition}")
    if algorithm.decentralised:
        _check_decentralised(s, source)
    if algorithm.full_model:
        for key, capacities in [("clients.capacities", s.clients.capacities)] + [
                (f"clients.schedule[{i}].capacities", c.capacities) for i, c in enumerate(s.clients.schedule)]:
            if any(s.clients.min_capacity <= r < 1.0 for r in capacities):
                raise _fail(source, key, f"{s.algorithm.name} trains the full model: every capacity must be 1 "
                                         f"(or below clients.min_capacity, whose clients sit out)")
    return s


def _check_decentralised(s: Scenario, source: str) -> None:
    """A gossip method: every node every iteration, a usable mixing matrix, its own keys in range."""
    from .gossip import mixing_problem

    if s.clients.fraction != 1.0:
        raise _fail(source, "clients.fraction", f"{s.algorithm.name} runs every node every iteration: must be 1, "
                                                f"got {s.clients.fraction}")
    problem = mixing_problem(s)
    if problem:
        raise _fail(source, *problem)
    _check_positive(source, "algorithm.v_radius", s.algorithm.v_radius, allow_zero=True)
    if not 0.0 < s.algorithm.snapshot_probability <= 1.0:
        raise _fail(source, "algorithm.snapshot_probability", f"must be in (0, 1], got {s.algorithm.snapshot_probability}")


def _check_custom_task(s: Scenario, source: str) -> None:
    """A user's task class: importable, a BilevelTask; its options valid for its ``Options`` dataclass
    (then stored as that dataclass); no built-in task's keys set."""
    from .tasks import BilevelTask, task_class

    try:
        cls = task_class(s.task.name)
    except (ImportError, AttributeError, ValueError) as err:
        raise _fail(source, "task.name", str(err)) from None
    if not (isinstance(cls, type) and issubclass(cls, BilevelTask)):
        raise _fail(source, "task.name", f"{s.task.name} is not a subclass of rabo_flwr.tasks.BilevelTask")
    defaults = TaskConfig()
    for f in dataclasses.fields(TaskConfig):
        if f.name not in ("name", "options") and getattr(s.task, f.name) != getattr(defaults, f.name):
            raise _fail(source, f"task.{f.name}", f"not an option of {s.task.name} (its options go under task.options)")
    options_type = getattr(cls, "Options", None)
    options = s.task.options
    if options_type is not None and isinstance(options, options_type):  # validated before
        return
    if not isinstance(options, Mapping):
        raise _fail(source, "task.options", f"expected a mapping, got {type(options).__name__}")
    if options_type is None:
        if options:
            raise _fail(source, "task.options", f"{s.task.name} takes no options (it defines no Options dataclass)")
        return
    try:
        s.task.options = _build(options_type, options, source, "task.options")
    except (TypeError, ValueError) as err:
        if isinstance(err, ScenarioError):
            raise
        raise _fail(source, "task.options", str(err)) from None


def _set_dotted(data: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise _fail(source, dotted, f"{part} is not a section")
        node = child
    node[parts[-1]] = value


# Run-config keys that are not scenario values.
RUN_CONFIG_META_KEYS = ("scenario",)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A scenario's mapping; ``base: other.yaml`` (relative to the file) is read first and overlaid."""
    source = str(path)
    if not path.is_file():
        raise ScenarioError(f"{source}: scenario file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ScenarioError(f"{source}: not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise _fail(source, "base", f"expected a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise _fail(source, "base", f"{base} includes itself")
    return _merge(_read_yaml(base_path, seen + (path.resolve(),)), data)


def load_scenario(path: str | Path, overrides: Mapping[str, Any] | None = None, base_dir: Path | None = None) -> Scenario:
    """Read (with ``base`` files), merge overrides (dotted keys, empty string = unset), validate.

    A dotted key reaches inside a mapping too (``algorithm.estimator_options.warm_start``), so an option
    of a mapping-valued field is set alone and the file's other options stay."""
    path = Path(path)
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    source = str(path)
    data = _read_yaml(path)
    applied = {k: v for k, v in (overrides or {}).items() if k not in RUN_CONFIG_META_KEYS and v != ""}
    for dotted, value in applied.items():
        _set_dotted(data, dotted, value, f"{source} (run config override)")
    try:
        return validate(_build(Scenario, data, source), source)
    except ScenarioError as err:
        key = getattr(err, "key", "").split("[")[0]
        if any(key == k or key.startswith(k + ".") for k in applied):  # a value set, or one inside a mapping set
            raise _fail(f"{source} (run config override)", err.key, err.reason) from None
        raise


def scenario_keys(cls: type = Scenario, prefix: str = "") -> list[str]:
    """Every dotted leaf key of the schema, i.e. what the run config may override."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            keys.extend(scenario_keys(hints[f.name], dotted + "."))
        else:
            keys.append(dotted)
    return keys


APP_DIR = Path(__file__).resolve().parent.parent  # holds scenarios/, also inside an installed FAB


def scenario_from_run_config(run_config: Mapping[str, Any], app_dir: Path = APP_DIR) -> Scenario:
    """The run's scenario: the file named by ``scenario`` (relative to ``app_dir``, this project unless a
    user's app says otherwise), with the other run-config keys as overrides."""
    return load_scenario(str(run_config.get("scenario", "scenarios/quickstart.yaml")), run_config, base_dir=Path(app_dir))
