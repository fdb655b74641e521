"""SimFBO and ShroFBO (Yang, Xiao, Ji, "SimFBO: Towards Simple, Flexible and Communication-efficient
Federated Bilevel Learning", NeurIPS 2023, arXiv:2305.19442), and MemFBO (Yang, Xiao, Ma, Ji, "First-Order
Federated Bilevel Learning", AAAI 2025), on the one training loop, with submodels.

RECONSTRUCTED. What was read: the abstract ("one communication round per iteration", the lower
variable, the upper variable and a Hessian-inverse-vector variable "updated simultaneously", "a
generalized server-side aggregation and update", ShroFBO "resilient to system-level heterogeneity"
in local computation) and a review's summary. The algorithm boxes, step sizes and the exact
aggregation were not reached (NOTES.md section 4). Searched again (2026-12-03, sixth session): the only
full-text copy reachable from here (SPIQA's extracted paragraphs and raw TeX of arXiv 2305.19442v4)
gives the opening of the introduction only, up to the problem F = sum_i p_i f_i, G = sum_i p_i g_i
(client weights p_i; this project's are 1/n: every client weighs the same); reviews and abstract
pages add nothing, and no public code of SimFBO or ShroFBO was found. Assumed: SOBA-type local directions with x held
at the server's value during local steps, v and the directions evaluated at the local iterate,
no projection of v, server steps on the averaged accumulated directions (SimFBO), and FedNova-type
normalisation by each client's step count (ShroFBO).

One round per iteration, ``local``: the server sends (x, y, v); client i, with tau_i local steps
(``clients.local_steps``, else ``algorithm.inner_steps``), y_{i,0} = y, v_{i,0} = v, for k < tau_i:

    d^y_k = grad_y g_i(x, y_k)
    d^v_k = H_i(x, y_k) v_k - grad_y f_i(x, y_k)          (the gradient of 0.5 v'H_i v - v'grad_y f_i)
    d^x_k = grad_x f_i(x, y_k) - J_i(x, y_k) v_k          (J_i v = d/dx <grad_y g_i, v>)
    y_{k+1} = y_k - beta d^y_k,   v_{k+1} = v_k - gamma d^v_k

and replies the sums h^w = sum_k d^w_k for w = x, y, v (for y and v: (start - end) / step).
Server, with gamma = ``algorithm.v_step`` (0: beta, since v's problem has y's curvature H):

    SimFBO:   x <- x - alpha mean_i h^x_i,  y <- y - beta mean_i h^y_i,  v <- v - gamma mean_i h^v_i
    ShroFBO:  the same with each reply divided by tau_i and each step multiplied by tau_eff, the mean
              of tau_i over the partitions' profile (the sampled clients' mean in expectation)

So SimFBO's y and v are FedAvg of the local trajectories, and with tau_i = 1 one iteration is one
SOBA step on the mean functions. With unequal tau_i SimFBO weights client i by tau_i (its lower level
drifts to argmin sum_i tau_i g_i); ShroFBO weights clients equally. Each local step costs one
gradient of g and of f and two second-order products (H_i v and J_i v from one graph).

MemFBO, RECONSTRUCTED. What was read: the abstract only ("fully single-loop structure with all
involved variables updated simultaneously", "only first-order gradient information for all local
updates", memory- and computation-efficient, linear speedup under partial participation); the full
text (AAAI 39(21):22029-22037) was not reachable from here (rechecked in the sixth session: a stored
text copy gives its abstract and the first lines of its introduction only; no public code found): its algorithm box (hence its number), step
sizes and the form of its first-order products were not read. Assumed: SimFBO's round above (one
round per iteration, x, y and v together), with its two second-order products replaced by a central
difference of the first-order gradient of g along v (the finite-difference products of the first
author's Hessian-free FdeHBO, Yang, Xiao, Ji, NeurIPS 2023):

    (J_i v_k, H_i v_k) ~ (grad_(x,y) g_i(x, y_k + h v_k) - grad_(x,y) g_i(x, y_k - h v_k)) / (2h),
    h = ``algorithm.fd_probe`` / ||v_k||   (the probe moves y by fd_probe whatever the size of v)

so each local step costs three gradients of g and one of f and builds no second-order graph (on a
quadratic g the difference is exact: MemFBO then takes SimFBO's steps). Aggregation as SimFBO's.

State: the server keeps x, y and v (persistent, follows y's layout and submodel, checkpointed);
clients keep nothing. Submodels: x on the client's x-plan, y and v on its y-plan, coverage-counted.
"""

from __future__ import annotations

import torch

from ..hypergrad import Vec, _central_difference, _Oracle, axpy
from ..protocol import LOCAL
from .base import Algorithm, ClientJob, LocalResult, Phase, Side


def v_step(algo) -> float:
    """gamma: ``algorithm.v_step``, or beta where it is 0."""
    return algo.v_step or algo.beta


class SimFBO(Algorithm):
    """SimFBO (``normalised=False``), ShroFBO (``normalised=True``) or, with ``first_order=True``,
    MemFBO; see the module docstring."""

    default_mask = "importance"

    def __init__(self, name: str, normalised: bool, first_order: bool = False):
        self.name, self.normalised, self.first_order = name, normalised, first_order

    def phases(self, scenario):
        algo, num = scenario.algorithm, scenario.clients.num
        scale = sum(scenario.local_steps(p) for p in range(num)) / num if self.normalised else 1.0  # tau_eff
        return [Phase(LOCAL, ("x", "y", "v"), {"x": algo.alpha * scale, "y": algo.beta * scale,
                                               "v": v_step(algo) * scale}, "lower_loss")]

    def sides(self, scenario):
        return (Side("v", "y", persistent=True),)

    def run(self, phase, job):
        if phase != LOCAL:
            raise ValueError(f"{self.name} has no phase {phase!r}")
        return local_directions(job, self.normalised, job.scenario.algorithm.fd_probe if self.first_order else 0.0)


def lower_products(oracle: _Oracle, xs: Vec, ys: Vec, v: Vec, probe: float) -> tuple[Vec, Vec]:
    """(H v, J v) of the oracle's g at (x, y): by double backward (``probe`` 0), or, first-order only,
    as a central difference of grad_(x,y) g along v that moves y by ``probe`` (MemFBO)."""
    if not probe:
        hvp_yy, hvp_xy = oracle.second_order(xs, ys)
        return hvp_yy(v), hvp_xy(v)
    both = _central_difference(lambda h: sum(oracle.grad_xy("lower", xs, axpy(h, v, ys)), []), v, probe)
    return both[len(xs):], both[:len(xs)]


def local_directions(job: ClientJob, normalised: bool, probe: float = 0.0, steps: int = 0) -> LocalResult:
    """The client's tau_i joint steps on (y, v) at the server's x, and the summed directions
    (``probe`` > 0: MemFBO's first-order products, :func:`lower_products`; ``steps`` (0: tau_i) = 1
    gives the directions at the point sent, SLDBO's client work)."""
    algo, task, meter = job.scenario.algorithm, job.task, job.meter
    steps = steps or job.local_steps
    batch = task.client_batch(job.partition, job.iteration, job.device, steps)
    x_names, y_names = list(job.x), list(job.y)
    xs = [job.x[n].detach() for n in x_names]
    y_k = [job.y[n].detach() for n in y_names]
    v_k = [job.sides["v"][n].detach() for n in y_names]
    sums = {"x": [torch.zeros_like(t) for t in xs], "y": [torch.zeros_like(t) for t in y_k],
            "v": [torch.zeros_like(t) for t in v_k]}
    losses = []
    for lower in batch.lower_steps:
        def upper_loss(xs_, ys_):
            return task.upper_loss(dict(zip(x_names, xs_)), dict(zip(y_names, ys_)), batch.upper)

        def lower_loss(xs_, ys_, lower=lower):
            return task.lower_loss(dict(zip(x_names, xs_)), dict(zip(y_names, ys_)), lower)

        oracle = _Oracle(upper_loss, lower_loss, xs, y_k, meter)
        fx, fy = oracle.grad_xy("upper", xs, y_k)
        gy = oracle.grad("lower", xs, y_k, "y")
        hv, jv = lower_products(oracle, xs, y_k, v_k, probe)
        with torch.no_grad():
            losses.append(meter.unit("lower.value", oracle.signature, lambda: float(lower_loss(xs, y_k))))
        directions = {"x": [a - b for a, b in zip(fx, jv)], "y": gy, "v": [a - b for a, b in zip(hv, fy)]}
        for side, d in directions.items():
            sums[side] = [s + t for s, t in zip(sums[side], d)]
        y_k = [y - algo.beta * d for y, d in zip(y_k, directions["y"])]
        v_k = [v - v_step(algo) * d for v, d in zip(v_k, directions["v"])]
    scale = 1.0 / steps if normalised else 1.0
    names = {"x": x_names, "y": y_names, "v": y_names}
    updates = {side: {n: (scale * t).detach() for n, t in zip(names[side], sums[side])} for side in sums}
    return LocalResult(updates, {"lower_loss_start": losses[0], "lower_loss": losses[-1], "examples": batch.examples,
                                 "v_residual": float(sum(float(t.pow(2).sum()) for t in directions["v"]) ** 0.5)})
