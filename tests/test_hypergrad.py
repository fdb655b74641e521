"""Numerical tests of rabo_flwr.hypergrad against closed forms and autograd references."""


import pytest
import torch


from rabo_flwr.hypergrad import METHODS, hypergradient, hypergradient_with_stats  # noqa: E402

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
    assert stats == {"grad_evals": 1 + (1 + DX if difference == "forward" else 2 * DX),
                     "hvp_evals": 0}


def test_fd_coordinate_sampling_is_unbiased():
    prob = Quadratic(nonlinear=True)
    x, y = prob.point()
    opts = dict(mu=1e-5, difference="central", scale=1.0)
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
    assert stats == {"grad_evals": 1 + 2 * (K - 1) + 2, "hvp_evals": 0}


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
    assert set(METHODS) == {"exact", "neumann", "fd-coordinate", "fd-directional"}


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
