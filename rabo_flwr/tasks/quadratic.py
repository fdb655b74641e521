"""A synthetic federated bilevel problem with heterogeneous clients and a known answer.

x is an (h, p) matrix and y an (h, q) matrix whose h rows form one channel group
("channels", owned by x, read by y): a client of capacity r holds ceil(r h) rows of both,
the same rows of each, and solves its problem on them, as a narrow network keeps some
channels. Every row j is a copy of one small problem, so a row's meaning is its values (as a
channel's is its weights) and no client needs to know which rows it holds. Client i has

    g_i(x, y) = sum_j  0.5 y_j' A_i y_j - y_j' (B_i x_j + c_i)             (lower, strongly convex in y)
    f_i(x, y) = sum_j  0.5 ||y_j - b_i||^2 + 0.5 mu ||x_j||^2              (upper)

with A_i (q x q) symmetric positive definite, B_i (q x p), c_i and b_i (q), mu = ``task.upper_l2``.
Clients differ in c_i and b_i (spread ``task.heterogeneity``) and, with
``task.hessian_heterogeneity`` > 0, in A_i and B_i too.

The federated problem is min_x F(x) = mean_i f_i(x, y*(x)), y*(x) = argmin_y mean_i g_i(x, y).
With means A, B, c, b over the clients, row by row:

    y*(x)_j  = A^-1 (B x_j + c)
    grad F_j = mu x_j + M' (y*(x)_j - b),   M = A^-1 B
    x*_j     = (M'M + mu I)^-1 M' (b - A^-1 c)       (the same for every row)

and ``x_error`` = ||x - x*|| / ||x*|| is the main metric (lower is better). A client's
estimators aim at its own hypergradient at (x, y): exact and neumann at
grad_x f_i - H_xy [H_yy]^-1 grad_y f_i = mu x_j + B_i' A_i^-1 (y_j - b_i); fd-coordinate at
grad_x f_i - beta H_xy grad_y f_i = mu x_j + beta B_i' (y_j - b_i) (:meth:`QuadraticTask.client_hypergradient`).

Averaging the clients' hypergradients is the gradient of F at y = y*(x) only when A_i and B_i
are shared (the hypergradient is then linear in the client's data), and local steps on g_i keep
y*(x) as their averaged fixed point only then too: with ``hessian_heterogeneity`` > 0 the
methods that average local hypergradients (rabo, rafbo, fedmbo) stop at a biased point. With
partial capacities, coverage-counted averaging makes row j follow the clients that hold it, so
a row held by a subset S of the clients converges to that subset's x*_S (README: what each
scenario reaches).
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import torch

from ..scenario import Scenario
from ..submodel import Layout
from .base import BilevelTask, ClientBatch, Tensors
from .fewshot import seeded_generator

GROUP = "channels"
DATA = torch.float64  # the clients' coefficients and the closed forms; losses run in the dtype of x and y


class ClientProblem(NamedTuple):
    """Client i's coefficients of g_i and f_i (the "batch" its losses read; a tuple, so the FLOP
    meter keys its work by the shapes inside)."""

    A: torch.Tensor
    B: torch.Tensor
    c: torch.Tensor
    b: torch.Tensor

    def to(self, device: torch.device) -> "ClientProblem":
        return ClientProblem(*(t.to(device) for t in self))


class QuadraticTask(BilevelTask):
    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        cfg = scenario.task
        self.rows, self.p, self.q, self.mu = cfg.channels, cfg.x_dim, cfg.y_dim, cfg.upper_l2
        self.x_layout = Layout(groups={GROUP: self.rows}, dims={"x": (GROUP, None)})
        self.y_layout = Layout(groups={}, dims={"y": (GROUP, None)})
        self.num_partitions = scenario.clients.num
        self.main_metric = self.test_metric = "x_error"  # distances to a known answer: no data split to hold out
        self.higher_is_better = False

    # ------------------------------------------------------------------ the problem

    @cached_property
    def problems(self) -> list[ClientProblem]:
        """Every client's coefficients, seeded by the scenario's seed.

        Shared part: A with eigenvalues evenly spread over [1, ``task.condition``] in a random
        basis, B with singular values evenly spread over [1, 2] (so M = A^-1 B is well conditioned),
        b with unit-variance entries. Per client: c_i and b_i - b of spread ``heterogeneity``;
        A_i = A + s W_i W_i' / q and B_i = B + s N_i / sqrt(p) with s = ``hessian_heterogeneity``.
        """
        cfg, p, q = self.scenario.task, self.p, self.q
        gen = seeded_generator(self.scenario.seed, 15_000)
        basis = torch.linalg.qr(torch.randn(q, q, generator=gen, dtype=DATA))[0]
        A = basis @ torch.diag(torch.linspace(1.0, cfg.condition, q, dtype=DATA)) @ basis.T
        left = torch.linalg.qr(torch.randn(q, q, generator=gen, dtype=DATA))[0][:, :min(p, q)]
        right = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=DATA))[0][:, :min(p, q)]
        B = left @ torch.diag(torch.linspace(1.0, 2.0, min(p, q), dtype=DATA)) @ right.T
        b = torch.randn(q, generator=gen, dtype=DATA)
        spread, s = cfg.heterogeneity, cfg.hessian_heterogeneity
        problems = []
        for _ in range(self.num_partitions):
            w = torch.randn(q, q, generator=gen, dtype=DATA)
            problems.append(ClientProblem(A + s * w @ w.T / q, B + s * torch.randn(q, p, generator=gen, dtype=DATA) / p**0.5,
                                          spread * torch.randn(q, generator=gen, dtype=DATA),
                                          b + spread * torch.randn(q, generator=gen, dtype=DATA)))
        return problems

    def mean_problem(self, clients: list[int] | None = None) -> ClientProblem:
        """The average of the clients' coefficients (all clients, or those listed)."""
        chosen = [self.problems[i] for i in (range(self.num_partitions) if clients is None else clients)]
        return ClientProblem(*(torch.stack(ts).mean(0) for ts in zip(*chosen)))

    def x_star(self, clients: list[int] | None = None) -> torch.Tensor:
        """The solution x* (h, p) of the federated problem of all clients (or of those listed)."""
        m = self.mean_problem(clients)
        M = torch.linalg.solve(m.A, m.B)
        row = torch.linalg.solve(M.T @ M + self.mu * torch.eye(self.p, dtype=DATA), M.T @ (m.b - torch.linalg.solve(m.A, m.c)))
        return row.expand(self.rows, self.p).clone()

    def y_star(self, x: torch.Tensor) -> torch.Tensor:
        """y*(x) = A^-1 (B x_j + c) row by row, for the mean problem."""
        m = self.mean_problem()
        return torch.linalg.solve(m.A, (x.to(DATA) @ m.B.T + m.c).T).T

    def objective(self, x: torch.Tensor) -> float:
        """F(x) = mean_i f_i(x, y*(x))."""
        y = self.y_star(x)
        return float(sum(self.upper_loss({"x": x.to(DATA)}, {"y": y}, c) for c in self.problems) / self.num_partitions)

    def client_hypergradient(self, partition: int, x: torch.Tensor, y: torch.Tensor, beta: float | None = None) -> torch.Tensor:
        """Client i's hypergradient at (x, y) in closed form: mu x_j + B_i' A_i^-1 (y_j - b_i), or
        with ``beta`` fd-coordinate's target, A_i^-1 replaced by beta I."""
        c = self.problems[partition]
        residual = (y.to(DATA) - c.b).T
        return self.mu * x.to(DATA) + (c.B.T @ (beta * residual if beta is not None else torch.linalg.solve(c.A, residual))).T

    # ------------------------------------------------------------------ the task interface

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        """x_0 and y_0 with standard normal entries (rows differ, as a network's channels do at initialisation)."""
        gen = seeded_generator(seed, 15_001)
        return ({"x": torch.randn(self.rows, self.p, generator=gen)}, {"y": torch.randn(self.rows, self.q, generator=gen)})

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        """The client's exact objective at every step (deterministic: no data are sampled)."""
        problem = self.problems[partition].to(device)
        return ClientBatch(lower_steps=[problem] * steps, lower=problem, upper=problem, examples=0)

    def lower_loss(self, x, y, batch: ClientProblem):
        Y, X = y["y"], x["x"]
        A, B, c = (t.to(Y.dtype) for t in (batch.A, batch.B, batch.c))
        return 0.5 * ((Y @ A) * Y).sum() - ((X @ B.T + c) * Y).sum()

    def upper_loss(self, x, y, batch: ClientProblem):
        Y, X = y["y"], x["x"]
        return 0.5 * (Y - batch.b.to(Y.dtype)).pow(2).sum() + 0.5 * self.mu * X.pow(2).sum()

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device, split: str) -> dict[str, float]:
        """x_error = ||x - x*|| / ||x*||, y_error = ||y - y*(x)|| / ||y*(x)||, F(x) - F(x*), on either
        split (they read no data)."""
        X, Y = x["x"].cpu().to(DATA), y["y"].cpu().to(DATA)
        target, y_target = self.x_star(), self.y_star(X)
        return {"x_error": float((X - target).norm() / target.norm()),
                "y_error": float((Y - y_target).norm() / y_target.norm()),
                "suboptimality": self.objective(X) - self.objective(target)}
