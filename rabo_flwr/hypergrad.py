"""Hypergradients of bilevel problems ``min_x f(x, y*(x))`` with ``y*(x) = argmin_y g(x, y)``.

Implicit differentiation gives, at a point ``(x, y)`` (exact when ``y = y*(x)``),

    dPhi/dx = grad_x f - H_xy [H_yy]^-1 grad_y f,    H_xy = d^2 g / dx dy,  H_yy = d^2 g / dy^2.

The estimators differ only in how they get ``v ~ [H_yy]^-1 grad_y f`` and the mixed product
``H_xy v``: with autograd second-order products (``exact``, ``neumann``) or with differences of
first-order gradients only (``fd-coordinate``, ``fd-directional``), which is what RABO/RAFBO
clients can afford. As in torchopt, the linear solvers only see a matrix-free ``matvec`` on
lists of tensors, so one Neumann solver serves autograd and finite-difference products alike.

Non-convex lower levels (a network's loss in its weights) have indefinite ``H_yy``, where
``[H_yy]^-1 grad_y f`` is not a hypergradient any more. The solvers detect it and stop in a
stated way instead of returning whatever the iteration produced:

- conjugate gradient stops at the first direction of non-positive curvature and returns the
  iterate it has, or, when that is the very first direction, the right-hand side itself
  (Nocedal & Wright, Numerical Optimization, 2nd ed., Alg. 7.1, line search Newton-CG, which
  then returns the steepest-descent direction: ``A`` taken as the identity);
- the Neumann series takes its step from a power-iteration estimate of the largest curvature
  (``step = 1 / lambda_max``, inside the convergence range ``(0, 2 / lambda_max)``) unless a
  step is given, and stops adding terms once they grow (which only negative curvature, or a
  step that is too long, makes them do).

Every estimator reports what it saw (iterations, residual, negative curvature, step) next to
the estimate. ``f`` is the ``upper`` callable and ``g`` the ``lower`` one; both take ``(x, y)``
as lists of tensors and return a scalar tensor.
"""

from __future__ import annotations

import bisect
import inspect
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .cost import CostMeter, shapes

Vec = list[Tensor]
Loss = Callable[[Vec, Vec], Tensor]
MatVec = Callable[[Vec], Vec]
Diagnostics = dict[str, float]


# --- vector operations on lists of tensors (one flat vector split over several shapes) ---


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two lists of tensors viewed as flat vectors.

    The per-tensor sums are added from the first (not from ``0`` as ``sum()`` would): the same
    value with one operation less, and a solver's small-client iteration is mostly such
    fixed per-operation costs.
    """
    parts = [(u * v).sum() for u, v in zip(a, b)]
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def axpy(alpha: float | Tensor, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vec:
    """``alpha * x + y`` (BLAS naming keeps the solver code short)."""
    return [alpha * u + v for u, v in zip(x, y)]


def scal(alpha: float | Tensor, x: Sequence[Tensor]) -> Vec:
    """``alpha * x``."""
    return [alpha * u for u in x]


def norm(x: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of the flat vector."""
    return dot(x, x).sqrt()


# --- linear solvers for A v = b, A given only as a matvec ---


def conjugate_gradient(matvec: MatVec, b: Sequence[Tensor], tol: float = 1e-10,
                       max_iter: int = 100, start: Sequence[Tensor] | None = None) -> tuple[Vec, Diagnostics]:
    """Solve ``A v = b`` by conjugate gradient from ``start`` (default 0), truncated at non-positive curvature.

    Stops once ``||b - A v|| <= tol * ||b||``, after ``max_iter`` products, or at the first
    search direction ``p`` with ``p'Ap <= 0`` (``A`` is not positive definite there): the
    iterate so far is returned, or ``b`` if that was the first direction from 0 (Nocedal & Wright,
    Alg. 7.1: steepest descent, as if ``A`` were the identity). A ``start`` (a warm start) costs one
    product more, for its residual ``b - A start``; the tolerance stays relative to ``||b||``, so a
    start near the solution saves steps; ``b = 0`` gives ``v = 0`` at once, from any start (a relative
    tolerance of 0 would ask a start's residual to vanish exactly). Diagnostics: ``iterations`` (CG steps
    taken), ``residual`` (``||b - A v|| / ||b||``), ``negative_curvature`` (1 if truncated by it), ``converged``.
    """
    b_norm = None if start is None else float(norm(b))
    if b_norm == 0:
        start = None
    v = [torch.zeros_like(t) for t in b] if start is None else list(start)
    r = list(b) if start is None else axpy(-1.0, matvec(v), b)
    p = r
    rr = dot(r, r)
    if start is None:  # r = b: its norm is ||b|| (one dot product less on the cold path, every client's solve)
        b_norm = float(rr.sqrt())
    steps, negative = 0, False
    for _ in range(max_iter):
        if float(rr.sqrt()) <= tol * b_norm:
            break
        ap = matvec(p)
        curvature = dot(p, ap)
        if not float(curvature) > 0:  # also catches NaN
            negative = True
            if steps == 0 and start is None:
                v, r = list(b), axpy(-1.0, ap, r)
                rr = dot(r, r)
            break
        alpha = rr / curvature
        v = axpy(alpha, p, v)
        r = [s - alpha * t for s, t in zip(r, ap)]  # r - alpha ap: the value of axpy(-alpha, ap, r), one op less
        rr, rr_old = dot(r, r), rr
        p = axpy(rr / rr_old, p, r)
        steps += 1
    residual = float(rr.sqrt()) / b_norm if b_norm > 0 else 0.0
    return v, {"iterations": float(steps), "residual": residual, "negative_curvature": float(negative),
               "converged": float(residual <= tol)}


def neumann_series(matvec: MatVec, b: Sequence[Tensor], K: int = 10, step: float = 0.1) -> tuple[Vec, Diagnostics]:
    """Approximate ``A^-1 b`` by ``step * sum_{k<K} (I - step A)^k b``, truncated where terms grow.

    Converges for ``0 < step < 2 / lambda_max(A)`` and positive definite ``A``, with error
    ``~ (1 - step lambda_min)^K``; costs ``K - 1`` products, none for ``K = 1`` (``v = step * b``,
    the one-step estimate). A term longer than the one before can only come from negative
    curvature or a step that is too long: the series stops before adding it. Diagnostics:
    ``iterations`` (terms summed), ``truncated`` (1 if stopped by a growing term), ``step``.
    """
    if K < 1:
        raise ValueError(f"Neumann series needs K >= 1, got K={K}")
    term = total = list(b)
    length = norm(term)
    terms, truncated = 1, False
    for _ in range(K - 1):
        term = axpy(-step, matvec(term), term)
        new_length = norm(term)
        if not new_length <= length:  # growing (or NaN): the series diverges from here
            truncated = True
            break
        total = axpy(1.0, term, total)
        length = new_length
        terms += 1
    return scal(step, total), {"iterations": float(terms), "truncated": float(truncated), "step": float(step)}


def power_iteration(matvec: MatVec, like: Sequence[Tensor], iterations: int = 10, seed: int = 0) -> tuple[float, float]:
    """``(|lambda|, rayleigh)`` of the eigenvalue of largest magnitude, by power iteration.

    Starts from a seeded random vector; ``rayleigh < 0`` means that eigenvalue is negative
    (the matrix is indefinite). Costs ``iterations`` products.
    """
    generator = torch.Generator().manual_seed(seed)
    u = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in like]
    u = scal(1 / norm(u), u)
    magnitude, rayleigh = 0.0, 0.0
    for _ in range(iterations):
        w = matvec(u)
        rayleigh = float(dot(u, w))
        length = norm(w)
        magnitude = float(length)
        if not magnitude > 0:
            break
        u = scal(1 / length, w)
    return magnitude, rayleigh


def safe_neumann_step(matvec: MatVec, like: Sequence[Tensor], iterations: int, seed: int) -> Diagnostics:
    """``step = 1 / lambda_max`` from power iteration, with what it measured.

    Power iteration approaches ``lambda_max`` from below, so ``1 / estimate`` stays below the
    divergence bound ``2 / lambda_max`` as long as the estimate reaches half of it.
    """
    magnitude, rayleigh = power_iteration(matvec, like, iterations, seed)
    step = 1.0 / magnitude if magnitude > 0 and math.isfinite(magnitude) else 0.0
    return {"step": step, "lambda_max": magnitude, "negative_curvature": float(rayleigh < 0)}


# --- differentiation ---


def _leaves(ts: Sequence[Tensor]) -> Vec:
    """Fresh leaves, so autograd never touches (or fills ``.grad`` of) the caller's tensors."""
    return [t.detach().requires_grad_(True) for t in ts]


def _grad(out: Tensor, inputs: Sequence[Tensor], **kwargs) -> Vec:
    """``torch.autograd.grad`` with zeros for inputs the output does not depend on."""
    if not out.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad(out, inputs, allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


def _vjp(outputs: Sequence[Tensor], vectors: Sequence[Tensor], inputs: Sequence[Tensor], **kwargs) -> Vec:
    """``d <outputs, vectors> / d inputs`` with ``vectors`` held fixed: one backward pass seeded with them.

    The same values as ``_grad(dot(outputs, vectors), inputs)``: the dot's backward hands each
    output exactly its vector (``1.0 * v``), so the rest of the pass is the same. Without the
    dot's forward and backward operations, which are a good part of a Hessian-vector product
    of a small head.
    """
    pairs = [(o, v) for o, v in zip(outputs, vectors) if o.requires_grad]
    if not pairs:
        return [torch.zeros_like(t) for t in inputs]
    grads = torch.autograd.grad([o for o, _ in pairs], inputs, [v for _, v in pairs], allow_unused=True, **kwargs)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]


class _Oracle:
    """Gradients of ``upper``/``lower`` at given points, counted, and metered by ``meter``.

    Every model evaluation runs as a named unit of a :class:`~rabo_flwr.cost.CostMeter`
    (when one is given), so its FLOPs are counted once per shape and reused after that.
    """

    def __init__(self, upper: Loss, lower: Loss, x: Vec, y: Vec, meter: CostMeter | None):
        self.losses = {"upper": upper, "lower": lower}
        self.meter = meter
        self.signature = shapes(x, y)
        self.stats = {"grad_evals": 0, "hvp_evals": 0}

    def _run(self, unit: str, work):
        return work() if self.meter is None else self.meter.unit(unit, self.signature, work)

    def grad(self, loss: str, x: Vec, y: Vec, wrt: str) -> Vec:
        """Gradient of ``loss`` ("upper" or "lower") at ``(x, y)`` w.r.t. one side, ``wrt`` = "x" or "y"."""
        xs = _leaves(x) if wrt == "x" else x
        ys = _leaves(y) if wrt == "y" else y
        self.stats["grad_evals"] += 1
        return self._run(f"{loss}.grad_{wrt}", lambda: _grad(self.losses[loss](xs, ys), xs if wrt == "x" else ys))

    def grad_xy(self, loss: str, x: Vec, y: Vec) -> tuple[Vec, Vec]:
        """``(grad_x, grad_y)`` of ``loss`` at ``(x, y)`` from one backward pass."""
        xs, ys = _leaves(x), _leaves(y)
        self.stats["grad_evals"] += 1
        g = self._run(f"{loss}.grad_xy", lambda: _grad(self.losses[loss](xs, ys), xs + ys))
        return g[: len(xs)], g[len(xs):]

    def second_order(self, x: Vec, y: Vec) -> tuple[MatVec, MatVec]:
        """``u -> H_yy u`` and ``v -> H_xy v`` of ``lower`` by double backward.

        Both differentiate ``<grad_y g, .>`` through one retained graph of ``grad_y g`` (as
        vector-Jacobian products seeded with the vector, :func:`_vjp`).
        """
        xs, ys = _leaves(x), _leaves(y)
        self.stats["grad_evals"] += 1
        gy = self._run("lower.grad_y_graph", lambda: _grad(self.losses["lower"](xs, ys), ys, create_graph=True))

        def product(wrt: Vec, unit: str) -> MatVec:
            def matvec(u: Vec) -> Vec:
                self.stats["hvp_evals"] += 1
                return self._run(unit, lambda: _vjp(gy, u, wrt, retain_graph=True))
            return matvec

        return product(ys, "lower.hvp_yy"), product(xs, "lower.hvp_xy")


def _central_difference(grad_at: Callable[[Tensor], Vec], direction: Vec, size: float) -> Vec:
    """Derivative of ``grad_at(t)`` at ``t = 0`` by ``(grad_at(h) - grad_at(-h)) / (2h)``.

    ``h = size / ||direction||`` so the probe moves the point by ``size`` whatever the scale
    of ``direction`` (a tiny ``v`` would otherwise drown in round-off).
    """
    h = size / norm(direction).clamp_min(torch.finfo(direction[0].dtype).tiny)
    return scal(1 / (2 * h), axpy(-1.0, grad_at(-h), grad_at(h)))


def _shift(x: Vec, i: int, j: int, delta: float) -> Vec:
    """Copy of ``x`` whose tensor ``i`` has flat (row-major) element ``j`` moved by ``delta``."""
    t = x[i].clone(memory_format=torch.contiguous_format)
    t.view(-1)[j] += delta
    return x[:i] + [t] + x[i + 1:]


def _sample_coords(num_coords: int | str, dim: int, seed: int) -> Sequence[int]:
    """The coordinate set ``P`` (sorted, without replacement; all when ``num_coords >= dim``)."""
    if num_coords == "all":
        return range(dim)
    if isinstance(num_coords, bool) or not isinstance(num_coords, int) or num_coords < 1:
        raise ValueError(f"num_coords must be 'all' or a positive int, got {num_coords!r}")
    if num_coords >= dim:
        return range(dim)
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(dim, generator=generator)[:num_coords].tolist())


def _neumann_inverse(hvp: MatVec, b: Vec, K: int, step: float | None, power_iters: int, seed: int) -> tuple[Vec, Diagnostics]:
    """Neumann series with the given step, or a safe one from power iteration (``step=None``)."""
    if step is None:
        measured = safe_neumann_step(hvp, b, power_iters, seed)
        if measured["step"] == 0.0:  # no curvature measured: nothing to invert
            return [torch.zeros_like(t) for t in b], measured | {"iterations": 0.0, "truncated": 1.0}
        v, info = neumann_series(hvp, b, K, measured["step"])
        return v, measured | info
    v, info = neumann_series(hvp, b, K, step)
    return v, info | {"lambda_max": math.nan}


def _warm_start(memory: dict[str, Vec] | None, warm_start: bool, b: Vec) -> Vec | None:
    """Where the solve for ``u ~ [H_yy]^-1 grad_y f`` starts: with ``warm_start``, from the previous
    call's ``u`` kept in ``memory`` (None on the first call: from 0, as without it). A kept ``u`` that is
    not finite (a solve that diverged) is no start: from it every later solve would return NaN."""
    if not warm_start:
        return None
    if memory is None:
        raise ValueError("warm_start needs a memory that keeps u between calls (hypergradient_with_stats(memory=...))")
    start = memory.get("u")
    if start is not None and [t.shape for t in start] != [t.shape for t in b]:
        raise ValueError(f"warm_start: the kept u has shapes {[tuple(t.shape) for t in start]}, "
                         f"grad_y f {[tuple(t.shape) for t in b]}")
    return start if start is not None and all(bool(torch.isfinite(t).all()) for t in start) else None


def _keep(memory: dict[str, Vec] | None, warm_start: bool, start: Vec | None, u: Vec) -> Diagnostics:
    """Keep ``u`` in ``memory`` for the next call's warm start; the diagnostic ``warm_started``
    (1: this solve started from a kept u, 0: from 0). Nothing without ``warm_start``."""
    if not warm_start:
        return {}
    memory["u"] = [t.detach() for t in u]
    return {"warm_started": float(start is not None)}


# --- estimators: (oracle, x, y, **options) -> (hypergradient, diagnostics); options are keyword-only; those
# with a warm_start option take the memory of hypergradient_with_stats as a fourth argument ---


def _exact(oracle: _Oracle, x: Vec, y: Vec, memory: dict[str, Vec] | None = None, *, tol: float = 1e-10,
           max_iter: int = 100, damping: float = 0.0, warm_start: bool = False) -> tuple[Vec, Diagnostics]:
    """Implicit differentiation, ``(H_yy + damping I) v = grad_y f`` by truncated CG: the reference.

    On a strongly convex lower level this is the hypergradient to the solver's tolerance; where
    ``H_yy + damping I`` has non-positive curvature CG stops there (see the module docstring).
    ``warm_start`` (ours, as ``curvature``'s): CG starts from the previous call's solution.
    """
    fx, fy = oracle.grad_xy("upper", x, y)
    hvp_yy, hvp_xy = oracle.second_order(x, y)
    matvec = hvp_yy if damping == 0 else lambda u: axpy(damping, u, hvp_yy(u))  # 0 * u + w is w
    start = _warm_start(memory, warm_start, fy)
    v, info = conjugate_gradient(matvec, fy, tol, max_iter, start)
    return axpy(-1.0, hvp_xy(v), fx), info | {"damping": float(damping)} | _keep(memory, warm_start, start, v)


def _neumann(oracle: _Oracle, x: Vec, y: Vec, *, K: int = 10, step: float | None = None,
             power_iters: int = 10, seed: int = 0) -> tuple[Vec, Diagnostics]:
    """Implicit differentiation with FedMBO's K-term Neumann inverse on autograd products.

    ``step=None`` (default) takes ``1 / lambda_max`` from ``power_iters`` products of power
    iteration (seeded by ``seed``), so the series converges wherever ``H_yy`` is positive definite.
    """
    fx, fy = oracle.grad_xy("upper", x, y)
    hvp_yy, hvp_xy = oracle.second_order(x, y)
    v, info = _neumann_inverse(hvp_yy, fy, K, step, power_iters, seed)
    return axpy(-1.0, hvp_xy(v), fx), info


def _fd_coordinate(oracle: _Oracle, x: Vec, y: Vec, *, num_coords: int | str = "all",
                   mu: float = 1e-3, difference: str = "forward", scale: float | None = None,
                   beta: float = 0.01, seed: int = 0, weight: str = "paper") -> tuple[Vec, Diagnostics]:
    """RAFBO's Algorithm 2: ``grad_x f + scale * sum_{p in P} <delta_p, grad_y f> e_p``.

    ``delta_p ~ d grad_y g / dx_p`` is a forward or central difference of ``grad_y g`` in
    coordinate ``p`` of the flattened ``x`` (step ``mu``), so only first-order gradients are
    used: one ``grad_y g`` per perturbed point, the base gradient shared by all coordinates.
    With ``num_coords < dim`` a random ``P`` (``seed``) is drawn. ``weight="paper"`` (default)
    corrects only the sampled coordinates, as Algorithm 2 does; ``weight="unbiased"`` multiplies
    the correction by ``dim / |P|``, which makes it unbiased over ``P`` but, with ``|P|`` far
    below ``dim``, very noisy (benchmarks/README.md).

    Scale: the paper's Algorithm 2 uses scale s = +1, which amounts to approximating
    ``[H_yy]^-1`` by ``-I`` (wrong sign: it points uphill). The one-step-unrolled Jacobian
    ``dy_1/dx = -beta * H_yx`` of ``y_1 = y - beta grad_y g(x, y)`` gives s = -beta
    (DARTS-style approximation, ``[H_yy]^-1 ~ beta I``), so the default ``scale=None``
    means ``-beta``.
    """
    if difference not in ("forward", "central"):
        raise ValueError(f"difference must be 'forward' or 'central', got {difference!r}")
    if weight not in ("paper", "unbiased"):
        raise ValueError(f"weight must be 'paper' or 'unbiased', got {weight!r}")
    fx, fy = oracle.grad_xy("upper", x, y)
    starts = [0]
    for t in x:
        starts.append(starts[-1] + t.numel())
    coords = _sample_coords(num_coords, starts[-1], seed)
    factor = starts[-1] / len(coords) if weight == "unbiased" else 1.0

    def probe(i: int, j: int, delta: float) -> Tensor:
        """``<grad_y g(x + delta e_p, y), grad_y f>``: all the coordinate loop needs."""
        return dot(oracle.grad("lower", _shift(x, i, j, delta), y, "y"), fy)

    if difference == "forward":
        base = dot(oracle.grad("lower", x, y, "y"), fy)
    mixed = [t.new_zeros(t.numel()) for t in x]
    for p in coords:
        i = bisect.bisect_right(starts, p) - 1
        j = p - starts[i]
        if difference == "forward":
            mixed[i][j] = (probe(i, j, mu) - base) / mu
        else:
            mixed[i][j] = (probe(i, j, mu) - probe(i, j, -mu)) / (2 * mu)
    s = -beta if scale is None else scale
    estimate = axpy(s * factor, [m.view(t.shape) for m, t in zip(mixed, x)], fx)
    return estimate, {"iterations": float(len(coords)), "scale": float(s * factor)}


def _fd_directional(oracle: _Oracle, x: Vec, y: Vec, *, inverse: str = "neumann", K: int = 10,
                    step: float | None = None, power_iters: int = 10, seed: int = 0, mu: float = 1e-3,
                    eps: float = 1e-3) -> tuple[Vec, Diagnostics]:
    """Second-order-free full-vector estimate ``grad_x f - H_xy v``.

    ``v ~ [H_yy]^-1 grad_y f`` is a Neumann series (``inverse="neumann"``, ``K`` terms) whose
    products ``H_yy u`` are central differences of ``grad_y g`` along ``u`` (probe size
    ``eps``), or ``v = step * grad_y f`` (``inverse="one-step"``, i.e. ``K = 1``). ``step=None``
    takes ``1 / lambda_max`` from power iteration on the same difference products. ``H_xy v``
    is a central difference of ``grad_x g`` along ``v`` (probe size ``mu``).
    """
    if inverse not in ("neumann", "one-step"):
        raise ValueError(f"inverse must be 'neumann' or 'one-step', got {inverse!r}")
    fx, fy = oracle.grad_xy("upper", x, y)

    def hvp_yy(u: Vec) -> Vec:
        return _central_difference(lambda h: oracle.grad("lower", x, axpy(h, u, y), "y"), u, eps)

    v, info = _neumann_inverse(hvp_yy, fy, K if inverse == "neumann" else 1, step, power_iters, seed)
    if not any(bool(t.any()) for t in v):
        return fx, info
    mixed = _central_difference(lambda h: oracle.grad("lower", x, axpy(h, v, y), "x"), v, mu)
    return axpy(-1.0, mixed, fx), info


def _curvature(oracle: _Oracle, x: Vec, y: Vec, memory: dict[str, Vec] | None = None, *, solver: str = "cg",
               tol: float = 1e-10, max_iter: int = 100, K: int = 10, step: float | None = None, power_iters: int = 10,
               seed: int = 0, line_search: bool = True, warm_start: bool = False) -> tuple[Vec, Diagnostics]:
    """Curvature-aware hypergradient (Dong, Yang, Yao, Zhang, ICML 2025, arXiv 2505.02101; NBO).

    Implicit differentiation and a Newton step on the lower level share one Hessian
    ``H = H_yy(x, y)``. The paper's two steps, as implemented here:

    1. solve ``H v = grad_y g(x, y)`` and ``H u = grad_y f(x, y)`` inexactly, both with products
       of the same ``H`` (one graph of ``grad_y g`` at ``(x, y)``);
    2. ``d_x = grad_x f(x, y - v) - H_xy(x, y - v) u``: the estimate at the Newton point.

    ``v`` is the (inexact) Newton step of the lower level: from ``y`` within Newton's local region
    ``y - v`` is quadratically closer to ``y*(x)``, so the first-order term and the mixed product
    are evaluated near ``y*``; ``u`` keeps the right-hand side at ``y`` (as the paper's system
    does), so on a lower level quadratic in ``y`` whose ``grad_x f`` and ``H_xy`` do not depend
    on ``y`` the estimate equals ``exact``'s at ``(x, y)``.
    The paper solves the two systems as quadratic programs by ``T + 1`` gradient steps (NBO-GD)
    or by conjugate gradient (NBO-CG): ``solver="gd"`` takes ``K`` steps of size ``step`` from 0,
    which is the ``K``-term Neumann series (``step=None``: ``1 / lambda_max`` from power
    iteration, once for both systems; truncated where terms grow); ``solver="cg"`` is truncated
    CG (``tol``, ``max_iter``), stopping at non-positive curvature as ``exact`` does.

    Warm start: NBO starts the solve for ``u`` from the previous iteration's ``u`` (the solution
    moves little from one iteration to the next, so fewer solver steps reach the tolerance).
    ``warm_start=True`` does so: CG starts from the ``u`` kept in ``memory`` by the previous call
    (one product more, for the start's residual; the tolerance stays relative to ``||grad_y f||``),
    GD takes its ``K`` steps from it (``u + `` the ``K``-term series on the residual
    ``grad_y f - H u``, the same iterates); the first call starts from 0. In a federation the memory
    is the client's state (``ClientJob.state``): each client starts from the ``u`` of its own last
    outer phase, kept only while its submodel stays the same. Default off (``u`` from 0 every call).

    Not from the paper (reconstructed from its abstract and two summaries; the full text could
    not be read): NBO sets the lower level's next iterate to ``y - v``; here the estimator is one
    call at ``(x, y)`` (``y`` belongs to the inner phase, and the Newton point is used for the
    estimate only). ``line_search=True`` (ours) halves the Newton step, up to 10 times and then
    none, until ``g(x, y - t v) <= g(x, y)``: where ``H`` is indefinite or the step is too long
    the estimate is not taken at a point that climbed the lower level. On a strongly convex
    quadratic lower level the full step always passes, which is the paper's method.

    Diagnostics: those of the ``u`` solve (``iterations``, and ``residual``/``converged`` for CG,
    ``truncated``/``step``/``lambda_max`` for GD), ``negative_curvature`` (either CG solve; for GD
    the sign of power iteration's eigenvalue, as in ``neumann``),
    ``newton_iterations`` and ``newton_residual``/``newton_truncated`` (the ``v`` solve),
    ``newton_step`` (``t``), ``newton_norm`` (``t ||v||``, how far the lower level moved: an
    estimate of ``||y - y*(x)||``) and ``lower_decrease`` (``g(x, y) - g(x, y - t v)``); with
    ``warm_start``, ``warm_started`` (1 when ``u`` started from a kept one).
    """
    if solver not in ("cg", "gd"):
        raise ValueError(f"solver must be 'cg' or 'gd', got {solver!r}")
    fx, fy = oracle.grad_xy("upper", x, y)
    gy = oracle.grad("lower", x, y, "y")
    hvp_yy, hvp_xy = oracle.second_order(x, y)
    start = _warm_start(memory, warm_start, fy)
    info: Diagnostics = {}
    if solver == "gd" and step is None:
        measured = safe_neumann_step(hvp_yy, gy, power_iters, seed)
        step, info = measured["step"], measured
    if solver == "cg":
        v, newton = conjugate_gradient(hvp_yy, gy, tol, max_iter)
        u, solve = conjugate_gradient(hvp_yy, fy, tol, max_iter, start)
        solve["converged"] = float(solve["converged"] and newton["converged"])
        info |= solve | {"newton_iterations": newton["iterations"], "newton_residual": newton["residual"],
                         "negative_curvature": float(solve["negative_curvature"] or newton["negative_curvature"])}
    elif step > 0:
        v, newton = neumann_series(hvp_yy, gy, K, step)
        if start is None:
            u, solve = neumann_series(hvp_yy, fy, K, step)
        else:  # K gradient steps from the start: the start plus the series on its residual
            correction, solve = neumann_series(hvp_yy, axpy(-1.0, hvp_yy(start), fy), K, step)
            u = axpy(1.0, correction, start)
        info = {"lambda_max": math.nan, "negative_curvature": 0.0} | info | solve | {
            "newton_iterations": newton["iterations"], "newton_truncated": newton["truncated"]}
    else:  # power iteration measured no curvature: nothing to invert, no Newton step
        v, u = [torch.zeros_like(t) for t in gy], [torch.zeros_like(t) for t in fy]
        info |= {"iterations": 0.0, "truncated": 1.0, "newton_iterations": 0.0, "newton_truncated": 1.0}
    info |= _keep(memory, warm_start, start, u)

    def lower_value(point: Vec) -> float:
        with torch.no_grad():
            return float(oracle._run("lower.value", lambda: oracle.losses["lower"](x, point)))

    t, g0 = 1.0, lower_value(y)
    g_new = lower_value(axpy(-t, v, y))
    for _ in range(10 if line_search else 0):
        if g_new <= g0:
            break
        t /= 2
        g_new = lower_value(axpy(-t, v, y))
    if not g_new <= g0 and line_search:  # no step length lowers g: stay at y
        t, g_new = 0.0, g0
    if t > 0 and any(bool(w.any()) for w in v):
        y_new = axpy(-t, v, y)
        fx = oracle.grad("upper", x, y_new, "x")
        _, hvp_xy = oracle.second_order(x, y_new)
    info |= {"newton_step": t, "newton_norm": t * float(norm(v)), "lower_decrease": g0 - g_new}
    return axpy(-1.0, hvp_xy(u), fx), info


METHODS: dict[str, Callable[..., tuple[Vec, Diagnostics]]] = {
    "exact": _exact,
    "neumann": _neumann,
    "fd-coordinate": _fd_coordinate,
    "fd-directional": _fd_directional,
    "curvature": _curvature,
}


def method_options(method: str) -> list[str]:
    """The options an estimator takes (its keyword-only arguments)."""
    return [name for name, p in inspect.signature(METHODS[method]).parameters.items() if p.kind is p.KEYWORD_ONLY]


def hypergradient_with_stats(upper: Loss, lower: Loss, x: Sequence[Tensor], y: Sequence[Tensor],
                             method: str = "exact", meter: CostMeter | None = None,
                             memory: dict[str, Vec] | None = None, **options: Any) -> tuple[Vec, dict[str, float]]:
    """Hypergradient estimate, its cost and the estimator's diagnostics.

    Returns ``(grads, info)``: ``grads`` is a detached list shaped like ``x``; ``info`` has
    ``"grad_evals"`` (first-order gradient evaluations), ``"hvp_evals"`` (second-order autograd
    products) and the estimator's diagnostics (see each estimator). ``x`` and ``y`` are only
    read, through detached copies; ``meter`` (optional) counts the FLOPs of every evaluation.
    ``memory`` (estimators with a ``warm_start`` option): what the estimator keeps from one call to
    the next (``"u"``), read and updated in place. Raises ``ValueError`` for an unknown ``method``
    or option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; known: {sorted(METHODS)}")
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {allowed}")
    if memory is not None and "warm_start" not in allowed:
        raise ValueError(f"method {method!r} keeps no memory between calls (it has no warm_start option)")
    x, y = [t.detach() for t in x], [t.detach() for t in y]
    oracle = _Oracle(upper, lower, x, y, meter)
    with torch.enable_grad():  # callers often sit inside torch.no_grad() (e.g. server updates)
        grads, diagnostics = METHODS[method](oracle, x, y, *([] if memory is None else [memory]), **options)
    return [g.detach() for g in grads], {k: float(v) for k, v in oracle.stats.items()} | diagnostics


def hypergradient(upper: Loss, lower: Loss, x: Sequence[Tensor], y: Sequence[Tensor],
                  method: str = "exact", **options: Any) -> Vec:
    """Hypergradient estimate ``dPhi/dx`` at ``(x, y)`` by ``method`` (see ``METHODS``)."""
    return hypergradient_with_stats(upper, lower, x, y, method, **options)[0]
