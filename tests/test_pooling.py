"""Max-pooling through the channels-last kernel (``models.units.max_pool2``) gives every bit of
``F.max_pool2d(x, 2)``: the index chosen in each window (ties, NaN, infinities, signed zeros;
every 2x2 window over those values), and on a Table II client (real Omniglot episode, the
seeded Conv4 at the widths of capacities 1/16, 1/4 and 1) the features, the gradients and the
hypergradients, whose Hessian-vector products run the pooling's double backward. The plain
pooling is the same code with the channels-last route switched off."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rabo_flwr.hypergrad import hypergradient_with_stats
from rabo_flwr.models import units
from rabo_flwr.models.resnet12 import ResNet12
from rabo_flwr.scenario import load_scenario
from rabo_flwr.tasks import build_task

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
VALUES = (float("-inf"), -1.0, -0.0, 0.0, 0.5, 1.0, float("inf"), float("nan"))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, strides and bits (NaN included, 0.0 and -0.0 told apart)."""
    return a.shape == b.shape and a.stride() == b.stride() and torch.equal(a.view(torch.int32), b.view(torch.int32))


def every_window(n: int, c: int, h: int, w: int, seed: int) -> torch.Tensor:
    """An (n, c, h, w) input whose 2x2 windows run through all 8^4 windows over VALUES (shuffled,
    repeated to fill it; the rows and columns a pooling of odd size drops drawn from VALUES too)."""
    gen = torch.Generator().manual_seed(seed)
    combos = torch.tensor(list(itertools.product(VALUES, repeat=4)))  # (4096, 4): rows of a window, row by row
    count = n * c * (h // 2) * (w // 2)
    assert count >= len(combos)
    picks = combos[torch.randperm(count, generator=gen) % len(combos)]
    windows = picks.view(n, c, h // 2, w // 2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2 * 2, w // 2 * 2)
    x = torch.tensor(VALUES)[torch.randint(len(VALUES), (n, c, h, w), generator=gen)]
    x[:, :, : h // 2 * 2, : w // 2 * 2] = windows
    return x


@pytest.mark.parametrize("n, c, h, w", [(8, 4, 28, 28), (3, 12, 28, 28), (6, 16, 14, 14), (120, 4, 7, 7),
                                        (12, 64, 7, 7), (95, 64, 3, 3), (4, 1, 65, 65)])
def test_channels_last_kernel_picks_the_plain_kernels_index_in_every_window(n, c, h, w):
    """1 and 4 channels go through the kernel folded (the batch as channels: n * c vector lanes and
    a tail), 12 through its vector lanes and its scalar tail, 16 and 64 its vector lanes; odd sizes
    drop a row and a column."""
    x = every_window(n, c, h, w, seed=c + h)
    want_out, want_idx = F.max_pool2d_with_indices(x, 2)
    got_out, got_idx = units._channels_last_pool(x, indices=True)
    assert same_bits(got_out, want_out)
    assert torch.equal(got_idx, want_idx)


def relu_with_ties(shape, seed: int) -> torch.Tensor:
    """ReLU of values on a coarse grid: zero windows, positive ties and distinct maxima."""
    gen = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randint(-3, 4, shape, generator=gen).float() / 4)


@pytest.mark.parametrize("shape", [(95, 4, 28, 28), (5, 64, 14, 14), (95, 16, 7, 7), (5, 4, 14, 14)])
def test_max_pool2_output_gradient_and_double_backward_are_the_plain_ones(shape):
    """Above and below the size threshold: the output, the gradient (with create_graph) and a
    double backward through the gradient, each bit for bit; the fast route taken where it should."""
    def run(pool):
        x = relu_with_ties(shape, 0).requires_grad_(True)
        gen = torch.Generator().manual_seed(1)
        out = pool(x)
        seed = torch.randn(out.shape, generator=gen).requires_grad_(True)
        (gx,) = torch.autograd.grad(out, x, seed, create_graph=True)
        weights = torch.randn(gx.shape, generator=gen)
        double = torch.autograd.grad((gx * weights).sum(), [seed, x], allow_unused=True, materialize_grads=True)
        return out, gx, *double

    got = run(units.max_pool2)
    want = run(lambda x: F.max_pool2d(x, 2))
    assert all(same_bits(a, b) for a, b in zip(got, want))
    x = relu_with_ties(shape, 0).requires_grad_(True)
    assert (units.max_pool2(x).grad_fn.name() == "_ChannelsLastMaxPool2Backward") == (x.numel() >= units.CHANNELS_LAST_POOL_MIN)


def fewshot_client(width: int):
    """A Table II client at CPU scale (Conv4 of the given width, 5-way 1-shot, 95 queries) on a real
    Omniglot episode, the seeded initialisation, y away from zero; the callables of ``outer_phase``."""
    scenario = load_scenario(REPO / "scenarios" / "paper" / "table2" / "rabo.yaml",
                             {"model.backbone": "conv4", "model.width": width})
    task = build_task(scenario)
    x, y = task.init_tensors(scenario.seed)
    gen = torch.Generator().manual_seed(1)
    y = {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in y.items()}
    batch = task.client_batch(0, 2, CPU, 1)
    xn, yn = list(x), list(y)

    def upper(xs, ys):
        return task.upper_loss(dict(zip(xn, xs)), dict(zip(yn, ys)), batch.upper)

    def lower(xs, ys):
        return task.lower_loss(dict(zip(xn, xs)), dict(zip(yn, ys)), batch.lower)

    return task, batch, upper, lower, list(x.values()), list(y.values())


def client_results(width: int) -> list[torch.Tensor]:
    task, batch, upper, lower, x, y = fewshot_client(width)
    xs, ys = [t.clone().requires_grad_(True) for t in x], [t.clone().requires_grad_(True) for t in y]
    loss = upper(xs, ys)
    grads = torch.autograd.grad(loss, xs + ys)
    exact, info = hypergradient_with_stats(upper, lower, x, y, "exact")
    neumann, _ = hypergradient_with_stats(upper, lower, x, y, "neumann", K=5, seed=3)
    assert info["iterations"] > 5
    return [loss.detach(), *grads, *exact, *neumann]


@pytest.mark.parametrize("width", [4, 16, 64])
def test_fewshot_client_is_bit_for_bit_the_plain_pooling(width, monkeypatch):
    """Capacities 1/16, 1/4 and 1 of the CPU-scale backbone: the query loss, its gradients in x and
    y, and the exact (CG) and Neumann hypergradients (Hessian-vector products in y, then in x and
    y: the pooling's double backward) are the plain pooling's, on activations with ties."""
    seen = []
    route = units._channels_last_pool

    def spy(x, indices):
        seen.append(x.detach().clone())
        return route(x, indices)

    monkeypatch.setattr(units, "_channels_last_pool", spy)
    got = client_results(width)
    monkeypatch.setattr(units, "CHANNELS_LAST_POOL_MIN", float("inf"))
    seen_plain = len(seen)
    want = client_results(width)
    assert len(seen) == seen_plain > 0  # the fast route ran in the first pass only
    assert all(same_bits(a, b) for a, b in zip(got, want))
    # the pooled activations had ties: all-zero windows and, on the blank background, equal positive maxima
    windows = torch.cat([a[:, :, : a.shape[2] // 2 * 2, : a.shape[3] // 2 * 2].unfold(2, 2, 2).unfold(3, 2, 2)
                         .flatten(-2).flatten(0, 3) for a in seen])
    top = windows.max(1, keepdim=True).values
    tied = (windows == top).sum(1) > 1
    assert (tied & (top[:, 0] == 0)).any() and (tied & (top[:, 0] > 0)).any()


def test_resnet12_is_bit_for_bit_the_plain_pooling(monkeypatch):
    """ResNet12's pooling (after LeakyReLU, widths 8 to 80) through the same route: features and a
    double backward (the gradient's norm differentiated again) unchanged."""
    torch.manual_seed(0)
    model = ResNet12(width=8)
    images = relu_with_ties((20, 1, 28, 28), 2)

    def run():
        params = list(model.parameters())
        out = model(images)
        grads = torch.autograd.grad(out.square().sum(), params, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in grads), params)
        return [out, *grads, *second]

    calls = []
    route = units._channels_last_pool
    monkeypatch.setattr(units, "_channels_last_pool", lambda x, indices: calls.append(1) or route(x, indices))
    got = run()
    assert len(calls) >= 2
    monkeypatch.setattr(units, "CHANNELS_LAST_POOL_MIN", float("inf"))
    want = run()
    assert all(same_bits(a.detach(), b.detach()) for a, b in zip(got, want))
