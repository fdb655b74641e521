"""RABO, RAFBO and FedMBO (two phases per iteration), and FedAvg of the lower level alone.

Inner phase: T SGD steps on g over the client's y-submodel, reply G = (y_0 - y_T) / beta; the
server sets y <- y - beta * coverage-mean(G). Outer phase: the client's hypergradient H on its
x-submodel at (x_q, y_{q+1}); the server sets x <- x - alpha * coverage-mean(H). The algorithms
differ in their estimator (rabo: ``exact``; rafbo: ``fd-coordinate``, Algorithm 2; fedmbo:
``neumann`` on the full model) and default masks.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..cost import shapes
from ..hypergrad import hypergradient_with_stats
from ..protocol import INNER, OUTER
from .base import Algorithm, ClientJob, LocalResult, Phase, leaves, loss_and_grads, scaled_change, sgd_step


def round_batches(job: ClientJob, steps: int, round_index: int = 1, rounds: int = 1) -> tuple[list[Any], int]:
    """The lower-level batches of the ``round_index``-th of ``rounds`` lower-level rounds of an iteration
    (``steps`` each, from one draw of ``rounds * steps``), and the examples of that draw."""
    batch = job.task.client_batch(job.partition, job.iteration, job.device, steps * rounds)
    return batch.lower_steps[(round_index - 1) * steps:round_index * steps], batch.examples


def inner_phase(job: ClientJob, steps: int, beta: float, round_index: int = 1, rounds: int = 1) -> LocalResult:
    """T SGD steps on g over the y-submodel; returns G = (y_0 - y_T) / beta.

    Correction to the paper: Algorithm 1 prints G = (y_T - y_0) / beta, which together with the
    server's y <- y - beta * avg(G) would move y *up* the lower-level loss. With
    G = (y_0 - y_T) / beta the server step reproduces the clients' descent. ``round_index`` of
    ``rounds``: which of several lower-level rounds of the iteration (FedNest's FedInn calls).
    """
    task, meter = job.task, job.meter
    lower_steps, examples = round_batches(job, steps, round_index, rounds)
    x = {k: v.detach() for k, v in job.x.items()}
    y_t = leaves(job.y)
    params = list(y_t.values())
    objectives: dict[int, Any] = {}  # per distinct batch (few-shot steps share their support set): g and its FLOP key
    losses = []
    for lower in lower_steps:
        if id(lower) not in objectives:
            objectives[id(lower)] = task.lower_objective(x, lower, meter), shapes(x, y_t, lower)
        objective, signature = objectives[id(lower)]
        loss, grads = loss_and_grads(meter, "lower.inner_step", lambda: objective(y_t), params, signature)
        losses.append(loss)
        sgd_step(params, grads, beta)
    return LocalResult({"y": scaled_change(job.y, y_t, beta)},
                       {"lower_loss_start": losses[0], "lower_loss": losses[-1], "examples": examples})


def outer_phase(job: ClientJob, estimator: str, options: Mapping[str, Any], steps: int) -> LocalResult:
    """The client's hypergradient H_i for its x-submodel at (x_q, y_{q+1}), with the estimator's diagnostics.

    With ``warm_start`` (``exact``, ``curvature``) the estimator's solve for u starts from the u this
    client kept at its last outer phase on the same submodel (``ClientJob.state``, entries ``u.<y name>``)
    and the new u is kept in its place."""
    task, meter = job.task, job.meter
    batch = task.client_batch(job.partition, job.iteration, job.device, steps)
    x_names, y_names = list(job.x), list(job.y)

    def upper(xs, ys):
        return task.upper_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.upper)

    def lower(xs, ys):
        return task.lower_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.lower)

    xs = [job.x[n].detach() for n in x_names]
    ys = [job.y[n].detach() for n in y_names]
    kept = [f"u.{n}" for n in y_names]
    memory = None
    if options.get("warm_start"):
        memory = {"u": [job.state[k] for k in kept]} if all(k in job.state for k in kept) else {}
    grads, info = hypergradient_with_stats(upper, lower, xs, ys, estimator, meter=meter, memory=memory, **options)
    with torch.no_grad():
        upper_value = meter.unit("upper.value", shapes(xs, ys, batch.upper), lambda: float(upper(xs, ys)))
    return LocalResult({"x": dict(zip(x_names, grads))},
                       {"upper_loss": upper_value, "examples": batch.examples, **{f"hg_{k}": v for k, v in info.items()}},
                       dict(zip(kept, memory["u"])) if memory else {})


def estimator_options(job: ClientJob) -> dict:
    """The scenario's estimator options, completed with what depends on the run.

    fd-coordinate's Jacobian scale defaults to -beta (see ``rabo_flwr.hypergrad``), so it needs
    the run's beta; random choices (coordinate samples, power-iteration starts) are seeded per
    iteration and client.
    """
    algo = job.scenario.algorithm
    estimator = algo.resolved_estimator
    options = dict(algo.estimator_options)
    if estimator == "fd-coordinate":
        options.setdefault("beta", algo.beta)
    if estimator != "exact":
        options.setdefault("seed", job.scenario.seed * 1_000_003 + job.iteration * 1009 + job.partition)
    return options


class Bilevel(Algorithm):
    """Two phases per global iteration: inner on y, outer on x."""

    segments = True

    def __init__(self, name: str, estimator: str, mask: str, full_model: bool = False):
        self.name, self.default_estimator, self.default_mask, self.full_model = name, estimator, mask, full_model

    def phases(self, scenario):
        algo = scenario.algorithm
        return [Phase(INNER, ("x", "y"), {"y": algo.beta}, "lower_loss"),
                Phase(OUTER, ("x", "y"), {"x": algo.alpha}, "upper_loss")]

    def client_state_key(self, scenario):
        return "algorithm.estimator_options.warm_start" if scenario.algorithm.estimator_options.get("warm_start") else ""

    def run(self, phase, job):
        algo = job.scenario.algorithm
        if phase == INNER:
            return inner_phase(job, algo.inner_steps, algo.beta)
        return outer_phase(job, algo.resolved_estimator, estimator_options(job), algo.inner_steps)


class LowerOnly(Algorithm):
    """FedAvg of the lower level with x held at its initial value: the untuned baseline of loss tuning.

    Only the inner phase runs (the same client work as RABO's), so y sees exactly the same data
    and steps as in the bilevel rows while x never moves.
    """

    name = "fedavg"
    default_mask = "rolling"
    segments = True

    def phases(self, scenario):
        return [Phase(INNER, ("x", "y"), {"y": scenario.algorithm.beta}, "lower_loss")]

    def run(self, phase, job):
        algo = job.scenario.algorithm
        return inner_phase(job, algo.inner_steps, algo.beta)
