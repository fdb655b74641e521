"""Hypergradients of bilevel problems ``min_x f(x, y*(x))`` with ``y*(x) = argmin_y g(x, y)``.

Implicit differentiation gives, at a point ``(x, y)`` (exact when ``y = y*(x)``),

    dPhi/dx = grad_x f - H_xy [H_yy]^-1 grad_y f,    H_xy = d^2 g / dx dy,  H_yy = d^2 g / dy^2.

The estimators differ only in how they get ``v ~ [H_yy]^-1 grad_y f`` and the mixed product
``H_xy v``: with autograd second-order products (``exact``, ``neumann``) or with differences of
first-order gradients only (``fd-coordinate``, ``fd-directional``), which is what RABO/RAFBO
clients can afford. As in torchopt, the linear solvers only see a matrix-free ``matvec`` on
lists of tensors, so one Neumann solver serves autograd and finite-difference products alike.

``f`` is the ``upper`` callable and ``g`` the ``lower`` one; both take ``(x, y)`` as lists of
tensors and return a scalar tensor.
"""

from __future__ import annotations

import bisect
import inspect
from typing import Callable, Sequence

import torch
from torch import Tensor

Vec = list[Tensor]
Loss = Callable[[Vec, Vec], Tensor]
MatVec = Callable[[Vec], Vec]


# --- vector operations on lists of tensors (one flat vector split over several shapes) ---


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two lists of tensors viewed as flat vectors."""
    return sum((u * v).sum() for u, v in zip(a, b))


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
                       max_iter: int = 100) -> Vec:
    """Solve ``A v = b`` for symmetric positive definite ``A`` by conjugate gradient.

    Stops once ``||b - A v|| <= tol * ||b||`` or after ``max_iter`` products: unlike Neumann it
    needs no step size and converges in about ``sqrt(cond(A))`` products.
    """
    v = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = r
    rr = dot(r, r)
    stop = tol**2 * rr
    for _ in range(max_iter):
        if rr <= stop:
            break
        ap = matvec(p)
        alpha = rr / dot(p, ap)
        v = axpy(alpha, p, v)
        r = axpy(-alpha, ap, r)
        rr, rr_old = dot(r, r), rr
        p = axpy(rr / rr_old, p, r)
    return v


def neumann_series(matvec: MatVec, b: Sequence[Tensor], K: int = 10, step: float = 0.1) -> Vec:
    """Approximate ``A^-1 b`` by ``step * sum_{k<K} (I - step A)^k b``.

    Converges for ``0 < step < 2 / lambda_max(A)`` with error ``~ (1 - step lambda_min)^K``;
    costs ``K - 1`` products, none for ``K = 1`` (``v = step * b``, the one-step estimate).
    """
    if K < 1:
        raise ValueError(f"Neumann series needs K >= 1, got K={K}")
    term = total = list(b)
    for _ in range(K - 1):
        term = axpy(-step, matvec(term), term)
        total = axpy(1.0, term, total)
    return scal(step, total)


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


class _Oracle:
    """Gradients of ``upper``/``lower`` at given points, counted for cost benchmarks."""

    def __init__(self, upper: Loss, lower: Loss):
        self.upper, self.lower = upper, lower
        self.stats = {"grad_evals": 0, "hvp_evals": 0}

    def grad(self, loss: Loss, x: Vec, y: Vec, wrt: str) -> Vec:
        """Gradient of ``loss`` at ``(x, y)`` w.r.t. one side, ``wrt`` = "x" or "y"."""
        xs = _leaves(x) if wrt == "x" else x
        ys = _leaves(y) if wrt == "y" else y
        self.stats["grad_evals"] += 1
        return _grad(loss(xs, ys), xs if wrt == "x" else ys)

    def grad_xy(self, loss: Loss, x: Vec, y: Vec) -> tuple[Vec, Vec]:
        """``(grad_x, grad_y)`` of ``loss`` at ``(x, y)`` from one backward pass."""
        xs, ys = _leaves(x), _leaves(y)
        self.stats["grad_evals"] += 1
        g = _grad(loss(xs, ys), xs + ys)
        return g[: len(xs)], g[len(xs):]

    def second_order(self, x: Vec, y: Vec) -> tuple[MatVec, MatVec]:
        """``u -> H_yy u`` and ``v -> H_xy v`` of ``lower`` by double backward.

        Both differentiate ``<grad_y g, .>`` through one retained graph of ``grad_y g``.
        """
        xs, ys = _leaves(x), _leaves(y)
        self.stats["grad_evals"] += 1
        gy = _grad(self.lower(xs, ys), ys, create_graph=True)

        def product(wrt: Vec) -> MatVec:
            def matvec(u: Vec) -> Vec:
                self.stats["hvp_evals"] += 1
                return _grad(dot(gy, u), wrt, retain_graph=True)
            return matvec

        return product(ys), product(xs)


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


def _sample_coords(num_coords: int | str, dim: int, seed: int) -> tuple[Sequence[int], float]:
    """Coordinates ``P`` (without replacement) and the weight ``dim / |P|`` that unbiases them."""
    if num_coords == "all":
        return range(dim), 1.0
    if isinstance(num_coords, bool) or not isinstance(num_coords, int) or num_coords < 1:
        raise ValueError(f"num_coords must be 'all' or a positive int, got {num_coords!r}")
    if num_coords >= dim:
        return range(dim), 1.0
    generator = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(dim, generator=generator)[:num_coords]
    return sorted(chosen.tolist()), dim / num_coords


# --- estimators: (oracle, x, y, **options) -> hypergradient; options are keyword-only ---


def _implicit(oracle: _Oracle, x: Vec, y: Vec, solve: Callable[[MatVec, Vec], Vec]) -> Vec:
    """``grad_x f - H_xy v`` with ``v = solve(H_yy, grad_y f)`` on autograd products."""
    fx, fy = oracle.grad_xy(oracle.upper, x, y)
    hvp_yy, hvp_xy = oracle.second_order(x, y)
    return axpy(-1.0, hvp_xy(solve(hvp_yy, fy)), fx)


def _exact(oracle: _Oracle, x: Vec, y: Vec, *, tol: float = 1e-10, max_iter: int = 100,
           damping: float = 0.0) -> Vec:
    """Implicit differentiation, ``(H_yy + damping I) v = grad_y f`` solved by CG: the reference."""
    return _implicit(oracle, x, y, lambda hvp, b: conjugate_gradient(
        lambda u: axpy(damping, u, hvp(u)), b, tol, max_iter))


def _neumann(oracle: _Oracle, x: Vec, y: Vec, *, K: int = 10, step: float = 0.1) -> Vec:
    """Implicit differentiation with FedMBO's K-term Neumann inverse on autograd products."""
    return _implicit(oracle, x, y, lambda hvp, b: neumann_series(hvp, b, K, step))


def _fd_coordinate(oracle: _Oracle, x: Vec, y: Vec, *, num_coords: int | str = "all",
                   mu: float = 1e-3, difference: str = "forward", scale: float | None = None,
                   beta: float = 0.01, seed: int = 0) -> Vec:
    """RAFBO's Algorithm 2: ``grad_x f + scale * sum_{p in P} <delta_p, grad_y f> e_p``.

    ``delta_p ~ d grad_y g / dx_p`` is a forward or central difference of ``grad_y g`` in
    coordinate ``p`` of the flattened ``x`` (step ``mu``), so only first-order gradients are
    used: one ``grad_y g`` per perturbed point, the base gradient shared by all coordinates.
    With ``num_coords < dim`` a random ``P`` (``seed``) is drawn and its term weighted by
    ``dim / num_coords``, which makes the estimate unbiased over ``P``.

    Scale: the paper's Algorithm 2 uses scale s = +1, which amounts to approximating
    ``[H_yy]^-1`` by ``-I`` (wrong sign: it points uphill). The one-step-unrolled Jacobian
    ``dy_1/dx = -beta * H_yx`` of ``y_1 = y - beta grad_y g(x, y)`` gives s = -beta
    (DARTS-style approximation, ``[H_yy]^-1 ~ beta I``), so the default ``scale=None``
    means ``-beta``.
    """
    if difference not in ("forward", "central"):
        raise ValueError(f"difference must be 'forward' or 'central', got {difference!r}")
    fx, fy = oracle.grad_xy(oracle.upper, x, y)
    starts = [0]
    for t in x:
        starts.append(starts[-1] + t.numel())
    coords, weight = _sample_coords(num_coords, starts[-1], seed)

    def probe(i: int, j: int, delta: float) -> Tensor:
        """``<grad_y g(x + delta e_p, y), grad_y f>``: all the coordinate loop needs."""
        return dot(oracle.grad(oracle.lower, _shift(x, i, j, delta), y, "y"), fy)

    if difference == "forward":
        base = dot(oracle.grad(oracle.lower, x, y, "y"), fy)
    mixed = [t.new_zeros(t.numel()) for t in x]
    for p in coords:
        i = bisect.bisect_right(starts, p) - 1
        j = p - starts[i]
        if difference == "forward":
            mixed[i][j] = (probe(i, j, mu) - base) / mu
        else:
            mixed[i][j] = (probe(i, j, mu) - probe(i, j, -mu)) / (2 * mu)
    s = -beta if scale is None else scale
    return axpy(s * weight, [m.view(t.shape) for m, t in zip(mixed, x)], fx)


def _fd_directional(oracle: _Oracle, x: Vec, y: Vec, *, inverse: str = "neumann", K: int = 10,
                    step: float = 0.1, mu: float = 1e-3, eps: float = 1e-3) -> Vec:
    """Second-order-free full-vector estimate ``grad_x f - H_xy v``.

    ``v ~ [H_yy]^-1 grad_y f`` is a Neumann series (``inverse="neumann"``, ``K`` terms) whose
    products ``H_yy u`` are central differences of ``grad_y g`` along ``u`` (probe size
    ``eps``), or ``v = step * grad_y f`` (``inverse="one-step"``, i.e. ``K = 1``; ``K`` is
    ignored). ``H_xy v`` is a central difference of ``grad_x g`` along ``v`` (probe size ``mu``).
    """
    if inverse not in ("neumann", "one-step"):
        raise ValueError(f"inverse must be 'neumann' or 'one-step', got {inverse!r}")
    fx, fy = oracle.grad_xy(oracle.upper, x, y)

    def hvp_yy(u: Vec) -> Vec:
        return _central_difference(
            lambda h: oracle.grad(oracle.lower, x, axpy(h, u, y), "y"), u, eps)

    v = neumann_series(hvp_yy, fy, K if inverse == "neumann" else 1, step)
    mixed = _central_difference(lambda h: oracle.grad(oracle.lower, x, axpy(h, v, y), "x"), v, mu)
    return axpy(-1.0, mixed, fx)


METHODS: dict[str, Callable[..., Vec]] = {
    "exact": _exact,
    "neumann": _neumann,
    "fd-coordinate": _fd_coordinate,
    "fd-directional": _fd_directional,
}


def method_options(method: str) -> list[str]:
    """The options an estimator takes (its keyword-only arguments)."""
    return [name for name, p in inspect.signature(METHODS[method]).parameters.items() if p.kind is p.KEYWORD_ONLY]


def hypergradient_with_stats(upper: Loss, lower: Loss, x: Sequence[Tensor], y: Sequence[Tensor],
                             method: str = "exact", **options) -> tuple[Vec, dict[str, int]]:
    """Hypergradient estimate and its cost.

    Returns ``(grads, stats)``: ``grads`` is a detached list shaped like ``x``; ``stats`` has
    ``"grad_evals"`` (first-order gradient evaluations) and ``"hvp_evals"`` (second-order
    autograd products). ``x`` and ``y`` are only read, through detached copies. Raises
    ``ValueError`` for an unknown ``method`` or option.
    """
    if method not in METHODS:
        raise ValueError(f"unknown hypergradient method {method!r}; known: {sorted(METHODS)}")
    estimator = METHODS[method]
    allowed = method_options(method)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; allowed: {allowed}")
    oracle = _Oracle(upper, lower)
    with torch.enable_grad():  # callers often sit inside torch.no_grad() (e.g. server updates)
        grads = estimator(oracle, [t.detach() for t in x], [t.detach() for t in y], **options)
    return [g.detach() for g in grads], dict(oracle.stats)


def hypergradient(upper: Loss, lower: Loss, x: Sequence[Tensor], y: Sequence[Tensor],
                  method: str = "exact", **options) -> Vec:
    """Hypergradient estimate ``dPhi/dx`` at ``(x, y)`` by ``method`` (see ``METHODS``)."""
    return hypergradient_with_stats(upper, lower, x, y, method, **options)[0]
