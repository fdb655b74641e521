"""FedNest and LFedNest (Tarzanagh, Li, Thrampoulidis, Oymak, "FedNest: Federated Bilevel, Minimax,
and Compositional Optimization", ICML 2022, arXiv:2205.02215) on the one training loop, with submodels.

What was read: the authors' code, github.com/ucr-optml/FedNest (``core/ClientManage_hr.py``,
``core/Client_hr.py``, ``core/SVRGClient_hr.py``, ``utils/options.py``, ``main_hr.py``), and the
paper's abstract. The paper's algorithm boxes were not reached: the numbering (Algorithm 1 FedNest,
calling FedInn, FedOut and, inside FedOut, FedIHGP; Algorithm 5 LFedNest) is from the code's
structure and memory, not checked against the paper.

FedNest, one global iteration at the server's (x, y); g_i, f_i client i's lower and upper losses,
H_i = d^2 g_i / dy^2 and J_i v = d/dx <grad_y g_i, v> at (x, y), means over the sampled clients:

FedInn, T = ``algorithm.inner_rounds`` times (FedSVRG on y):
    round inner_grad[.t]: q = mean_i grad_y g_i(x, y)                                     (assigned)
    round inner[.t]:      y_{i,0} = y,  y_{i,k+1} = y_{i,k} - beta (grad_y g_i(x, y_{i,k}) - grad_y g_i(x, y) + q)
                          for k < tau_i, both gradients on step k's batch; reply (y - y_{i,tau_i}) / beta,
                          y <- y - beta mean(reply)
    (``inner_optimizer: sgd``: FedAvg, the inner round alone, as the code's ``--optim sgd``.)
FedIHGP, the inverse-Hessian-gradient product by N = ``neumann_terms`` rounds of global products:
    round ihgp_grad:  p_0 = mean_i grad_y f_i(x, y),  v = eta p_0                          (assigned)
    round ihgp.n:     p_n = p_{n-1} - eta mean_i H_i p_{n-1},  v <- v + eta p_n,   n = 1..N
    so v = eta sum_{n=0}^{N} (I - eta H)^n grad_y f ~ H^-1 grad_y f (H the mean Hessian).
FedOut:
    round hypergrad:  h = mean_i (grad_x f_i(x, y) - J_i v)
    round outer:      x_{i,0} = x,  x_{i,k+1} = x_{i,k} - alpha (grad_x f_i(x_{i,k}, y) - grad_x f_i(x, y) + h)
                      for k < tau_out = ``outer_steps``; reply (x - x_{i,tau_out}) / alpha, x <- x - alpha mean(reply)
    With tau_out = 1 every client's local step is x - alpha h, so the hypergrad round steps x itself
    (x <- x - alpha mean_i h_i) and the outer round is not sent.
Rounds per iteration: 2T + N + 2 (tau_out = 1) or 2T + N + 3; with sgd T + N + 2 or T + N + 3.

LFedNest (the local variant; the code's ``--hvp_method seperate``): FedInn as above (default sgd),
then one round outer: client i takes tau_out steps x_{i,k+1} = x_{i,k} - alpha h_i(x_{i,k}) with its
own hypergradient h_i = grad_x f_i - J_i v_i at (x_{i,k}, y), v_i = eta sum_{n=0}^{N} (I - eta H_i)^n
grad_y f_i (local products only, the ``neumann`` estimator with K = N + 1 terms and step eta), and
replies (x - x_{i,tau_out}) / alpha, or h_i itself when tau_out = 1: with T = tau_out = 1 and sgd
this is the ``fedmbo`` row with ``estimator_options: {K: N + 1, step: eta}``. Rounds: T + 1.

State: the server keeps x and y, and within an iteration q (follows y; svrg), p and v (follow y)
and h (follows x; tau_out > 1), zero again at the start of each iteration. Clients keep nothing:
each round sends what it needs (x and y with every round).

Where this differs from ucr-optml/FedNest's code (the paper's form was followed where they differ):
- The code's ``global_batch`` FedIHGP has each client power its *own* Hessian in a counter and
  averages a list of replies that is never reset; here each round forms the product with the
  server's p, as FedIHGP's global products are described (``NOTES``: on a two-client problem the
  code's form gives v = -0.673, this one -0.711, exact -0.8125).
- The Neumann step: the code uses its outer step (``hlr``) for it; here ``algorithm.neumann_step``,
  0 meaning alpha (the code's tie). The code's imbalance task drops eta from the indirect part;
  here v = eta * sum everywhere.
- q: the code averages a full pass over the client's data; here the client's lower-level batch of
  the iteration (``ClientBatch.lower``). The T FedInn rounds of an iteration take consecutive
  blocks of one draw of T * tau_i batches.
- The outer local steps re-evaluate only grad_x f_i and keep the indirect part frozen in h, as
  the code's ``hyper_svrg_update`` does (for the quadratic task J_i does not depend on x, so the
  two forms agree).

Submodels: every variable is sliced by the client's plan (q, p, v follow y's, h follows x's), the
client computes on its submodel (H_i and J_i of its submodel's losses), the server averages each
element over the clients holding it. Under partial coverage the server's Neumann operator
D^-1 sum_i P_i' H_i^sub P_i (D the coverage counts) is not symmetric; the series converges while
I - eta times it has spectral radius below 1.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..cost import shapes
from ..hypergrad import _Oracle, hypergradient_with_stats
from ..protocol import HYPERGRAD, IHGP, IHGP_GRAD, INNER, INNER_GRAD, OUTER, phase_kind
from .base import Algorithm, ClientJob, LocalResult, Phase, Side, leaves, loss_and_grads, scaled_change, sgd_step
from .bilevel import inner_phase, outer_phase, round_batches

if TYPE_CHECKING:
    from ..federation import ServerState
    from ..scenario import AlgorithmConfig

XY = ("x", "y")


def neumann_step(algo: "AlgorithmConfig") -> float:
    """eta: ``algorithm.neumann_step``, or alpha where it is 0 (ucr-optml/FedNest ties it to its outer step)."""
    return algo.neumann_step or algo.alpha


def numbered(kind: str, n: int, count: int) -> str:
    """A phase's name: the kind alone when it has one round per iteration, else "<kind>.<n>"."""
    return kind if count == 1 else f"{kind}.{n}"


def round_index(phase: str) -> int:
    """n of a phase named "<kind>.<n>" (1 for a lone "<kind>")."""
    return int(phase.partition(".")[2] or 1)


class FedNest(Algorithm):
    """FedNest (``local=False``) or LFedNest (``local=True``); see the module docstring."""

    default_mask = "importance"

    def __init__(self, name: str, local: bool, optimizer: str):
        self.name, self.local, self.default_optimizer = name, local, optimizer

    def optimizer(self, algo: "AlgorithmConfig") -> str:
        return algo.inner_optimizer or self.default_optimizer

    def phases(self, scenario):
        algo = scenario.algorithm
        rounds, svrg = algo.inner_rounds, self.optimizer(algo) == "svrg"
        phases = []
        for t in range(1, rounds + 1):
            if svrg:
                phases.append(Phase(numbered(INNER_GRAD, t, rounds), XY, {}, "", assigns=("q",)))
            phases.append(Phase(numbered(INNER, t, rounds), XY + ("q",) if svrg else XY, {"y": algo.beta}, "lower_loss"))
        if self.local:
            return phases + [Phase(OUTER, XY, {"x": algo.alpha}, "upper_loss")]
        phases.append(Phase(IHGP_GRAD, XY, {}, "", assigns=("p",)))
        eta = neumann_step(algo)
        phases += [Phase(f"{IHGP}.{n}", XY + ("p",), {"p": eta}, "") for n in range(1, algo.neumann_terms + 1)]
        if algo.outer_steps == 1:
            return phases + [Phase(HYPERGRAD, XY + ("v",), {"x": algo.alpha}, "upper_loss")]
        return phases + [Phase(HYPERGRAD, XY + ("v",), {}, "upper_loss", assigns=("h",)),
                         Phase(OUTER, XY + ("h",), {"x": algo.alpha}, "upper_loss")]

    def sides(self, scenario):
        algo = scenario.algorithm
        sides = [Side("q", "y")] if self.optimizer(algo) == "svrg" else []
        if not self.local:
            sides += [Side("p", "y"), Side("v", "y")] + ([Side("h", "x")] if algo.outer_steps > 1 else [])
        return tuple(sides)

    def after_phase(self, phase: Phase, state: "ServerState", scenario) -> None:
        """FedIHGP's sum: v = eta p_0 after ihgp_grad, v <- v + eta p_n after ihgp.n."""
        kind = phase_kind(phase.name)
        if kind not in (IHGP_GRAD, IHGP):
            return
        eta, p = neumann_step(scenario.algorithm), state.tensors["p"]
        v = state.tensors["v"] if kind == IHGP else {n: torch.zeros_like(t) for n, t in p.items()}
        state.tensors["v"] = {n: v[n] + eta * p[n] for n in p}

    # ------------------------------------------------------------------ the client's work

    def run(self, phase, job):
        algo, kind = job.scenario.algorithm, phase_kind(phase)
        if kind == INNER and self.optimizer(algo) == "sgd":
            return inner_phase(job, job.local_steps, algo.beta, round_index(phase), algo.inner_rounds)
        if kind == INNER:
            return svrg_inner(job, round_index(phase))
        if kind == OUTER and self.local:
            return local_outer(job)
        work = {INNER_GRAD: inner_gradient, IHGP_GRAD: upper_gradient_y, IHGP: hessian_product,
                HYPERGRAD: hypergradient, OUTER: svrg_outer}
        if kind not in work:
            raise ValueError(f"{self.name} has no phase {phase!r}")
        return work[kind](job)


def oracle(job: ClientJob) -> tuple[_Oracle, list, list, dict]:
    """Metered gradients and products of the client's f and g on its iteration's batches, x and y as
    lists in the order of their names, and the base metrics of a reply (``examples``)."""
    steps = job.local_steps * job.scenario.algorithm.inner_rounds  # the draw the inner rounds take their blocks from
    batch = job.task.client_batch(job.partition, job.iteration, job.device, steps)
    x_names, y_names = list(job.x), list(job.y)

    def upper_loss(xs, ys):
        return job.task.upper_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.upper)

    def lower_loss(xs, ys):
        return job.task.lower_loss(dict(zip(x_names, xs)), dict(zip(y_names, ys)), batch.lower)

    xs, ys = [job.x[n].detach() for n in x_names], [job.y[n].detach() for n in y_names]
    return _Oracle(upper_loss, lower_loss, xs, ys, job.meter), xs, ys, {"examples": batch.examples}


def upper_value(job: ClientJob, o: _Oracle, xs: list, ys: list) -> dict:
    """f_i at (x, y), metered, as the phase's ``upper_loss``."""
    with torch.no_grad():
        return {"upper_loss": job.meter.unit("upper.value", o.signature, lambda: float(o.losses["upper"](xs, ys)))}


def as_side(names, values) -> dict[str, torch.Tensor]:
    return {n: v.detach() for n, v in zip(names, values)}


def inner_gradient(job: ClientJob) -> LocalResult:
    """FedSVRG's global-gradient round: q_i = grad_y g_i(x, y)."""
    o, xs, ys, metrics = oracle(job)
    return LocalResult({"q": as_side(job.y, o.grad("lower", xs, ys, "y"))}, metrics)


def svrg_inner(job: ClientJob, t: int) -> LocalResult:
    """FedSVRG's local steps on the y-submodel with the server's q; reply (y_0 - y_tau) / beta."""
    algo, meter = job.scenario.algorithm, job.meter
    lower_steps, examples = round_batches(job, job.local_steps, t, algo.inner_rounds)
    x = {k: v.detach() for k, v in job.x.items()}
    anchor, y_k = leaves(job.y), leaves(job.y)
    q = [job.sides["q"][n] for n in job.y]
    losses = []
    for lower in lower_steps:
        objective = job.task.lower_objective(x, lower, meter)
        signature = shapes(x, y_k, lower)
        loss, grads = loss_and_grads(meter, "lower.inner_step", lambda: objective(y_k), list(y_k.values()), signature)
        _, anchored = loss_and_grads(meter, "lower.inner_step", lambda: objective(anchor), list(anchor.values()), signature)
        losses.append(loss)
        sgd_step(list(y_k.values()), [g - a + c for g, a, c in zip(grads, anchored, q)], algo.beta)
    return LocalResult({"y": scaled_change(job.y, y_k, algo.beta)},
                       {"lower_loss_start": losses[0], "lower_loss": losses[-1], "examples": examples})


def upper_gradient_y(job: ClientJob) -> LocalResult:
    """FedIHGP's first round: grad_y f_i(x, y), the right-hand side of the Neumann series."""
    o, xs, ys, metrics = oracle(job)
    return LocalResult({"p": as_side(job.y, o.grad("upper", xs, ys, "y"))}, metrics)


def hessian_product(job: ClientJob) -> LocalResult:
    """One FedIHGP round: H_i p with the server's p (its slice), H_i at (x, y)."""
    o, xs, ys, metrics = oracle(job)
    hvp_yy, _ = o.second_order(xs, ys)
    return LocalResult({"p": as_side(job.y, hvp_yy([job.sides["p"][n] for n in job.y]))}, metrics)


def hypergradient(job: ClientJob) -> LocalResult:
    """FedOut's hypergradient round: h_i = grad_x f_i(x, y) - J_i v with the server's v; it steps x
    itself (reply side x) when there is one local x-step, else it is assigned to h."""
    o, xs, ys, metrics = oracle(job)
    fx = o.grad("upper", xs, ys, "x")
    _, hvp_xy = o.second_order(xs, ys)
    mixed = hvp_xy([job.sides["v"][n] for n in job.y])
    side = "x" if job.scenario.algorithm.outer_steps == 1 else "h"
    return LocalResult({side: as_side(job.x, [a - b for a, b in zip(fx, mixed)])}, metrics | upper_value(job, o, xs, ys))


def svrg_outer(job: ClientJob) -> LocalResult:
    """FedOut's local x-steps with the server's h, the direct part re-evaluated (the code's
    ``hyper_svrg_update``); reply (x_0 - x_tau) / alpha."""
    algo = job.scenario.algorithm
    o, xs, ys, metrics = oracle(job)
    h = [job.sides["h"][n] for n in job.x]
    anchor = o.grad("upper", xs, ys, "x")
    x_k = list(xs)
    for _ in range(algo.outer_steps):
        direct = o.grad("upper", x_k, ys, "x")
        x_k = [x - algo.alpha * (d - a + c) for x, d, a, c in zip(x_k, direct, anchor, h)]
    return LocalResult({"x": scaled_change(job.x, dict(zip(job.x, x_k)), algo.alpha)}, metrics | upper_value(job, o, xs, ys))


def local_outer(job: ClientJob) -> LocalResult:
    """LFedNest's outer round: tau_out local steps along the client's own Neumann hypergradient
    (K = N + 1 terms, step eta), recomputed at each local x; tau_out = 1 replies that hypergradient."""
    algo = job.scenario.algorithm
    options = {"K": algo.neumann_terms + 1, "step": neumann_step(algo)}
    if algo.outer_steps == 1:
        return outer_phase(job, "neumann", options, job.local_steps * algo.inner_rounds)
    o, xs, ys, metrics = oracle(job)
    x_k, info = list(xs), {}
    for _ in range(algo.outer_steps):
        grads, info = hypergradient_with_stats(o.losses["upper"], o.losses["lower"], x_k, ys, "neumann",
                                               meter=job.meter, **options)
        x_k = [x - algo.alpha * g for x, g in zip(x_k, grads)]
    return LocalResult({"x": scaled_change(job.x, dict(zip(job.x, x_k)), algo.alpha)},
                       metrics | upper_value(job, o, xs, ys) | {f"hg_{k}": v for k, v in info.items()})
