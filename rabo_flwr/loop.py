"""The one training loop, Flower-free, that both engines drive.

Per global iteration: which partitions are available (the engine knows), a seeded sample of
them, their capacities and submodel plans, then every phase of the algorithm: slices out,
replies back (the engine moves them), reply checks (names, shapes, dtype, finite values, and
the divergence guard), coverage-counted steps and assignments (of x, y and the algorithm's own
server variables, :class:`~rabo_flwr.algorithms.Side`), the algorithm's server work after the
phase (a decentralised method's gossip on its per-node states: ``Algorithm.gather``), cost and
coverage records. Then the evaluation schedule (validation), checkpoints, early stopping, a
progress line, and at the end the test evaluation of the model kept (the best on validation) and
a summary.

An engine is a :class:`PhaseRunner`: the plain engine (:class:`PlainRunner`, below) calls the
clients in this process; the Flower engine (``strategies.PhaseStrategy``, a Flower ``Strategy``)
turns each phase into messages. Both are handed a :class:`PhaseRound` and finish it with
:class:`Outcome` objects, so everything else happens here, once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Protocol

import torch

from .aggregation import coverage_of
from .algorithms import ALGORITHMS, ClientState, Phase
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .federation import SIDES, ServerState, Tensors, check_update, divergent, sample_clients, update_rms
from .masks import scenario_policies
from .results import ResultsWriter, validation_score
from .scenario import Scenario
from .submodel import plan_key
from .tasks import BilevelTask
from .threads import part_threads, torch_threads

REQUIRED_METRICS = ("flops", "wall_time")
# The server's own work (plans, aggregation, evaluation) runs on one torch thread in both engines:
# under Flower it shares the cores with simulated clients (measured: the final evaluation 8x slower
# with the default thread count), and one count for both engines keeps the server's numbers the same
# whichever engine runs and however many cores the machine has (the thread count can change the
# rounding of parallel reductions). An evaluation that splits into independent parts (few-shot
# episodes) runs them at once on the run's threads, each part on one torch thread (part_threads):
# the same bits as one thread.
SERVER_THREADS = 1
LOGGER = logging.getLogger("rabo_flwr")


@dataclass
class Assignment:
    """What one client is asked to do in a phase: its capacity and the slices it is sent."""

    partition: int
    capacity: float
    arrays: dict[str, Tensors]  # side -> slices
    submodel: str = ""  # the digest of the client's plan (plan_key): its kept state is read on this submodel only


@dataclass
class Outcome:
    """A client's answer: its updates and metrics, or (``updates is None``) why it has none."""

    partition: int
    updates: dict[str, Tensors] | None = None  # side -> update slices
    metrics: dict = field(default_factory=dict)
    error: str = ""


class PhaseRound:
    """One phase of one iteration as an engine sees it: what to send, and :meth:`finish` for the replies.

    ``number`` counts phases over the run from 1 (Flower's server round: one phase per round).
    """

    def __init__(self, phase: Phase, iteration: int, number: int, assignments: list[Assignment],
                 complete: Callable[[list[Outcome]], dict]):
        self.phase = phase
        self.iteration = iteration
        self.number = number
        self.assignments = assignments
        self._complete = complete
        self.record: dict | None = None

    def finish(self, outcomes: list[Outcome]) -> dict:
        """Check the outcomes, take the coverage-counted steps, log the phase; returns its record."""
        if self.record is not None:
            raise RuntimeError(f"iteration {self.iteration} {self.phase.name}: finished twice")
        self.record = self._complete(outcomes)
        return self.record


class PhaseRunner(Protocol):
    """How an engine reaches the clients."""

    # What each partition's client keeps between iterations (ClientState), where the engine holds it: the
    # plain engine does, and the loop checkpoints it; None where it lives on the clients (Flower's ClientApp).
    client_states: dict[int, ClientState] | None

    def partitions(self, iteration: int) -> dict[int, float | None]:
        """Partitions that can take part now, with the capacity each one announced (None: the scenario's)."""

    def run_phase(self, phase_round: PhaseRound) -> None:
        """Send every assignment, then ``phase_round.finish(outcomes)`` (missing outcomes count as failed)."""

    def evaluate_clients(self, iteration: int, x: Tensors, y: Tensors) -> dict[str, float]:
        """Federated evaluation (``run.federated_eval``): every available partition evaluates the
        global model on its own held-out data; :func:`mean_client_metrics` of their replies."""


def mean_client_metrics(replies: list[dict[str, float]]) -> dict[str, float]:
    """Example-weighted mean of each metric over the replies (``examples`` is the weight), and their count."""
    total = sum(float(r["examples"]) for r in replies)
    names = sorted({k for r in replies for k in r if k != "examples"})
    means = {k: sum(float(r[k]) * float(r["examples"]) for r in replies if k in r) / total for k in names} if total else {}
    return {**means, "examples": total, "clients": len(replies)}


def nbytes(arrays: dict[str, Tensors]) -> int:
    """Raw bytes of the arrays of a message (what both engines count, so their records agree)."""
    return sum(t.numel() * t.element_size() for side in arrays.values() for t in side.values())


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


@dataclass
class LoopResult:
    state: ServerState
    records: list[dict]
    directory: Path


class TrainingLoop:
    """Runs a scenario's global iterations through ``runner`` and writes its results directory."""

    def __init__(self, scenario: Scenario, task: BilevelTask, runner: PhaseRunner, device: torch.device,
                 logger: logging.Logger = LOGGER,
                 evaluate_fn: Callable[[int, Tensors, Tensors], dict | None] | None = None):
        self.scenario = scenario
        self.evaluate_fn = evaluate_fn  # more server-side metrics, beside the task's own evaluation
        # the run's threads, before the server's own count: the evaluation's independent parts may use them all
        self.evaluation_threads = torch.get_num_threads()
        self.task = task
        self.runner = runner
        self.device = device
        self.logger = logger
        self.algorithm = ALGORITHMS[scenario.algorithm.name]
        self.phases = self.algorithm.phases(scenario)
        self.sides = self.algorithm.sides(scenario)
        self.trained: dict[str, dict[str, torch.Tensor]] = {}  # side -> name -> element ever stepped
        self.min_coverage: dict[str, int] = {}  # side -> fewest clients that stepped an element in any phase
        # sides some phase trains: steps, or gathers (the algorithm steps with the replies: the gossip engine)
        self.stepped_sides = [side for side in ("x", "y") if any(side in phase.steps or side in phase.gathers
                                                                 for phase in self.phases)]
        self.flops_by_submodel: dict[str, float] = {}  # "phase x_elements y_elements" -> FLOPs of one reply

    # ------------------------------------------------------------------ the run

    def run(self, initial: tuple[Tensors, Tensors] | None = None) -> LoopResult:
        """The whole run, from ``initial`` (x, y) if given, else the task's seeded initialisation."""
        with torch_threads(SERVER_THREADS):
            return self._run(initial)

    def _run(self, initial: tuple[Tensors, Tensors] | None) -> LoopResult:
        scenario, run, algo = self.scenario, self.scenario.run, self.scenario.algorithm
        resumed = load_checkpoint(scenario.results_path) if run.resume else None  # before anything is written
        if initial is not None and not resumed:
            self._check_initial(initial)
        if run.federated_eval and type(self.task).evaluate_client is BilevelTask.evaluate_client:
            raise ValueError(f"run.federated_eval: {type(self.task).__name__} has no evaluate_client")
        self.task.prepare()  # missing or corrupt data stops the run here, before any results are written
        writer = ResultsWriter(scenario.results_path, scenario, history=resumed.metrics if resumed else None)
        x, y = (resumed.x, resumed.y) if resumed else initial or self.task.init_tensors(scenario.seed)
        self.state = ServerState(self.task.layouts, x, y, scenario_policies(scenario), algo.submodel)
        saved_sides = resumed.state.get("sides", {}) if resumed else {}
        for side in self.sides:
            self.state.add_side(side.name, side.follows, saved_sides.get(side.name))
        self.trained = {s: {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in self.state.tensors[s].items()}
                        for s in ("x", "y")}
        self.kept = None  # (iteration, validation metric, x, y) of the best validation evaluation so far
        if resumed:
            self.trained, self.flops_by_submodel = resumed.state["trained"], resumed.state["flops_by_submodel"]
            self.min_coverage = resumed.state.get("min_coverage", {})
            self.kept = resumed.state["kept"]
            self.state.nodes = resumed.state.get("nodes", {})
            if self.runner.client_states is not None:
                self.runner.client_states.update({p: ClientState(**kept) for p, kept in
                                                  resumed.state.get("client_states", {}).items()})
        self.writer = writer
        first = resumed.iteration + 1 if resumed else 1
        self.logger.info(f"{scenario.name}: {algo.name} on {scenario.task.name}, {scenario.clients.num} clients, "
                         f"up to {algo.iterations} iterations, results in {writer.directory}")
        started = time.perf_counter()
        if first == 1:
            self._evaluate(0)
        # a run that stopped early just before it was cut short resumes as stopped
        last, stopped_early = first - 1, resumed is not None and self._patience_exhausted()
        for q in range(first, first if stopped_early else algo.iterations + 1):
            self._iteration(q)
            last = q
            evaluate = q == algo.iterations or (run.eval_every and q % run.eval_every == 0)
            if evaluate:
                self._evaluate(q)
                stopped_early = self._patience_exhausted()
            if run.checkpoint_every and (q % run.checkpoint_every == 0 or q == algo.iterations or stopped_early):
                save_checkpoint(writer.directory, Checkpoint(q, self.state.x, self.state.y, writer.records,
                                                             scenario.to_dict(), self._loop_state()))
            self._progress(q, first, started)
            if stopped_early:
                break
        if run.final_test:
            self._test()
        wall = time.perf_counter() - started
        writer.save_model(self.state.x, self.state.y)
        writer.log({"phase": "done", "iteration": last, "wall_time": wall, "stopped_early": stopped_early})
        self._summary(last, wall, stopped_early)
        return LoopResult(self.state, writer.records, writer.directory)

    def _check_initial(self, initial: tuple[Tensors, Tensors]) -> None:
        """Initial tensors must have the names and shapes of the task's own (finite, floating point)."""
        reference = dict(zip(SIDES, self.task.init_tensors(self.scenario.seed)))
        for side, tensors in zip(SIDES, initial):
            problem = check_update(tensors, {n: tuple(t.shape) for n, t in reference[side].items()})
            if problem:
                raise ValueError(f"initial {side}: {problem}")

    def _loop_state(self) -> dict:
        persistent = {side.name: self.state.tensors[side.name] for side in self.sides if side.persistent}
        clients = {p: {"submodel": c.submodel, "tensors": c.tensors}
                   for p, c in (self.runner.client_states or {}).items() if c.tensors}
        return {"trained": self.trained, "flops_by_submodel": self.flops_by_submodel, "min_coverage": self.min_coverage,
                "kept": self.kept, **({"sides": persistent} if persistent else {}),
                **({"nodes": self.state.nodes} if self.state.nodes else {}),
                **({"client_states": clients} if clients else {})}

    def _iteration(self, q: int) -> None:
        scenario = self.scenario
        announced = self.runner.partitions(q)
        available = {p: r if r is not None else scenario.capacity(p, q) for p, r in announced.items()}
        eligible = [p for p, r in available.items() if r >= scenario.clients.min_capacity]
        chosen = sample_clients(eligible, scenario.clients.fraction, scenario.seed, q)
        capacities = {p: available[p] for p in chosen}
        submodels = {p: plan_key(plan) for p, plan in self.state.plan_iteration(q, capacities).items()}
        for side in self.sides:
            if not side.persistent:
                self.state.reset_side(side.name)
        for i, phase in enumerate(self.phases):
            start = time.perf_counter()
            sent = {p: self.algorithm.arrays(phase, self.state, self.scenario, p, q) for p in chosen}
            assignments = [Assignment(p, capacities[p], arrays, submodels[p])
                           for p, arrays in sent.items() if arrays is not None]
            phase_round = PhaseRound(phase, q, (q - 1) * len(self.phases) + i + 1, assignments,
                                     partial(self._complete_phase, phase, q, assignments, start))
            self.runner.run_phase(phase_round)
            if phase_round.record is None:
                raise RuntimeError(f"iteration {q} {phase.name}: the engine did not finish the phase")

    def _complete_phase(self, phase: Phase, q: int, assignments: list[Assignment], started: float,
                        outcomes: list[Outcome]) -> dict:
        record = self._finish_phase(phase, q, assignments, outcomes, started)
        self.algorithm.after_phase(phase, self.state, self.scenario)
        self.writer.log(record)
        loss = f", {phase.loss}={record[phase.loss]:.4f}" if phase.loss else ""
        side = next((s for s in phase.steps if f"C_{s}*" in record), None)
        covering = f", C_{side}*={record[f'C_{side}*']}" if side else ""
        self.logger.info(f"iteration {q} {phase.name}: {record['clients_aggregated']}/{record['clients_sent']} "
                         f"aggregated{self._problems(record)}{loss}{covering}")
        return record

    # ------------------------------------------------------------------ a phase's replies

    def _finish_phase(self, phase: Phase, q: int, assignments: list[Assignment], outcomes: list[Outcome],
                      started: float) -> dict:
        received = {o.partition: o for o in outcomes}
        candidates, failed, malformed = {}, [], []
        for a in assignments:
            outcome = received.get(a.partition)
            if outcome is None or outcome.updates is None:
                failed.append(a)
                self.logger.warning(f"iteration {q} {phase.name}: partition {a.partition} failed: "
                                    f"{outcome.error if outcome else 'no reply within the phase timeout'}")
                continue
            problem = self._problem(phase, a.partition, outcome)
            if problem:
                malformed.append((a, outcome))
                self.logger.warning(f"iteration {q} {phase.name}: rejected the reply of partition {a.partition}: {problem}")
                continue
            candidates[a.partition] = (a, outcome)
        rms = {p: update_rms(o.updates) for p, (_, o) in candidates.items()}
        diverged = divergent(rms, self.scenario.run.divergence_factor)
        for p, ratio in diverged.items():
            self.logger.warning(f"iteration {q} {phase.name}: rejected the reply of partition {p}: update RMS "
                                f"{rms[p]:.3g} is {ratio:.3g} times the phase's median (run.divergence_factor="
                                f"{self.scenario.run.divergence_factor:g})")
        accepted = {p: c for p, c in candidates.items() if p not in diverged}
        rejected = malformed + [candidates[p] for p in diverged]

        aggregation_start = time.perf_counter()
        coverage = {}
        for side in phase.replies:
            replies = {p: o.updates[side] for p, (_, o) in accepted.items()}
            counts = self.state.step(side, replies, phase.steps[side]) if side in phase.steps else \
                self.state.assign(side, replies) if side in phase.assigns else self.state.coverage(side, replies)
            coverage.update(coverage_of(counts).as_metrics(side))
            if side not in phase.assigns and side in self.trained:  # stepped here, or by the algorithm's gather
                for name, count in counts.items():
                    self.trained[side][name] |= count > 0
                stepped = coverage_of(counts)
                if stepped.min_covered > 0:
                    self.min_coverage[side] = min(self.min_coverage.get(side, stepped.min_covered), stepped.min_covered)
        updates = {p: o.updates for p, (_, o) in accepted.items()}
        gathered = self.algorithm.gather(phase, self.state, self.scenario, updates) if phase.gathers else {}
        aggregation_time = time.perf_counter() - aggregation_start

        clients = [o.metrics | {"capacity": a.capacity, "bytes_down": nbytes(a.arrays), "bytes_up": nbytes(o.updates),
                                "update_rms": rms[p]} for p, (a, o) in sorted(accepted.items())]
        cost = self._cost(phase, assignments, accepted, rejected, failed)
        losses = [c[phase.loss] for c in clients] if phase.loss else None
        return {
            "iteration": q,
            "phase": phase.name,
            "clients_sent": len(assignments),
            "clients_aggregated": len(accepted),
            "failures": len(failed),
            "rejected": len(rejected),
            "rejected_divergent": len(diverged),
            **({phase.loss: sum(losses) / len(losses) if losses else math.nan} if phase.loss else {}),
            **coverage,
            **{f"C_{side}*": self._covering_number(side) for side in self.stepped_sides},
            **{f"trained_{side}": _fraction(self.trained[side]) for side in ("x", "y")},
            **cost,
            **gathered,
            "negative_curvature_clients": sum(int(c.get("hg_negative_curvature", 0)) for c in clients),
            "client_wall_time_max": max((c["wall_time"] for c in clients), default=0.0),
            "aggregation_time": aggregation_time,
            "wall_time": time.perf_counter() - started,
            "clients": clients,
        }

    def _covering_number(self, side: str) -> int:
        """C* of ``side`` so far, over all of its elements (the paper's Definition 3, with elements
        never trained counted): the fewest clients that stepped an element in any phase, and 0
        while some element has never been stepped at all."""
        return self.min_coverage.get(side, 0) if _fraction(self.trained[side]) == 1.0 else 0

    def _problem(self, phase: Phase, partition: int, outcome: Outcome) -> str | None:
        """Why a reply must be rejected as malformed, or None."""
        extra = sorted(set(outcome.updates) - set(phase.replies))
        if extra:
            return f"updates for sides this phase does not step: {extra}"
        for side in phase.replies:
            problem = check_update(outcome.updates.get(side), self.state.expected_shapes(partition, side))
            if problem:
                return f"{side}: {problem}"
        missing = [k for k in (phase.loss, *REQUIRED_METRICS) if k and k not in outcome.metrics]
        return f"missing metrics {missing}" if missing else None

    def _cost(self, phase: Phase, assignments, accepted, rejected, failed) -> dict:
        """FLOPs and bytes of all work sent in a phase, and the part of it that was wasted.

        Replies carry their FLOPs, rejected ones too, or -1 where the client did not count them
        (``run.count_flops: false``): the phase's FLOPs are those of the replies that have a count,
        and ``uncounted_replies`` says how many had none. A client that failed or timed out sends
        nothing, so its work is estimated from the last counted reply for a submodel of the same
        size in the same phase (``unestimated_failures`` counts those with no such reply yet). The size
        is what the client holds of each side sent (its slices; under segment submodels, which send
        x and y whole, its held elements).
        """
        def held(a: Assignment, side: str) -> int:
            shapes = self.state.expected_shapes(a.partition, side).values() if side in a.arrays else ()
            return sum(math.prod(shape) for shape in shapes)

        def size(a: Assignment) -> str:
            steps = f" steps {self.scenario.local_steps(a.partition)}" if self.scenario.clients.local_steps else ""
            return f"{phase.name} {held(a, 'x')} {held(a, 'y')}{steps}"

        def counted(replies):
            return [(a, float(o.metrics["flops"])) for a, o in replies if o.metrics.get("flops", -1) >= 0]

        replied = list(accepted.values()) + rejected
        for a, flops in counted(replied):
            self.flops_by_submodel[size(a)] = flops
        estimates = [self.flops_by_submodel.get(size(a)) for a in failed]
        wasted = sum(f for _, f in counted(rejected)) + sum(e for e in estimates if e is not None)
        wasted_down = sum(nbytes(a.arrays) for a in failed) + sum(nbytes(a.arrays) for a, _ in rejected)
        return {
            "flops": sum(f for _, f in counted(accepted.values())) + wasted,
            "wasted_flops": wasted,
            "uncounted_replies": len(replied) - len(counted(replied)),
            "unestimated_failures": sum(e is None for e in estimates),
            "bytes_down": sum(nbytes(a.arrays) for a in assignments),
            "bytes_up": sum(nbytes(o.updates) for _, o in replied),
            "wasted_bytes": wasted_down + sum(nbytes(o.updates) for _, o in rejected),
        }

    @staticmethod
    def _problems(record: dict) -> str:
        parts = [f"{record[k]} {k}" for k in ("failures", "rejected") if record[k]]
        return f" ({', '.join(parts)})" if parts else ""

    # ------------------------------------------------------------------ evaluation, stopping, messages

    def _evaluate(self, q: int) -> None:
        """Validation: the task's metrics on "val", ``evaluate_fn``'s, and (``run.federated_eval``) the clients'
        as ``client_*``; the model of the best validation metric so far is kept for the final test."""
        start = time.perf_counter()
        with part_threads(self.evaluation_threads):
            metrics = self.task.evaluate(self.state.x, self.state.y, self.device, "val")
        extra = self.evaluate_fn(q, self.state.x, self.state.y) if self.evaluate_fn else None
        clash = sorted(set(extra or {}) & set(metrics))
        if clash:
            raise ValueError(f"evaluate_fn returned metrics the task's evaluation already has: {clash}")
        metrics |= extra or {}
        if self.scenario.run.federated_eval:
            metrics |= {f"client_{k}": v for k, v in self.runner.evaluate_clients(q, self.state.x, self.state.y).items()}
        self.writer.log({"iteration": q, "phase": "eval", **metrics, "eval_time": time.perf_counter() - start})
        key = self.task.main_metric
        if self.kept is None or self._score(metrics[key]) > self._score(self.kept[1]):
            copy = lambda tensors: {k: v.detach().clone() for k, v in tensors.items()}  # noqa: E731
            self.kept = (q, metrics[key], copy(self.state.x), copy(self.state.y))

    def _test(self) -> None:
        """The test split, read once: on the model of the best validation evaluation (the one kept)."""
        start = time.perf_counter()
        q, value, x, y = self.kept
        with part_threads(self.evaluation_threads):
            metrics = self.task.evaluate(x, y, self.device, "test")
        self.writer.log({"iteration": q, "phase": "test", "kept_by": self.task.main_metric, self.task.main_metric: value,
                         **metrics, "eval_time": time.perf_counter() - start})
        self.logger.info(f"test: {self.task.test_metric} {metrics[self.task.test_metric]:.4f} of the model kept at "
                         f"iteration {q} ({self.task.main_metric} {value:.4f})")

    def _evaluations(self) -> list[dict]:
        return [r for r in self.writer.records if r["phase"] == "eval"]

    def _score(self, value: float) -> float:
        return validation_score(value, self.task.higher_is_better)

    def _patience_exhausted(self) -> bool:
        """True once ``run.patience`` evaluations in a row failed to beat the best by ``run.min_delta``
        (beat: exceed, or for a task whose main metric is an error, fall below)."""
        run, key = self.scenario.run, self.task.main_metric
        if not run.patience:
            return False
        best, since = -math.inf, 0
        for record in self._evaluations():
            if self._score(record[key]) > best + run.min_delta:
                best, since = self._score(record[key]), 0
            else:
                since += 1
        return since >= run.patience

    def _progress(self, q: int, first: int, started: float) -> None:
        total = self.scenario.algorithm.iterations
        elapsed = time.perf_counter() - started
        left = elapsed / (q - first + 1) * (total - q)
        latest = self._evaluations()[-1]
        key = self.task.main_metric
        self.logger.info(f"iteration {q}/{total} | elapsed {format_duration(elapsed)} | left at most {format_duration(left)} | "
                         f"{key} {latest[key]:.4g} (iteration {latest['iteration']})")

    def _summary(self, last: int, wall: float, stopped_early: bool) -> None:
        records, key = self.writer.records, self.task.main_metric
        evals = self._evaluations()
        phases = [r for r in records if r["phase"] not in ("eval", "test", "done")]
        flops, wasted = sum(r["flops"] for r in phases), sum(r["wasted_flops"] for r in phases)
        uncounted = sum(r.get("uncounted_replies", 0) for r in phases)
        uncounted = f"; {uncounted} replies without a FLOP count" if uncounted else ""
        traffic = sum(r["bytes_down"] + r["bytes_up"] for r in phases)
        p2p = sum(r.get("bytes_p2p", 0) for r in phases)
        p2p = f" ({p2p / 1e6:.1f} MB peer-to-peer)" if p2p else ""
        stop = f"stopped early at iteration {last}" if stopped_early else f"{last} iterations"
        self.logger.info(f"done: {stop} in {format_duration(wall)}; {key} {evals[0][key]:.4g} (iteration "
                         f"{evals[0]['iteration']}) -> {evals[-1][key]:.4g} (iteration {evals[-1]['iteration']}); "
                         f"cost {flops:.3g} FLOPs ({wasted:.3g} wasted{uncounted}), {traffic / 1e6:.1f} MB sent and "
                         f"received{p2p}; results in {self.writer.directory}")


def _fraction(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


class PlainRunner:
    """The plain engine: the clients run in this process one after another, or, with
    ``run.workers`` > 1, in a pool of that many worker processes.

    A client is made when it is sampled (1,000 clients cost what the sampled ones cost); what a
    client keeps between iterations (:class:`ClientState`) is held here per partition, for the
    partitions that kept something, handed to the client (in a worker: sent there and back) and
    checkpointed by the loop. A client that raises is a failure (as a ClientApp exception is
    in Flower); one that injected faults held back longer than ``run.phase_timeout`` is dropped as
    late, as Flower would stop waiting for it (its computation counts as instant: see :func:`call_client`). Clients run with the thread count the process had when the
    runner was made, not the server's. Workers decide both the same way (a worker that dies fails
    the clients it had), and every client computes the same numbers wherever it runs (its data
    and random choices are seeded by iteration and partition), so the records are those of a
    sequential run at the workers' torch thread count: each worker takes an equal share of the
    clients' threads, at least one. Workers are spawned on the first phase (each builds the
    scenario's task once, then serves every phase) and stopped by :meth:`close`.
    """

    def __init__(self, scenario: Scenario, task: BilevelTask, device: torch.device):
        from clients import Client

        self.scenario = scenario
        self.client = lambda partition: Client(task, scenario, partition, device)
        self.client_threads = torch.get_num_threads()
        self.device = device
        self.pool: ProcessPoolExecutor | None = None
        self.client_states: dict[int, ClientState] = {}

    def partitions(self, iteration: int) -> dict[int, float | None]:
        return dict.fromkeys(range(self.scenario.clients.num))

    def run_phase(self, phase_round: PhaseRound) -> None:
        if self.scenario.run.workers == 1:
            with torch_threads(self.client_threads):
                outcomes = [self._run_client(phase_round, a) for a in phase_round.assignments]
        else:
            outcomes = self._run_in_workers(phase_round)
        phase_round.finish(outcomes)  # the server's work, on the server's threads

    def _run_client(self, phase_round: PhaseRound, a: Assignment) -> Outcome:
        state = self.client_states.get(a.partition, ClientState())
        outcome = call_client(self.client(a.partition), phase_round.phase.name, phase_round.iteration, a.arrays,
                              self.scenario.run.phase_timeout, state, a.submodel)
        self._hold(a.partition, state)
        return outcome

    def _hold(self, partition: int, state: ClientState) -> None:
        """Hold what the client of ``partition`` keeps (partitions that keep nothing cost nothing)."""
        if state.tensors:
            self.client_states[partition] = state

    def _run_in_workers(self, phase_round: PhaseRound) -> list[Outcome]:
        assignments, workers = phase_round.assignments, self.scenario.run.workers
        if self.pool is None:
            threads = max(1, self.client_threads // workers)
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.scenario, self.device, threads))
        try:
            futures = [self.pool.submit(_worker_phase, a.partition, phase_round.phase.name, phase_round.iteration,
                                        _to_numpy(a.arrays), self.scenario.run.phase_timeout, a.submodel,
                                        _state_to_numpy(self.client_states.get(a.partition, ClientState())))
                       for a in assignments]
            replies = [_reply(f) for f in futures]
        except BrokenProcessPool as err:  # the pool broke before this phase: no client got its work
            replies = [err] * len(assignments)
        if any(isinstance(r, BrokenProcessPool) for r in replies):
            self.close()  # a broken pool serves nothing more; the next phase spawns a fresh one
        outcomes = []
        for a, reply in zip(assignments, replies):
            if isinstance(reply, BrokenProcessPool):
                outcomes.append(Outcome(a.partition, error=f"worker process died: {reply!r}"))
            else:
                outcome, state = reply
                self._hold(a.partition, state)
                outcomes.append(outcome)
        return outcomes

    def evaluate_clients(self, iteration: int, x: Tensors, y: Tensors) -> dict[str, float]:
        replies = []
        with torch_threads(self.client_threads):
            for partition in range(self.scenario.clients.num):
                try:
                    replies.append(self.client(partition).evaluate(x, y))
                except Exception as err:  # noqa: BLE001 - as a ClientApp's exception, left out of the mean
                    LOGGER.warning(f"iteration {iteration} evaluation: partition {partition} failed: {err!r}")
        return mean_client_metrics(replies)

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def call_client(client, phase: str, iteration: int, arrays: dict[str, Tensors], timeout: float,
                state: ClientState | None = None, submodel: str = "") -> Outcome:
    """One client's phase as the loop sees it: its reply, or why there is none (it raised, or was late).

    Late means held back longer than ``timeout`` by the scenario's injected faults (``run.faults``:
    a sleep, a wait for a release file); the computation itself counts as instant, so a loaded or
    paused machine never changes a plain-engine run (under Flower, lateness is the real clock's).
    ``state`` (the partition's kept state, read on ``submodel``) is updated in place by a completed phase."""
    try:
        updates, metrics = client.run(phase, iteration, arrays, state, submodel)
    except Exception as err:  # noqa: BLE001 - a failing client is counted, never fatal
        return Outcome(client.partition, error=repr(err))
    if client.injected_delay > timeout:
        return Outcome(client.partition, error="late: held back longer than run.phase_timeout")
    return Outcome(client.partition, updates, metrics)


# Arrays cross to and from workers as numpy arrays, pickled by value (torch's own pickling would
# pass every tensor through shared memory and a file descriptor).

def _to_numpy(arrays: dict[str, Tensors]) -> dict[str, dict]:
    return {side: {k: v.numpy() for k, v in tensors.items()} for side, tensors in arrays.items()}


def _to_torch(arrays: dict[str, dict]) -> dict[str, Tensors]:
    return {side: {k: torch.from_numpy(v) for k, v in tensors.items()} for side, tensors in arrays.items()}


def _state_to_numpy(state: ClientState) -> tuple[str, dict]:
    return state.submodel, _to_numpy({"": state.tensors})[""]


def _state_to_torch(state: tuple[str, dict]) -> ClientState:
    return ClientState(state[0], _to_torch({"": state[1]})[""])


_WORKER: dict = {}  # in a worker process: the scenario's task, scenario and device, set once by _start_worker


def _reply(future: Future) -> tuple[Outcome, ClientState] | BrokenProcessPool:
    """A worker's outcome with torch updates and the client's state after the phase, or the error of a
    worker that died (killed, out of memory)."""
    try:
        outcome, state = future.result()
    except BrokenProcessPool as err:
        return err
    if outcome.updates is not None:
        outcome = Outcome(outcome.partition, _to_torch(outcome.updates), outcome.metrics)
    return outcome, _state_to_torch(state)


def _start_worker(scenario: Scenario, device: torch.device, threads: int) -> None:
    from .runtime import cached_task

    torch.set_num_threads(threads)
    # the task's training data load on the first client's batch; evaluation data stay unloaded
    _WORKER.update(task=cached_task(scenario), scenario=scenario, device=device)


def _worker_phase(partition: int, phase: str, iteration: int, arrays: dict[str, dict], timeout: float, submodel: str,
                  state: tuple[str, dict]) -> tuple[Outcome, tuple[str, dict]]:
    from clients import Client

    client = Client(_WORKER["task"], _WORKER["scenario"], partition, _WORKER["device"])
    kept = _state_to_torch(state)
    outcome = call_client(client, phase, iteration, _to_torch(arrays), timeout, kept, submodel)
    if outcome.updates is not None:
        outcome = Outcome(partition, _to_numpy(outcome.updates), outcome.metrics)
    return outcome, _state_to_numpy(kept)


def run_plain(scenario: Scenario, logger: logging.Logger = LOGGER) -> LoopResult:
    """Run ``scenario`` without Flower: the same loop, clients called in this process (or its workers)."""
    from .runtime import cached_task, choose_device

    task, device = cached_task(scenario), choose_device(scenario)
    runner = PlainRunner(scenario, task, device)
    try:
        return TrainingLoop(scenario, task, runner, device, logger).run()
    finally:
        runner.close()
