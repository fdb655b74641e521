"""AggITD (Xiao, Ji, "Communication-Efficient Federated Hypergradient Computation via Aggregated Iterative
Differentiation", ICML 2023, arXiv:2302.04969) on the one training loop, with submodels.

RECONSTRUCTED. What was read: the abstract (the hypergradient by iterative differentiation (ITD) of the
lower-level FedAvg rounds, "conducting the federated hypergradient estimation and the lower-level
optimization simultaneously", so it takes no communication rounds beyond the lower level's, where
AID methods such as FedNest add rounds of global Hessian-vector products). The full text (arXiv
2302.04969, PMLR 202:38059-38086) was not reachable from here: its algorithm boxes, hence their
numbers, its step sizes and the exact order of its products were not read, and none is quoted
here (rechecked in the sixth session: abstract pages only; no stored full text, no public code). Assumed: the ITD products are accumulated in the order of the
forward pass, along the same local steps and in the same rounds as FedAvg on y, on a vector u that
the server aggregates with y every round (the "aggregated" part: global products without rounds of
their own), started from grad_y f at the iteration's y; x is held at the server's value for the
whole iteration and stepped once, after the last round.

One global iteration at the server's (x, y), N = ``algorithm.inner_rounds`` rounds ``local.1`` ..
``local.N`` (``local`` when N = 1); client i with tau_i local steps (``clients.local_steps``, else
``algorithm.inner_steps``), g_i, f_i its lower and upper losses, H_i = d^2 g_i / dy^2 and
J_i u = d/dx <grad_y g_i, u>, round t on block t of the iteration's batches:

    y_0 = y^t,  u_0 = u^t  (round 1: u_0 = grad_y f_i(x, y^1),  d_0 = grad_x f_i(x, y^1);  else d_0 = 0)
    for k < tau_i:   d_{k+1} = d_k - beta J_i(x, y_k) u_k
                     u_{k+1} = u_k - beta H_i(x, y_k) u_k
                     y_{k+1} = y_k - beta grad_y g_i(x, y_k)
    reply: (y^t - y_tau) / beta (stepped: y^{t+1} = y^t - beta mean(reply), FedAvg),
           u_tau (assigned: u^{t+1}), d_tau (assigned to d, added to the server's h; t < N)
    last round: d_tau is the reply of x, and x <- x - alpha (h + mean_i d_tau,i)

so the server's hypergradient is grad_x f - sum_{t,k} beta J u_{t,k}: with shared Hessians (H, J)
u_{t,k} = (I - beta H)^{k'} grad_y f after k' = (t - 1) tau + k steps, and the sum is
grad_x f - J [beta sum_{k' < N tau} (I - beta H)^{k'}] grad_y f, the ITD (and the truncated Neumann)
hypergradient of N tau lower-level steps, whose error (1 - beta lambda_min(H))^(N tau) vanishes
with the rounds. Each local step costs one gradient of g and two second-order products (H u and
J u from one graph); round 1 adds one gradient of f.

Rounds per iteration: N, the lower level's own (FedNest: 2T + N + 2). State: the server keeps x and
y, and within an iteration u (follows y), d and h (follow x; h the running sum of the rounds' d),
zero again at the start of each iteration; clients keep nothing (u and y travel with each round).
Submodels: x, d, h on the client's x-plan, y and u on its y-plan, each element averaged over the
clients holding it; h sums, per element, the rounds' coverage means.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..hypergrad import _Oracle
from ..protocol import LOCAL
from .base import Algorithm, ClientJob, LocalResult, Phase, Side
from .fednest import XY, numbered, round_index

if TYPE_CHECKING:
    from ..federation import ServerState


class AggITD(Algorithm):
    """AggITD; see the module docstring."""

    name = "aggitd"
    default_mask = "importance"

    def phases(self, scenario):
        algo, rounds = scenario.algorithm, scenario.algorithm.inner_rounds
        phases = [Phase(numbered(LOCAL, t, rounds), XY + (("u",) if t > 1 else ()), {"y": algo.beta}, "lower_loss",
                        assigns=("u", "d")) for t in range(1, rounds)]
        return phases + [Phase(numbered(LOCAL, rounds, rounds), XY + (("u",) if rounds > 1 else ()),
                               {"x": algo.alpha, "y": algo.beta}, "lower_loss")]

    def sides(self, scenario):
        return (Side("u", "y"), Side("d", "x"), Side("h", "x")) if scenario.algorithm.inner_rounds > 1 else ()

    def after_phase(self, phase: Phase, state: "ServerState", scenario) -> None:
        """h <- h + d after every round but the last; after the last, x <- x - alpha h (the rounds' part
        of the hypergradient; the last round's own part was stepped with the replies)."""
        if scenario.algorithm.inner_rounds == 1:
            return
        h = state.tensors["h"]
        if "d" in phase.assigns:
            state.tensors["h"] = {n: h[n] + state.tensors["d"][n] for n in h}
        else:
            state.tensors["x"] = {n: t - scenario.algorithm.alpha * h[n] for n, t in state.tensors["x"].items()}

    def run(self, phase, job):
        if not phase.startswith(LOCAL):
            raise ValueError(f"{self.name} has no phase {phase!r}")
        return aggitd_round(job, round_index(phase), job.scenario.algorithm.inner_rounds)


def aggitd_round(job: ClientJob, t: int, rounds: int) -> LocalResult:
    """Round t of ``rounds``: tau_i FedAvg steps on y with the ITD products on u and d alongside."""
    algo, task, meter = job.scenario.algorithm, job.task, job.meter
    steps, beta = job.local_steps, algo.beta
    batch = task.client_batch(job.partition, job.iteration, job.device, steps * rounds)
    x_names, y_names = list(job.x), list(job.y)
    xs = [job.x[n].detach() for n in x_names]
    y_k = [job.y[n].detach() for n in y_names]

    def upper_loss(xs_, ys_):
        return task.upper_loss(dict(zip(x_names, xs_)), dict(zip(y_names, ys_)), batch.upper)

    def lower_loss_on(lower):
        return lambda xs_, ys_: task.lower_loss(dict(zip(x_names, xs_)), dict(zip(y_names, ys_)), lower)

    if t == 1:
        d_k, u_k = _Oracle(upper_loss, lower_loss_on(batch.lower), xs, y_k, meter).grad_xy("upper", xs, y_k)
    else:
        d_k, u_k = [torch.zeros_like(x) for x in xs], [job.sides["u"][n].detach() for n in y_names]
    losses = []
    for lower in batch.lower_steps[(t - 1) * steps:t * steps]:
        oracle = _Oracle(upper_loss, lower_loss_on(lower), xs, y_k, meter)
        gy = oracle.grad("lower", xs, y_k, "y")
        hvp_yy, hvp_xy = oracle.second_order(xs, y_k)
        hu, ju = hvp_yy(u_k), hvp_xy(u_k)
        with torch.no_grad():
            losses.append(meter.unit("lower.value", oracle.signature, lambda: float(oracle.losses["lower"](xs, y_k))))
        d_k = [d - beta * j for d, j in zip(d_k, ju)]
        u_k = [u - beta * h for u, h in zip(u_k, hu)]
        y_k = [y - beta * g for y, g in zip(y_k, gy)]
    updates = {"y": {n: ((job.y[n].detach() - y) / beta).detach() for n, y in zip(y_names, y_k)},
               "x" if t == rounds else "d": {n: d.detach() for n, d in zip(x_names, d_k)}}
    if t < rounds:
        updates["u"] = {n: u.detach() for n, u in zip(y_names, u_k)}
    return LocalResult(updates, {"lower_loss_start": losses[0], "lower_loss": losses[-1], "examples": batch.examples})
