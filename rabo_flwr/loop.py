"""The one training loop, Flower-free, that both engines drive.

Per global iteration: which partitions are available (the engine knows), a seeded sample of
them, their capacities and submodel plans, then every phase of the algorithm: slices out,
replies back (the engine moves them), reply checks (names, shapes, dtype, finite values, and
the divergence guard), coverage-counted steps, cost and coverage records. Then the evaluation
schedule, checkpoints, early stopping, a progress line, and at the end a summary.

An engine is a :class:`PhaseRunner`: the plain engine (:class:`PlainRunner`, below) calls the
clients in this process; the Flower engine (``strategies.PhaseStrategy``) turns each phase into
messages. Both hand back :class:`Outcome` objects, so everything else happens here, once.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from .aggregation import coverage_of
from .algorithms import ALGORITHMS, Phase
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .federation import ServerState, Tensors, check_update, divergent, sample_clients, update_rms
from .masks import scenario_policies
from .results import ResultsWriter
from .scenario import Scenario
from .tasks import BilevelTask

REQUIRED_METRICS = ("flops", "wall_time")
LOGGER = logging.getLogger("rabo_flwr")


@dataclass
class Assignment:
    """What one client is asked to do in a phase: its capacity and the slices it is sent."""

    partition: int
    capacity: float
    arrays: dict[str, Tensors]  # side -> slices


@dataclass
class Outcome:
    """A client's answer: its updates and metrics, or (``updates is None``) why it has none."""

    partition: int
    updates: dict[str, Tensors] | None = None  # side -> update slices
    metrics: dict = field(default_factory=dict)
    error: str = ""


class PhaseRunner(Protocol):
    """How an engine reaches the clients."""

    def partitions(self, iteration: int) -> dict[int, float | None]:
        """Partitions that can take part now, with the capacity each one announced (None: the scenario's)."""

    def run_phase(self, phase: Phase, iteration: int, assignments: list[Assignment]) -> list[Outcome]:
        """Send every assignment, return the outcomes (missing ones count as failed)."""


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
                 logger: logging.Logger = LOGGER):
        self.scenario = scenario
        self.task = task
        self.runner = runner
        self.device = device
        self.logger = logger
        self.algorithm = ALGORITHMS[scenario.algorithm.name]
        self.phases = self.algorithm.phases(scenario)
        self.trained: dict[str, dict[str, torch.Tensor]] = {}  # side -> name -> element ever stepped
        self.flops_by_submodel: dict[str, float] = {}  # "phase x_elements y_elements" -> FLOPs of one reply

    # ------------------------------------------------------------------ the run

    def run(self) -> LoopResult:
        scenario, run, algo = self.scenario, self.scenario.run, self.scenario.algorithm
        resumed = load_checkpoint(scenario.results_path) if run.resume else None  # before anything is written
        self.task.prepare()  # missing or corrupt data stops the run here, before any results are written
        writer = ResultsWriter(scenario.results_path, scenario, history=resumed.metrics if resumed else None)
        x, y = (resumed.x, resumed.y) if resumed else self.task.init_tensors(scenario.seed)
        self.state = ServerState(self.task.layouts, x, y, scenario_policies(scenario))
        self.trained = {s: {n: torch.zeros(t.shape, dtype=torch.bool) for n, t in self.state.tensors[s].items()}
                        for s in ("x", "y")}
        if resumed:
            self.trained, self.flops_by_submodel = resumed.state["trained"], resumed.state["flops_by_submodel"]
        self.writer = writer
        first = resumed.iteration + 1 if resumed else 1
        self.logger.info(f"{scenario.name}: {algo.name} on {scenario.task.name}, {scenario.clients.num} clients, "
                         f"up to {algo.iterations} iterations, results in {writer.directory}")
        started = time.perf_counter()
        if first == 1:
            self._evaluate(0)
        last, stopped_early = first - 1, False
        for q in range(first, algo.iterations + 1):
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
        wall = time.perf_counter() - started
        writer.save_model(self.state.x, self.state.y)
        writer.log({"phase": "done", "iteration": last, "wall_time": wall, "stopped_early": stopped_early})
        self._summary(last, wall, stopped_early)
        return LoopResult(self.state, writer.records, writer.directory)

    def _loop_state(self) -> dict:
        return {"trained": self.trained, "flops_by_submodel": self.flops_by_submodel}

    def _iteration(self, q: int) -> None:
        scenario = self.scenario
        available = self.runner.partitions(q)
        chosen = sample_clients(list(available), scenario.clients.fraction, scenario.seed, q)
        capacities = {p: available[p] if available[p] is not None else scenario.capacity(p, q) for p in chosen}
        self.state.plan_iteration(q, capacities)
        for phase in self.phases:
            start = time.perf_counter()
            assignments = [Assignment(p, capacities[p], self.state.slices(p, phase.sends)) for p in chosen]
            outcomes = self.runner.run_phase(phase, q, assignments)
            record = self._finish_phase(phase, q, assignments, outcomes, start)
            self.writer.log(record)
            side = next(iter(phase.steps))
            self.logger.info(f"iteration {q} {phase.name}: {record['clients_aggregated']}/{record['clients_sent']} "
                             f"aggregated{self._problems(record)}, {phase.loss}={record[phase.loss]:.4f}, "
                             f"C_{side}*={record[f'C_{side}*']}")

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
        for side, lr in phase.steps.items():
            counts = self.state.step(side, {p: o.updates[side] for p, (_, o) in accepted.items()}, lr)
            for name, count in counts.items():
                self.trained[side][name] |= count > 0
            coverage.update(coverage_of(counts).as_metrics(side))
        for side in phase.sends:
            if side not in phase.steps:
                coverage.update(self.state.planned_coverage(side).as_metrics(side))
        aggregation_time = time.perf_counter() - aggregation_start

        clients = [o.metrics | {"capacity": a.capacity, "bytes_down": nbytes(a.arrays), "bytes_up": nbytes(o.updates),
                                "update_rms": rms[p]} for p, (a, o) in sorted(accepted.items())]
        cost = self._cost(phase, assignments, accepted, rejected, failed)
        losses = [c[phase.loss] for c in clients]
        return {
            "iteration": q,
            "phase": phase.name,
            "clients_sent": len(assignments),
            "clients_aggregated": len(accepted),
            "failures": len(failed),
            "rejected": len(rejected),
            "rejected_divergent": len(diverged),
            phase.loss: sum(losses) / len(losses) if losses else math.nan,
            **coverage,
            **{f"trained_{side}": _fraction(self.trained[side]) for side in ("x", "y")},
            **cost,
            "negative_curvature_clients": sum(int(c.get("hg_negative_curvature", 0)) for c in clients),
            "client_wall_time_max": max((c["wall_time"] for c in clients), default=0.0),
            "aggregation_time": aggregation_time,
            "wall_time": time.perf_counter() - started,
            "clients": clients,
        }

    def _problem(self, phase: Phase, partition: int, outcome: Outcome) -> str | None:
        """Why a reply must be rejected as malformed, or None."""
        extra = sorted(set(outcome.updates) - set(phase.steps))
        if extra:
            return f"updates for sides this phase does not step: {extra}"
        for side in phase.steps:
            problem = check_update(outcome.updates.get(side), self.state.expected_shapes(partition, side))
            if problem:
                return f"{side}: {problem}"
        missing = [k for k in (phase.loss, *REQUIRED_METRICS) if k not in outcome.metrics]
        return f"missing metrics {missing}" if missing else None

    def _cost(self, phase: Phase, assignments, accepted, rejected, failed) -> dict:
        """FLOPs and bytes of all work sent in a phase, and the part of it that was wasted.

        Replies carry their FLOPs, rejected ones too; a client that failed or timed out sends
        none, so its work is estimated from the last reply for a submodel of the same size in
        the same phase (``unestimated_failures`` counts those with no such reply yet).
        """
        def size(a: Assignment) -> str:
            return f"{phase.name} " + " ".join(str(sum(t.numel() for t in a.arrays.get(s, {}).values())) for s in ("x", "y"))

        replied = list(accepted.values()) + rejected
        if any(o.metrics.get("flops", -1) < 0 for _, o in replied):  # counting is off
            flops = wasted = -1.0
            unestimated = 0
        else:
            for a, o in replied:
                self.flops_by_submodel[size(a)] = float(o.metrics["flops"])
            estimates = [self.flops_by_submodel.get(size(a)) for a in failed]
            unestimated = sum(e is None for e in estimates)
            wasted = sum(float(o.metrics["flops"]) for _, o in rejected) + sum(e for e in estimates if e is not None)
            flops = sum(float(o.metrics["flops"]) for _, o in accepted.values()) + wasted
        wasted_down = sum(nbytes(a.arrays) for a in failed) + sum(nbytes(a.arrays) for a, _ in rejected)
        return {
            "flops": flops,
            "wasted_flops": wasted,
            "unestimated_failures": unestimated,
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
        start = time.perf_counter()
        metrics = self.task.evaluate(self.state.x, self.state.y, self.device)
        self.writer.log({"iteration": q, "phase": "eval", **metrics, "eval_time": time.perf_counter() - start})

    def _evaluations(self) -> list[dict]:
        return [r for r in self.writer.records if r["phase"] == "eval"]

    def _patience_exhausted(self) -> bool:
        """True once ``run.patience`` evaluations in a row failed to beat the best by ``run.min_delta``
        (beat: exceed, or for a task whose main metric is an error, fall below)."""
        run, key = self.scenario.run, self.task.main_metric
        if not run.patience:
            return False
        sign = 1.0 if self.task.higher_is_better else -1.0
        best, since = -math.inf, 0
        for record in self._evaluations():
            if sign * record[key] > best + run.min_delta:
                best, since = sign * record[key], 0
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
        phases = [r for r in records if r["phase"] not in ("eval", "done")]
        flops = sum(r["flops"] for r in phases) if all(r["flops"] >= 0 for r in phases) else -1
        wasted = sum(r["wasted_flops"] for r in phases) if flops >= 0 else -1
        traffic = sum(r["bytes_down"] + r["bytes_up"] for r in phases)
        stop = f"stopped early at iteration {last}" if stopped_early else f"{last} iterations"
        self.logger.info(f"done: {stop} in {format_duration(wall)}; {key} {evals[0][key]:.4g} (iteration "
                         f"{evals[0]['iteration']}) -> {evals[-1][key]:.4g} (iteration {evals[-1]['iteration']}); "
                         f"cost {flops:.3g} FLOPs ({wasted:.3g} wasted), {traffic / 1e6:.1f} MB sent and received; "
                         f"results in {self.writer.directory}")


def _fraction(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / total if total else 1.0


class PlainRunner:
    """The plain engine: the clients run in this process one after another, or, with
    ``run.workers`` > 1, in a pool of that many worker processes.

    A client that raises is a failure (as a ClientApp exception is in Flower); one whose phase
    took longer than ``run.phase_timeout`` is dropped as late, as Flower would stop waiting for it.
    Workers decide both the same way (a worker that dies fails the clients it had), and every
    client computes the same numbers wherever it runs (its data and random choices are seeded by
    iteration and partition), so the records are those of a sequential run at the workers' torch
    thread count: each worker takes an equal share of this process's threads, at least one.
    Workers are spawned on the first phase (each builds the scenario's task once, then serves
    every phase) and stopped by :meth:`close`.
    """

    def __init__(self, scenario: Scenario, task: BilevelTask, device: torch.device):
        from clients import Client

        self.scenario = scenario
        self.device = device
        self.clients = {p: Client(task, scenario, p, device) for p in range(scenario.clients.num)}
        self.pool: ProcessPoolExecutor | None = None

    def partitions(self, iteration: int) -> dict[int, float | None]:
        return {p: None for p in self.clients}

    def run_phase(self, phase: Phase, iteration: int, assignments: list[Assignment]) -> list[Outcome]:
        timeout = self.scenario.run.phase_timeout
        if self.scenario.run.workers == 1:
            return [call_client(self.clients[a.partition], phase.name, iteration, a.arrays, timeout) for a in assignments]
        if self.pool is None:
            threads = max(1, torch.get_num_threads() // self.scenario.run.workers)
            self.pool = ProcessPoolExecutor(max_workers=self.scenario.run.workers,
                                            mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.scenario, self.device, threads))
        try:
            futures = [self.pool.submit(_worker_phase, a.partition, phase.name, iteration, _to_numpy(a.arrays), timeout)
                       for a in assignments]
            replies = [_reply(f) for f in futures]
        except BrokenProcessPool as err:  # the pool broke before this phase: no client got its work
            replies = [err] * len(assignments)
        if any(isinstance(r, BrokenProcessPool) for r in replies):
            self.close()  # a broken pool serves nothing more; the next phase spawns a fresh one
        return [Outcome(a.partition, error=f"worker process died: {r!r}") if isinstance(r, BrokenProcessPool) else r
                for a, r in zip(assignments, replies)]

    def close(self) -> None:
        """Stop the worker processes, if any."""
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def call_client(client, phase: str, iteration: int, arrays: dict[str, Tensors], timeout: float) -> Outcome:
    """One client's phase as the loop sees it: its reply, or why there is none (it raised, or was late)."""
    start = time.perf_counter()
    try:
        updates, metrics = client.run(phase, iteration, arrays)
    except Exception as err:  # noqa: BLE001 - a failing client is counted, never fatal
        return Outcome(client.partition, error=repr(err))
    if time.perf_counter() - start > timeout:
        return Outcome(client.partition, error="late: took longer than run.phase_timeout")
    return Outcome(client.partition, updates, metrics)


# Arrays cross to and from workers as numpy arrays, pickled by value (torch's own pickling would
# pass every tensor through shared memory and a file descriptor).

def _to_numpy(arrays: dict[str, Tensors]) -> dict[str, dict]:
    return {side: {k: v.numpy() for k, v in tensors.items()} for side, tensors in arrays.items()}


def _to_torch(arrays: dict[str, dict]) -> dict[str, Tensors]:
    return {side: {k: torch.from_numpy(v) for k, v in tensors.items()} for side, tensors in arrays.items()}


_WORKER_CLIENTS: dict = {}  # in a worker process: partition -> Client, built once by _start_worker


def _reply(future: Future) -> Outcome | BrokenProcessPool:
    """A worker's outcome with torch updates, or the error of a worker that died (killed, out of memory)."""
    try:
        outcome = future.result()
    except BrokenProcessPool as err:
        return err
    return outcome if outcome.updates is None else Outcome(outcome.partition, _to_torch(outcome.updates), outcome.metrics)


def _start_worker(scenario: Scenario, device: torch.device, threads: int) -> None:
    from clients import Client

    from .runtime import cached_task

    torch.set_num_threads(threads)
    task = cached_task(scenario)  # its data load on the first client's batch; evaluation data stay unloaded
    _WORKER_CLIENTS.update({p: Client(task, scenario, p, device) for p in range(scenario.clients.num)})


def _worker_phase(partition: int, phase: str, iteration: int, arrays: dict[str, dict], timeout: float) -> Outcome:
    outcome = call_client(_WORKER_CLIENTS[partition], phase, iteration, _to_torch(arrays), timeout)
    return outcome if outcome.updates is None else Outcome(partition, _to_numpy(outcome.updates), outcome.metrics)


def run_plain(scenario: Scenario, logger: logging.Logger = LOGGER) -> LoopResult:
    """Run ``scenario`` without Flower: the same loop, clients called in this process (or its workers)."""
    from .runtime import cached_task, choose_device

    task, device = cached_task(scenario), choose_device(scenario)
    runner = PlainRunner(scenario, task, device)
    try:
        return TrainingLoop(scenario, task, runner, device, logger).run()
    finally:
        runner.close()
