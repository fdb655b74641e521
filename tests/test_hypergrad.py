"""Numerical tests of rabo_flwr.hypergrad against closed forms and autograd references."""


import pytest
import torch


from rabo_flwr.hypergrad import (METHODS, conjugate_gradient, hypergradient, hypergradient_with_stats,  # noqa: E402
                                 power_iteration)

DT = torch.float64
X_SHAPES = [(3, 2), (4,)]  # dim_x = 10
Y_SHAPES = [(2, 2), (3,)]  # dim_y = 7
DX, DY = 10, 7


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def split(v, shapes):
    out, start = [], 0
    for s in shapes:
        n = torch.Size(s).numel()
        out.append(v[start:start + n].reshape(s))
        start += n
    return out


def rel_err(a, b):
    a, b = flat(a) if isinstance(a, list) else a, flat(b) if isinstance(b, list) else b
    return ((a - b).norm() / b.norm()).item()


def cosine(a, b):
    return (torch.dot(a, b) / (a.norm() * b.norm())).item()


class Quadratic:
    """g = 0.5 y'Ay - y'Bx + 0.1 sum(sin x), f = 0.5||y - c||^2 + 0.5 x'Dx.

    A is SPD with eigenvalues in [1, 5], so y*(x) = A^-1 B x and
    dPhi/dx = D x + B'A^-1 (y* - c). The sin term depends on x only: it must not leak
    into any estimate. ``nonlinear`` adds x-y couplings (no closed form, but H_yy stays
    SPD with eigenvalues in [0.8, 5.2]) to give finite differences real curvature.
    """

    def __init__(self, seed=0, orthonormal_b=False, d_scale=1.0, nonlinear=False):
        gen = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(DY, DY, generator=gen, dtype=DT))
        self.A = q @ torch.diag(torch.linspace(1.0, 5.0, DY, dtype=DT)) @ q.T
        if orthonormal_b:  # B B' = I, used by the sign test
            self.B = torch.linalg.qr(torch.randn(DX, DY, generator=gen, dtype=DT))[0].T
        else:
            self.B = torch.randn(DY, DX, generator=gen, dtype=DT) / DX**0.5
        m = torch.randn(DX, DX, generator=gen, dtype=DT)
        self.D = d_scale * (m @ m.T / DX + 0.1 * torch.eye(DX, dtype=DT))
        self.c = torch.randn(DY, generator=gen, dtype=DT)
        self.x = torch.randn(DX, generator=gen, dtype=DT)
        self.nonlinear = nonlinear

    def lower(self, x, y):
        xf, yf = flat(x), flat(y)
        g = 0.5 * yf @ self.A @ yf - yf @ self.B @ xf + 0.1 * xf.sin().sum()
        if self.nonlinear:
            g = g + 0.1 * (xf[:DY].sin() * yf**2).sum()
        return g

    def upper(self, x, y):
        xf, yf = flat(x), flat(y)
        f = 0.5 * ((yf - self.c) ** 2).sum() + 0.5 * xf @ self.D @ xf
        if self.nonlinear:
            f = f + 0.1 * (xf[:DY].cos() * yf).sum()
        return f

    def y_star(self, xf):
        return torch.linalg.solve(self.A, self.B @ xf)

    def phi(self, xf):
        return self.upper([xf], [self.y_star(xf)]).item()

    def true_hypergrad(self, xf):
        return self.D @ xf + self.B.T @ torch.linalg.solve(self.A, self.y_star(xf) - self.c)

    def point(self, xf=None):
        """x and y = y*(x) as lists of differently shaped tensors."""
        xf = self.x if xf is None else xf
        return split(xf.clone(), X_SHAPES), split(self.y_star(xf), Y_SHAPES)


def autograd_parts(prob, x, y):
    """(grad_x f, H_xy grad_y f) by double backward: the fd-coordinate target's pieces."""
    xs = [t.detach().requires_grad_(True) for t in x]
    ys = [t.detach().requires_grad_(True) for t in y]
    fx = torch.autograd.grad(prob.upper(xs, ys), xs)
    fy = torch.autograd.grad(prob.upper(xs, ys), ys)
    gy = torch.autograd.grad(prob.lower(xs, ys), ys, create_graph=True)
    mixed = torch.autograd.grad(sum((a * b).sum() for a, b in zip(gy, fy)), xs)
    return flat(fx), flat(mixed)


def test_exact_matches_closed_form():
    prob = Quadratic()
    x, y = prob.point()
    h, stats = hypergradient_with_stats(prob.upper, prob.lower, x, y, "exact")
    assert [t.shape for t in h] == [t.shape for t in x]
    assert rel_err(h, prob.true_hypergrad(prob.x)) < 1e-5
    assert stats["grad_evals"] == 2 and 2 <= stats["hvp_evals"] <= DY + 2  # CG: <= dim steps


def test_exact_float32_and_under_no_grad():
    prob = Quadratic()
    x, y = prob.point()
    with torch.no_grad():
        h64 = hypergradient(prob.upper, prob.lower, x, y)
    assert rel_err(h64, prob.true_hypergrad(prob.x)) < 1e-5
    prob32 = Quadratic()
    for name in ("A", "B", "D", "c", "x"):
        setattr(prob32, name, getattr(prob, name).float())
    h32 = hypergradient(prob32.upper, prob32.lower, [t.float() for t in x],
                        [t.float() for t in y], tol=1e-6)
    assert all(t.dtype == torch.float32 for t in h32)
    assert rel_err([t.double() for t in h32], prob.true_hypergrad(prob.x)) < 1e-4


def test_exact_damping_solves_shifted_system():
    prob = Quadratic()
    x, y = prob.point()
    h = hypergradient(prob.upper, prob.lower, x, y, damping=2.0)
    shifted = prob.A + 2.0 * torch.eye(DY, dtype=DT)
    expected = prob.D @ prob.x + prob.B.T @ torch.linalg.solve(shifted, flat(y) - prob.c)
    assert rel_err(h, expected) < 1e-6


def test_neumann_error_decreases_with_K():
    prob = Quadratic()
    x, y = prob.point()
    true = prob.true_hypergrad(prob.x)
    errs = []
    for K in [1, 5, 20, 80]:
        h, stats = hypergradient_with_stats(prob.upper, prob.lower, x, y, "neumann", K=K,
                                            step=0.15)  # step < 1 / lambda_max(A) = 0.2
        assert stats["hvp_evals"] == K  # K - 1 for the series, 1 for the mixed term
        errs.append(rel_err(h, true))
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 1e-3 and errs[0] > 0.05, errs


@pytest.mark.parametrize("difference", ["forward", "central"])
@pytest.mark.parametrize("scale", [None, 1.0, -0.3])
def test_fd_coordinate_matches_its_target(difference, scale):
    """All coordinates, small mu: grad_x f + s H_xy grad_y f, on a non-quadratic problem."""
    prob = Quadratic(nonlinear=True)
    x, y = prob.point()
    fx, mixed = autograd_parts(prob, x, y)
    s = -0.05 if scale is None else scale
    h, stats = hypergradient_with_stats(prob.upper, prob.lower, x, y, "fd-coordinate",
                                        mu=1e-5, difference=difference, scale=scale, beta=0.05)
    assert rel_err(h, fx + s * mixed) < 1e-3
    assert rel_err((flat(h) - fx) / s, mixed) < 1e-3  # the mixed part alone, not drowned by fx
    # one grad_y g per perturbed point; forward shares one base gradient
    assert (stats["grad_evals"], stats["hvp_evals"]) == (1 + (1 + DX if difference == "forward" else 2 * DX), 0)
    assert (stats["iterations"], stats["scale"]) == (DX, s)


def test_fd_coordinate_paper_form_corrects_only_the_sampled_coordinates():
    """Algorithm 2 as printed: grad_x f plus the scaled mixed term on P, nothing elsewhere, no dim/|P| weight."""
    prob = Quadratic(nonlinear=True)
    x, y = prob.point()
    fx, mixed = autograd_parts(prob, x, y)
    opts = dict(mu=1e-6, difference="central", scale=-0.05, num_coords=4, seed=3)
    h, stats = hypergradient_with_stats(prob.upper, prob.lower, x, y, "fd-coordinate", **opts)
    correction = flat(h) - fx
    sampled = torch.nonzero(correction.abs() > 1e-12).flatten()
    assert len(sampled) == 4 and stats["iterations"] == 4 and stats["scale"] == -0.05
    assert torch.allclose(correction[sampled], -0.05 * mixed[sampled], rtol=1e-4)
    unbiased, stats = hypergradient_with_stats(prob.upper, prob.lower, x, y, "fd-coordinate", weight="unbiased", **opts)
    assert torch.allclose(flat(unbiased) - fx, correction * DX / 4, rtol=1e-9, atol=1e-12)
    assert stats["scale"] == -0.05 * DX / 4


def test_fd_coordinate_sampling_is_unbiased():
    prob = Quadratic(nonlinear=True)
    x, y = prob.point()
    opts = dict(mu=1e-5, difference="central", scale=1.0, weight="unbiased")
    fx = autograd_parts(prob, x, y)[0]
    full = flat(hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", **opts)) - fx
    samples = []
    for seed in range(400):
        h = hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", num_coords=3, seed=seed,
                          **opts)
        samples.append(flat(h) - fx)
        assert int((samples[-1].abs() > 1e-12).sum()) <= 3  # only sampled coordinates move
    assert rel_err(samples[0], full) > 0.3  # a single draw is far off ...
    assert rel_err(torch.stack(samples).mean(0), full) < 0.15  # ... the average is not


def test_fd_directional_matches_closed_form():
    prob = Quadratic()
    x, y = prob.point()
    K = 100
    h, stats = hypergradient_with_stats(prob.upper, prob.lower, x, y, "fd-directional",
                                        inverse="neumann", K=K, step=0.15)
    assert rel_err(h, prob.true_hypergrad(prob.x)) < 1e-3
    assert (stats["grad_evals"], stats["hvp_evals"]) == (1 + 2 * (K - 1) + 2, 0)
    assert (stats["iterations"], stats["truncated"]) == (K, 0)


def test_fd_directional_tracks_second_order_neumann():
    """Same K and step: differences of gradients reproduce the autograd Neumann estimate."""
    prob = Quadratic(nonlinear=True)
    x, y = prob.point()
    for opts in (dict(inverse="neumann", K=10, step=0.15), dict(inverse="one-step", step=0.15)):
        h = hypergradient(prob.upper, prob.lower, x, y, "fd-directional", mu=1e-4, eps=1e-4,
                          **opts)
        ref = hypergradient(prob.upper, prob.lower, x, y, "neumann", K=opts.get("K", 1),
                            step=0.15)
        assert rel_err(h, ref) < 1e-6


def test_sign_of_the_coordinate_estimator():
    """Which scale points downhill.

    Quadratic with D = 0 (so dPhi/dx is the mixed term alone) and B with orthonormal rows
    (B B' = I). With r = y* - c and H_xy = -B', the true term is B'A^-1 r and the
    fd-coordinate term is s H_xy grad_y f = -s B' r. Their inner product is
    -s r'B B'A^-1 r = -s r'A^-1 r, and since cond(A) = 5 the Kantorovich bound gives
    |cosine| >= 2 sqrt(5) / 6 ~ 0.745: s = -beta is aligned, s = +1 (the paper's
    Algorithm 2) anti-aligned, deterministically and by a wide margin. A step of length
    0.1 ||B'r|| along -h then decreases Phi for s = -beta and increases it for s = +1
    (Hess Phi = B'A^-2 B has norm <= 1 and r'A^-1 r >= 0.2 ||r||^2).
    """
    prob = Quadratic(orthonormal_b=True, d_scale=0.0)
    x, y = prob.point()
    true = prob.true_hypergrad(prob.x)
    beta = 0.01
    fd = dict(mu=1e-5, difference="central", beta=beta)
    h_beta = flat(hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", **fd))
    h_plus = flat(hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", scale=1.0, **fd))
    assert torch.dot(h_beta, true) > 0
    assert cosine(h_beta, true) > 0.7
    assert cosine(h_plus, true) < -0.7
    phi0 = prob.phi(prob.x)
    assert prob.phi(prob.x - (0.1 / beta) * h_beta) < phi0 - 1e-3
    assert prob.phi(prob.x - 0.1 * h_plus) > phi0 + 1e-3


def test_minus_beta_is_the_one_step_unrolled_hypergradient():
    """Lower level = one gradient step y1 = y0 - beta grad_y g(x, y0).

    H_yx is constant on the quadratic, so grad_x f + s H_xy grad_y f at (x, y1) is the exact
    gradient of x -> f(x, y1(x)) for s = -beta and far from it for s = +1.
    """
    prob = Quadratic()
    beta = 0.05
    y0 = torch.randn(DY, generator=torch.Generator().manual_seed(1), dtype=DT)

    def unrolled(xf):
        gy = prob.A @ y0 - prob.B @ xf
        return y0 - beta * gy

    xf = prob.x.clone().requires_grad_(True)
    true = torch.autograd.grad(prob.upper([xf], [unrolled(xf)]), xf)[0]
    x, y1 = split(prob.x, X_SHAPES), split(unrolled(prob.x), Y_SHAPES)
    fd = dict(mu=1e-5, difference="central", beta=beta)
    h_beta = hypergradient(prob.upper, prob.lower, x, y1, "fd-coordinate", **fd)
    h_plus = hypergradient(prob.upper, prob.lower, x, y1, "fd-coordinate", scale=1.0, **fd)
    assert rel_err(h_beta, true) < 1e-6
    assert rel_err(h_plus, true) > 0.5


class Ridge:
    """x = log ridge penalties per feature, y = weights; g = train MSE + 0.5 sum(e^x y^2),
    f = validation MSE. Starts over-regularised (penalty e), so Phi has room to drop."""

    p, n = 5, 40

    def __init__(self):
        gen = torch.Generator().manual_seed(0)
        w = torch.tensor([2.0, -1.5, 1.0, 0.0, 0.0], dtype=DT)
        self.Xt = torch.randn(self.n, self.p, generator=gen, dtype=DT)
        self.Xv = torch.randn(self.n, self.p, generator=gen, dtype=DT)
        self.tt = self.Xt @ w + 0.5 * torch.randn(self.n, generator=gen, dtype=DT)
        self.tv = self.Xv @ w + 0.5 * torch.randn(self.n, generator=gen, dtype=DT)

    def lower(self, x, y):
        return ((self.Xt @ y[0] - self.tt) ** 2).mean() + 0.5 * (x[0].exp() * y[0] ** 2).sum()

    def upper(self, x, y):
        return ((self.Xv @ y[0] - self.tv) ** 2).mean()

    def y_star(self, x):
        hess = 2 / self.n * self.Xt.T @ self.Xt + torch.diag(x.exp())
        return torch.linalg.solve(hess, 2 / self.n * self.Xt.T @ self.tt)

    def phi(self, x):
        return self.upper([x], [self.y_star(x)]).item()


@pytest.mark.parametrize("method,options,lr", [
    ("exact", {}, 1.0),
    ("neumann", {"K": 20, "step": 0.1}, 1.0),
    ("fd-coordinate", {"beta": 0.1}, 10.0),  # ~ beta H_yy-scaled estimate: lr ~ 1 / beta
    ("fd-directional", {"K": 20, "step": 0.1}, 1.0),
    ("fd-directional", {"inverse": "one-step", "step": 0.1}, 10.0),
])
def test_gradient_descent_decreases_validation_loss(method, options, lr):
    prob = Ridge()
    x = torch.full((prob.p,), 1.0, dtype=DT)
    phi0 = prob.phi(x)
    for _ in range(30):
        (h,) = hypergradient(prob.upper, prob.lower, [x], [prob.y_star(x)], method, **options)
        x = x - lr * h
    assert prob.phi(x) < 0.5 * phi0


def test_errors_name_the_culprit():
    prob = Quadratic()
    x, y = prob.point()
    with pytest.raises(ValueError, match="no-such-method"):
        hypergradient(prob.upper, prob.lower, x, y, "no-such-method")
    with pytest.raises(ValueError, match="bogus"):
        hypergradient(prob.upper, prob.lower, x, y, "exact", bogus=1)
    with pytest.raises(ValueError, match="K"):  # a neumann option is unknown to exact
        hypergradient(prob.upper, prob.lower, x, y, "exact", K=3)
    with pytest.raises(ValueError, match="backward"):
        hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", difference="backward")
    with pytest.raises(ValueError, match="num_coords"):
        hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", num_coords=0)
    with pytest.raises(ValueError, match="newton"):
        hypergradient(prob.upper, prob.lower, x, y, "fd-directional", inverse="newton")
    with pytest.raises(ValueError, match="weight"):
        hypergradient(prob.upper, prob.lower, x, y, "fd-coordinate", weight="reweighted")
    with pytest.raises(ValueError, match="solver"):
        hypergradient(prob.upper, prob.lower, x, y, "curvature", solver="newton")
    assert set(METHODS) == {"exact", "neumann", "fd-coordinate", "fd-directional", "curvature"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_shapes_and_inputs_untouched(method):
    prob = Quadratic()
    x, y = prob.point()
    x = [x[0].requires_grad_(True), x[1]]  # mixed flags: one tracked leaf, one plain tensor
    before = [t.detach().clone() for t in x + y]
    h = hypergradient(prob.upper, prob.lower, x, y, method)
    assert [t.shape for t in h] == [t.shape for t in x]
    assert not any(t.requires_grad for t in h)
    assert all(torch.equal(a, b) for a, b in zip(before, x + y))
    assert x[0].requires_grad and not x[1].requires_grad and not any(t.requires_grad for t in y)
    assert all(t.grad is None for t in x + y)


def test_unused_parameters_get_zero_gradients():
    """x[1] is read by no loss, x by no f, y[1] by no f: autograd's None must become zeros."""
    def lower(x, y):
        return 0.5 * (y[0] ** 2).sum() - (y[0] * x[0]).sum() + 0.5 * (y[1] ** 2).sum()

    def upper(x, y):
        return ((y[0] - 1.0) ** 2).sum()

    x = [torch.ones(3, dtype=DT), torch.ones(2, dtype=DT)]
    y = [torch.ones(3, dtype=DT) * 2, torch.ones(4, dtype=DT)]
    # y0* = x0, Phi = ||x0 - 1||^2: gradient 2 (y0 - 1) at y0 = 2 in x0, zero in x1
    expected = [torch.full((3,), 2.0, dtype=DT), torch.zeros(2, dtype=DT)]
    for method, opts in [("exact", {}), ("neumann", {"K": 60, "step": 0.5}),
                         ("fd-directional", {"K": 60, "step": 0.5}),
                         ("fd-coordinate", {"beta": 1.0})]:  # H_yy = I: beta = 1 is exact
        h = hypergradient(upper, lower, x, y, method, **opts)
        assert rel_err(h, expected) < 1e-6, method


@pytest.mark.parametrize("method", ["fd-coordinate", "fd-directional"])
def test_fd_methods_use_no_create_graph(method, monkeypatch):
    flags = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        flags.append(bool(kwargs.get("create_graph", False)))
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    prob = Quadratic()
    x, y = prob.point()
    variant = {"difference": "central"} if method == "fd-coordinate" else {"inverse": "one-step"}
    for opts in ({}, variant):
        hypergradient(prob.upper, prob.lower, x, y, method, **opts)
    assert flags and not any(flags)
    flags.clear()
    hypergradient(prob.upper, prob.lower, x, y, "exact")
    assert any(flags)  # the spy does see create_graph when a method uses it


# --- non-convex lower levels: negative curvature, safe steps, diagnostics ---


def test_conjugate_gradient_stops_at_negative_curvature_and_says_so():
    """A = diag(3, -1): CG's first direction b has positive curvature (9 - 0.25 > 0), so it takes
    that step, then the next direction has p'Ap <= 0: it returns the first iterate and flags it."""
    a = torch.diag(torch.tensor([3.0, -1.0], dtype=DT))
    b = [torch.tensor([1.0, 0.5], dtype=DT)]
    v, info = conjugate_gradient(lambda u: [a @ u[0]], b, tol=1e-12, max_iter=50)
    first = b[0] * (b[0] @ b[0]) / (b[0] @ a @ b[0])
    assert torch.allclose(v[0], first)
    assert info["negative_curvature"] == 1 and info["iterations"] == 1 and info["converged"] == 0
    assert info["residual"] == pytest.approx(float((b[0] - a @ v[0]).norm() / b[0].norm()))
    # straight along the negative direction, the very first one: no CG step, the right-hand side
    # itself comes back (Nocedal & Wright Alg. 7.1: steepest descent, A taken as the identity)
    rhs = torch.tensor([0.0, 1.0], dtype=DT)
    v, info = conjugate_gradient(lambda u: [a @ u[0]], [rhs])
    assert torch.equal(v[0], rhs) and info["negative_curvature"] == 1 and info["iterations"] == 0
    assert info["residual"] == pytest.approx(float((rhs - a @ rhs).norm() / rhs.norm())) == 2.0
    # positive definite: converges, nothing flagged
    spd = torch.diag(torch.tensor([3.0, 1.0], dtype=DT))
    v, info = conjugate_gradient(lambda u: [spd @ u[0]], b, tol=1e-12)
    assert torch.allclose(v[0], torch.linalg.solve(spd, b[0])) and info["negative_curvature"] == 0 and info["converged"] == 1


def test_power_iteration_finds_the_largest_magnitude_and_its_sign():
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(0), dtype=DT))
    spd = q @ torch.diag(torch.tensor([0.5, 1, 2, 3, 4, 10.0], dtype=DT)) @ q.T
    magnitude, rayleigh = power_iteration(lambda u: [spd @ u[0]], [torch.zeros(6, dtype=DT)], iterations=60)
    assert magnitude == pytest.approx(10.0, rel=1e-6) and rayleigh > 0
    indefinite = q @ torch.diag(torch.tensor([0.5, 1, 2, 3, 4, -10.0], dtype=DT)) @ q.T
    magnitude, rayleigh = power_iteration(lambda u: [indefinite @ u[0]], [torch.zeros(6, dtype=DT)], iterations=60)
    assert magnitude == pytest.approx(10.0, rel=1e-6) and rayleigh < 0


def test_neumann_default_step_is_safe_and_converges():
    """No step given: 1/lambda_max from power iteration, inside (0, 2/lambda_max); the series then
    converges (A's eigenvalues are in [1, 5]), where a fixed step of 0.5 > 2/5 diverges."""
    prob = Quadratic()
    x, y = prob.point()
    true = prob.true_hypergrad(prob.x)
    h, info = hypergradient_with_stats(prob.upper, prob.lower, x, y, "neumann", K=200, power_iters=30)
    assert 1 / 5 * 0.99 <= info["step"] < 2 / 5 and info["lambda_max"] == pytest.approx(5.0, rel=0.02)
    assert info["truncated"] == 0 and info["negative_curvature"] == 0 and rel_err(h, true) < 1e-6
    assert info["hvp_evals"] == 30 + 199 + 1  # power iteration, the series, the mixed product
    bad, info = hypergradient_with_stats(prob.upper, prob.lower, x, y, "neumann", K=200, step=0.5)
    assert info["truncated"] == 1 and info["iterations"] < 200  # stopped where the terms began to grow
    assert all(torch.isfinite(t).all() for t in bad)


class DoubleWell:
    """A lower level that is not convex in y, solved by T gradient steps from a fixed start.

    g = 0.5 y1^2 - 0.5 y2^2 + 0.25 y2^4 - x'y (a double well in y2), f = 0.5 ||y - c||^2, and
    Phi_T(x) = f(x, y_T(x)) with y_T after T steps of size 0.1 from y0 = (0, 0.1): y_T is still
    near the top of the well, where H_yy = diag(1, 3 y2^2 - 1) has a negative eigenvalue.
    """

    def __init__(self, c):
        self.c = torch.tensor(c, dtype=DT)
        self.x = torch.tensor([0.3, 0.05], dtype=DT)

    def lower(self, x, y):
        x, y = x[0], y[0]
        return 0.5 * y[0] ** 2 - 0.5 * y[1] ** 2 + 0.25 * y[1] ** 4 - x @ y

    def upper(self, x, y):
        return 0.5 * ((y[0] - self.c) ** 2).sum()

    def solve(self, x):
        y = torch.tensor([0.0, 0.1], dtype=DT)
        for _ in range(5):
            y = y - 0.1 * torch.tensor([y[0] - x[0], -y[1] + y[1] ** 3 - x[1]], dtype=DT)
        return y

    def phi(self, x):
        return float(self.upper([x], [self.solve(x)]))


@pytest.mark.parametrize("c,exact_steps", [([1.2, 1.0], 1), ([None, 1.0], 0)])
def test_estimators_stay_sound_where_the_lower_hessian_is_indefinite(c, exact_steps):
    """Where H_yy is indefinite the implicit formula with the true inverse points uphill in the
    negative-curvature direction. ``neumann`` (safe step, truncated series) still returns a step
    that lowers Phi_T; ``exact`` either takes its positive-curvature CG step and lowers Phi_T, or,
    when the very first direction has negative curvature (c1 = y1_T below), reports that and
    solves with H_yy taken as the identity (v = grad_y f, Nocedal & Wright Alg. 7.1's steepest
    descent), which lowers Phi_T too."""
    prob = DoubleWell([1.2 if v is None else v for v in c])
    y = prob.solve(prob.x)
    if c[0] is None:
        prob.c[0] = y[0]  # f's gradient points only along the negative-curvature direction
    hessian = torch.diag(torch.stack([torch.tensor(1.0, dtype=DT), 3 * y[1] ** 2 - 1]))
    assert hessian[1, 1] < -0.5
    phi0 = prob.phi(prob.x)
    inverse = torch.linalg.solve(hessian, y - prob.c)  # grad_x f - H_xy H^-1 grad_y f, H_xy = -I
    assert prob.phi(prob.x - 0.1 * inverse) > phi0 - 1e-3 * float(inverse.norm())  # no real descent, or ascent

    (h,), info = hypergradient_with_stats(prob.upper, prob.lower, [prob.x], [y], "neumann")
    assert torch.isfinite(h).all() and info["truncated"] == 1
    assert prob.phi(prob.x - 0.1 * h) < phi0 - 1e-3

    (h,), info = hypergradient_with_stats(prob.upper, prob.lower, [prob.x], [y], "exact")
    assert torch.isfinite(h).all() and info["negative_curvature"] == 1 and info["iterations"] == exact_steps
    assert prob.phi(prob.x - 0.1 * h) < phi0 - 1e-3
    if not exact_steps:  # grad_x f (zero) - H_xy v with H_xy = -I and v = grad_y f = y - c
        assert torch.allclose(h, y - prob.c)


# --- the curvature-aware estimator (NBO, Dong et al., ICML 2025): Newton step and hypergradient on one Hessian ---


def dense_curvature(upper, lower, x, y, t=1.0):
    """Brute-force oracle of the estimator's two steps on one flat x and y: dense Hessian blocks of g at
    (x, y), v = H^-1 grad_y g, u = H^-1 grad_y f, then grad_x f - H_xy u at the Newton point y - t v."""
    def blocks(yy):
        z = torch.cat([x, yy]).detach().requires_grad_(True)
        hess = torch.autograd.functional.hessian(lambda w: lower([w[:len(x)]], [w[len(x):]]), z)
        return hess[:len(x), len(x):], hess[len(x):, len(x):]

    def grads(fn, yy):
        xs, ys = x.clone().requires_grad_(True), yy.clone().requires_grad_(True)
        return torch.autograd.grad(fn([xs], [ys]), [xs, ys])

    _, h_yy = blocks(y)
    v = torch.linalg.solve(h_yy, grads(lower, y)[1])
    u = torch.linalg.solve(h_yy, grads(upper, y)[1])
    y_new = y - t * v
    h_xy, _ = blocks(y_new)
    return grads(upper, y_new)[0] - h_xy @ u, v


class Quartic(Quadratic):
    """The nonlinear Quadratic plus 0.05 sum(y^4) in g: strongly convex (H_yy >= A + 0.2 diag(sin x)), not
    quadratic in y, so the Newton step lands near y*(x) but not on it, and grad_x f and H_xy depend on y."""

    def __init__(self):
        super().__init__(nonlinear=True)

    def lower(self, x, y):
        return super().lower(x, y) + 0.05 * (flat(y) ** 4).sum()


def test_curvature_is_the_closed_form_hypergradient_at_y_star_and_its_diagnostics_are_sane():
    """NBO-CG: both systems solved by CG to tol, exact in at most dim(y) products each; at y = y*(x) the
    Newton step is 0 and the estimate is the closed form. Away from y*, on this quadratic lower level the
    Newton step lands on y*(x) (newton_norm = ||y - y*||, lower_decrease = 0.5 (y - y*)'A(y - y*)) while
    grad_y f stays at y, as in the paper's system: grad_x f and H_xy do not depend on y here, so the
    estimate is exact's at (x, y)."""
    prob = Quadratic()
    x, y = prob.point()
    h, info = hypergradient_with_stats(prob.upper, prob.lower, x, y, "curvature")
    assert rel_err(h, prob.true_hypergrad(prob.x)) < 1e-10
    assert info["newton_norm"] < 1e-12 and info["newton_step"] == 1 and abs(info["lower_decrease"]) < 1e-12
    assert info["negative_curvature"] == 0 and info["converged"] == 1 and info["residual"] < 1e-10
    assert 1 <= info["iterations"] <= DY and 1 <= info["newton_iterations"] <= DY and info["newton_residual"] < 1e-10
    # one graph of grad_y g per point (y and the Newton point), f's gradients at both, g's at y
    assert info["grad_evals"] == 5 and info["hvp_evals"] == info["iterations"] + info["newton_iterations"] + 1
    shift = 0.3 * torch.randn(DY, generator=torch.Generator().manual_seed(2), dtype=DT)
    far = split(flat(y) + shift, Y_SHAPES)
    h, info = hypergradient_with_stats(prob.upper, prob.lower, x, far, "curvature")
    assert info["newton_norm"] == pytest.approx(float(shift.norm()), rel=1e-9)
    assert info["lower_decrease"] == pytest.approx(float(0.5 * shift @ prob.A @ shift), rel=1e-9)
    assert rel_err(h, hypergradient(prob.upper, prob.lower, x, far, "exact", tol=1e-14)) < 1e-10


def test_curvature_gd_solver_converges_at_the_gradient_descent_rate():
    """NBO-GD: K gradient steps of size 1/L = 0.2 from 0 on both quadratic programs (the K-term Neumann
    series), whose error contracts by 1 - mu/L = 0.8 per step (A's eigenvalues in [1, 5])."""
    prob = Quadratic()
    x, y = prob.point()
    true = prob.true_hypergrad(prob.x)
    errors = {}
    for K in (5, 20, 50, 200):
        h, info = hypergradient_with_stats(prob.upper, prob.lower, x, y, "curvature", solver="gd", K=K, step=0.2)
        errors[K] = rel_err(h, true)
        assert info["iterations"] == info["newton_iterations"] == K and info["truncated"] == 0
        assert info["hvp_evals"] == 2 * (K - 1) + 1
    assert all(errors[K] <= max(10 * 0.8**K, 1e-12) for K in errors), errors  # to round-off
    assert errors[5] > 1e-2 and errors[200] < 1e-12, errors
    h, info = hypergradient_with_stats(prob.upper, prob.lower, x, y, "curvature", solver="gd", K=200, power_iters=30)
    assert info["lambda_max"] == pytest.approx(5.0, rel=0.02) and rel_err(h, true) < 1e-8  # safe step, measured once


@pytest.mark.parametrize("problem", [Quadratic, Quartic])
def test_curvature_matches_the_dense_two_step_oracle_away_from_y_star(problem):
    """Nonlinear couplings (grad_x f and H_xy depend on y) and, for Quartic, a lower level not quadratic in
    y: the estimate is grad_x f - H_xy u at y - v with v, u from the Hessian at y, element for element, and
    not exact's estimate at y."""
    prob = problem(nonlinear=True) if problem is Quadratic else problem()
    xf, yf = prob.x, prob.y_star(prob.x) + 0.5
    h, info = hypergradient_with_stats(prob.upper, prob.lower, split(xf, X_SHAPES), split(yf, Y_SHAPES), "curvature",
                                       tol=1e-14)
    expected, v = dense_curvature(prob.upper, prob.lower, xf, yf)
    assert info["newton_step"] == 1 and info["newton_norm"] == pytest.approx(float(v.norm()), rel=1e-9)
    assert rel_err(h, expected) < 1e-9
    assert rel_err(h, hypergradient(prob.upper, prob.lower, split(xf, X_SHAPES), split(yf, Y_SHAPES))) > 1e-3


def test_curvature_line_search_keeps_the_newton_point_below_g():
    """g = sqrt(1 + y^2) + 0.05 y^2 - x y is strongly convex, but from y = 3 the full Newton step jumps to
    y - 9.49 = -6.49, where g is higher (8.67 > 3.61): the paper's unit step (line_search=False) climbs, the
    default halves it once (y = -1.74, g = 2.16)."""
    def lower(x, y):
        return (1 + y[0] ** 2).sqrt().sum() + 0.05 * (y[0] ** 2).sum() - (x[0] * y[0]).sum()

    def upper(x, y):
        return 0.5 * ((y[0] - 1) ** 2).sum() + 0.5 * (x[0] ** 2).sum()

    x, y = torch.zeros(1, dtype=DT), torch.full((1,), 3.0, dtype=DT)
    (h,), info = hypergradient_with_stats(upper, lower, [x], [y], "curvature")
    assert info["newton_step"] == 0.5 and info["lower_decrease"] == pytest.approx(3.6123 - 2.1619, abs=1e-3)
    expected, v = dense_curvature(upper, lower, x, y, t=0.5)
    assert float(v) == pytest.approx(9.49, abs=1e-2) and rel_err(h, expected) < 1e-10
    _, info = hypergradient_with_stats(upper, lower, [x], [y], "curvature", line_search=False)
    assert info["newton_step"] == 1 and info["lower_decrease"] < -5


@pytest.mark.parametrize("c", [[1.2, 1.0], [None, 1.0]])
@pytest.mark.parametrize("solver", ["cg", "gd"])
def test_curvature_stays_sound_where_the_lower_hessian_is_indefinite(c, solver):
    """The double well of the test above: the Newton system's CG stops at negative curvature (or GD's series
    at its first growing term), the Newton point does not climb g, and the estimate lowers Phi_T."""
    prob = DoubleWell([1.2 if v is None else v for v in c])
    y = prob.solve(prob.x)
    if c[0] is None:
        prob.c[0] = y[0]
    phi0 = prob.phi(prob.x)
    (h,), info = hypergradient_with_stats(prob.upper, prob.lower, [prob.x], [y], "curvature", solver=solver)
    assert torch.isfinite(h).all() and info["lower_decrease"] > 0 and 0 < info["newton_step"] <= 1
    if solver == "cg":
        assert info["negative_curvature"] == 1 and info["converged"] == 0
    else:
        assert info["truncated"] == 1 and info["newton_truncated"] == 1
    assert prob.phi(prob.x - 0.1 * h) < phi0 - 1e-3


def _few_shot_problem():
    """A Table II client's bilevel problem (Conv4 width 8, 5-way 1-shot, ridge head) on seeded random
    images, with y away from zero so that the ridge term takes part; the callables as ``outer_phase``'s."""
    from pathlib import Path

    import torch.nn.functional as F

    from rabo_flwr.scenario import load_scenario
    from rabo_flwr.tasks import build_task

    root = Path(__file__).resolve().parent.parent
    scenario = load_scenario(root / "scenarios" / "paper" / "table2" / "rabo.yaml",
                             {"model.backbone": "conv4", "model.width": 8})
    task = build_task(scenario)
    x, y = task.init_tensors(0)
    gen = torch.Generator().manual_seed(1)
    y = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in y.items()}
    support = (torch.rand(5, 1, 28, 28, generator=gen), torch.arange(5))
    query = (torch.rand(15, 1, 28, 28, generator=gen), torch.arange(5).repeat(3))
    xn, yn = list(x), list(y)

    def as_dicts(xs, ys):
        return dict(zip(xn, xs)), dict(zip(yn, ys))

    def upper(xs, ys):
        return task.upper_loss(*as_dicts(xs, ys), query)

    def lower(xs, ys):
        return task.lower_loss(*as_dicts(xs, ys), support)

    def lower_textbook(xs, ys):  # the ridge as pow(2) terms summed from 0
        xd, yd = as_dicts(xs, ys)
        images, labels = support
        ridge = 0.5 * scenario.task.lower_l2 * sum(t.pow(2).sum() for t in yd.values())
        return F.cross_entropy(task.head(yd, task.features(xd, images)), labels) + ridge

    return upper, lower, lower_textbook, list(x.values()), list(y.values())


def test_exact_on_a_few_shot_client_is_bit_for_bit_the_textbook_computation():
    """The fixed costs cut from a small client's outer phase (Hessian-vector products seeded with the
    vector instead of differentiating a dot product, dot products not summed from 0, no zero-damping
    term, r - alpha Ap, the ridge as t * t) leave every bit of the hypergradient as it was."""
    upper, lower, lower_textbook, x, y = _few_shot_problem()
    got, info = hypergradient_with_stats(upper, lower, x, y, "exact")

    def old_dot(a, b):
        return sum((u * v).sum() for u, v in zip(a, b))

    xs, ys = [t.detach().requires_grad_(True) for t in x], [t.detach().requires_grad_(True) for t in y]
    fgrad = torch.autograd.grad(upper(xs, ys), xs + ys)
    fx, fy = list(fgrad[:len(xs)]), list(fgrad[len(xs):])
    xs, ys = [t.detach().requires_grad_(True) for t in x], [t.detach().requires_grad_(True) for t in y]
    gy = torch.autograd.grad(lower_textbook(xs, ys), ys, create_graph=True)

    def hvp(u, wrt):
        return list(torch.autograd.grad(old_dot(gy, u), wrt, retain_graph=True))

    v, r, p = [torch.zeros_like(t) for t in fy], list(fy), list(fy)  # conjugate gradient as it was written
    rr = old_dot(r, r)
    b_norm = float(rr.sqrt())
    for _ in range(100):
        if float(rr.sqrt()) <= 1e-10 * b_norm:
            break
        ap = [0.0 * u + w for u, w in zip(p, hvp(p, ys))]
        curvature = old_dot(p, ap)
        assert curvature > 0
        alpha = rr / curvature
        v = [alpha * s + t for s, t in zip(p, v)]
        r = [-alpha * s + t for s, t in zip(ap, r)]
        rr, rr_old = old_dot(r, r), rr
        p = [rr / rr_old * s + t for s, t in zip(p, r)]
    want = [-1.0 * h + f for h, f in zip(hvp(v, xs), fx)]
    assert info["iterations"] > 5 and info["converged"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_neumann_on_a_few_shot_client_is_bit_for_bit_the_textbook_computation(monkeypatch):
    """FedMBO's estimator (power iteration, Neumann terms) through the same products: unchanged bits."""
    import rabo_flwr.hypergrad as hg

    upper, lower, lower_textbook, x, y = _few_shot_problem()
    got, _ = hypergradient_with_stats(upper, lower, x, y, "neumann", K=5, seed=3)

    def old_dot(a, b):
        return sum((u * v).sum() for u, v in zip(a, b))

    monkeypatch.setattr(hg, "dot", old_dot)
    monkeypatch.setattr(hg, "_vjp", lambda outputs, vectors, inputs, **kw: hg._grad(old_dot(outputs, vectors), inputs, **kw))
    want, _ = hypergradient_with_stats(upper, lower_textbook, x, y, "neumann", K=5, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
