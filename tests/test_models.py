"""Prunable models: layouts cover every tensor, submodel sizes match closed forms, and a
sliced model is a physically narrower network that computes (and differentiates twice)
exactly what the full model computes with the dropped channels switched off."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rabo_flwr.masks import RandomMask, RollingMask, StaticMask, build_plan
from rabo_flwr.models import Classifier, Conv4, LinearHead, MLPHead, ResNet12, ResNet18
from rabo_flwr.models.backbones import build_backbone
from rabo_flwr.submodel import Layout, numel_in_plan, slice_tensors
from rabo_flwr.tasks.base import FunctionalModule, init_module_tensors

CAPACITIES = [1, 1 / 2, 1 / 4, 1 / 8, 1 / 16]
POLICIES = {"static": StaticMask(), "rolling": RollingMask(step=3), "random": RandomMask(seed=5)}
FEATURES = "features"  # the backbone group a head reads; its own layout owns it in these tests
CLASSES = 10
BATCH = 4


def kept(r: float, size: int) -> int:
    return math.ceil(r * size)


# ---------------------------------------------------------------- closed-form submodel sizes

def conv(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout


def bn(c: int) -> int:
    return 2 * c


def linear(cin: int, cout: int) -> int:
    return cin * cout + cout


def conv4_count(r: float) -> int:
    """Conv4, width 64, one input channel."""
    w = kept(r, 64)
    return conv(3, 1, w) + bn(w) + 3 * (conv(3, w, w) + bn(w))


def resnet12_count(r: float) -> int:
    """ResNet12, width 64 (64-160-320-640), one input channel; conv1, conv2, out groups per block."""
    total, c = 0, 1
    for size in (64, 160, 320, 640):
        a = b = o = kept(r, size)
        total += conv(3, c, a) + bn(a) + conv(3, a, b) + bn(b) + conv(3, b, o) + bn(o) + conv(1, c, o) + bn(o)
        c = o
    return total


def resnet18_count(r: float) -> int:
    """CIFAR ResNet18, width 64, three input channels; identity shortcuts keep the input group."""
    c = kept(r, 64)
    total = conv(3, 3, c) + bn(c)
    for size in (64, 128, 256, 512):
        for block in range(2):
            inner = kept(r, size)
            identity = block == 1 or size == 64
            out = c if identity else kept(r, size)
            total += conv(3, c, inner) + bn(inner) + conv(3, inner, out) + bn(out)
            total += 0 if identity else conv(1, c, out) + bn(out)
            c = out
    return total


def resnet18_classifier_count(r: float) -> int:
    return resnet18_count(r) + linear(kept(r, 512), CLASSES)


def linear_head_count(r: float) -> int:
    return linear(kept(r, 64), CLASSES)


def mlp_head_count(r: float) -> int:
    """Hidden width 64 over 64 features."""
    return linear(kept(r, 64), kept(r, 64)) + linear(kept(r, 64), CLASSES)


# ---------------------------------------------------------------- the models under test

@dataclass(frozen=True)
class Case:
    """A model family: ``build(width)``; ``sample`` shape of one input (None = the feature
    group's kept width, for heads); ``count`` is the closed form at width 64."""

    build: Callable[[int], nn.Module]
    sample: tuple[int, ...] | None
    count: Callable[[float], int]
    width: int  # small width for forward tests, to keep the file fast


CASES = {
    "conv4": Case(lambda w: Conv4(1, w), (1, 28, 28), conv4_count, 8),
    "resnet12": Case(lambda w: ResNet12(1, w), (1, 28, 28), resnet12_count, 8),
    "resnet18": Case(lambda w: ResNet18(3, w), (3, 16, 16), resnet18_count, 8),
    "resnet18_classifier": Case(lambda w: Classifier(ResNet18(3, w), CLASSES), (3, 16, 16), resnet18_classifier_count, 8),
    "linear_head": Case(lambda w: LinearHead(w, CLASSES, FEATURES), None, linear_head_count, 16),
    "mlp_head": Case(lambda w: MLPHead(w, CLASSES, FEATURES, hidden=w), None, mlp_head_count, 16),
}


def layouts_of(module: nn.Module, width: int) -> dict[str, Layout]:
    """The module's layout, plus a side owning the feature group a head reads."""
    return {"x": module.layout(), "features": Layout(groups={FEATURES: width}, dims={})}


def make_plan(module, width, policy, r, iteration=0, client=0):
    layouts = layouts_of(module, width)
    return build_plan(layouts, {side: policy for side in layouts}, r, iteration, client)


def inputs_for(case: Case, plan, generator, dtype=torch.float32) -> torch.Tensor:
    shape = (len(plan[FEATURES]),) if case.sample is None else case.sample
    return torch.randn(BATCH, *shape, generator=generator, dtype=dtype)


def expected_outputs(module: nn.Module, plan) -> int:
    return len(plan[module.out_group]) if hasattr(module, "out_group") else CLASSES


def real_model(case: Case, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    module = case.build(case.width)
    return module, init_module_tensors(module, module.layout())


PLANS = [(policy, r) for policy in POLICIES for r in CAPACITIES]


# ---------------------------------------------------------------- tests

@pytest.mark.parametrize("name", CASES)
def test_submodel_size_matches_closed_form(name):
    case = CASES[name]
    with torch.device("meta"):
        template = case.build(64)
    layout = template.layout()
    tensors = dict(template.named_parameters())
    for r in CAPACITIES:
        plan = make_plan(template, 64, StaticMask(), r)
        assert numel_in_plan(tensors, layout, plan) == case.count(r), r


@pytest.mark.parametrize("name", CASES)
def test_full_width_count_is_the_real_parameter_count(name):
    case = CASES[name]
    assert sum(p.numel() for p in case.build(64).parameters()) == case.count(1)


def test_known_full_width_sizes():
    """ResNet12 64-160-320-640 is the usual 12.4M; CIFAR ResNet18 with 10 classes 11.17M."""
    assert resnet12_count(1) == 12_423_040
    assert resnet18_classifier_count(1) == 11_173_962


@pytest.mark.parametrize("name", CASES)
def test_layout_covers_every_tensor_with_matching_sizes(name):
    case = CASES[name]
    module = case.build(case.width)
    layout = module.layout()
    groups = layouts_of(module, case.width)
    sizes = {g: n for side in groups.values() for g, n in side.groups.items()}
    state = dict(module.named_parameters()) | dict(module.named_buffers())
    assert set(layout.dims) == set(state)
    used = set()
    for tensor_name, dims in layout.dims.items():
        assert len(dims) == state[tensor_name].ndim, tensor_name
        for size, group in zip(state[tensor_name].shape, dims):
            if group is not None:
                assert size == sizes[group], (tensor_name, group)
                used.add(group)
    assert set(layout.groups) <= used  # no group declared but never sliced


@pytest.mark.parametrize("name", CASES)
def test_sliced_forward_backward(name):
    """Every policy and capacity: a narrower network runs, gradients have the sliced shapes."""
    case = CASES[name]
    module, tensors = real_model(case)
    model = FunctionalModule(lambda: case.build(case.width))
    gen = torch.Generator().manual_seed(0)
    for policy, r in PLANS:
        plan = make_plan(module, case.width, POLICIES[policy], r, iteration=7, client=2)
        sliced = {k: v.requires_grad_() for k, v in slice_tensors(tensors, module.layout(), plan).items()}
        out = model(sliced, inputs_for(case, plan, gen))
        assert out.shape == (BATCH, expected_outputs(module, plan)), (policy, r)
        grads = torch.autograd.grad(out.square().mean(), list(sliced.values()))
        for (k, v), g in zip(sliced.items(), grads):
            assert g.shape == v.shape and torch.isfinite(g).all(), (policy, r, k)


@pytest.mark.parametrize("name", CASES)
def test_submodel_equals_full_model_with_dropped_channels_off(name):
    """Zeroing the producers (dim 0) of every dropped channel turns those channels off in
    the full model (BN weight and bias 0 give exact zeros, which ReLU, pooling, identity
    shortcuts and the next layer pass on as nothing). The sliced model must then compute the
    same outputs; a layout that ties the wrong dimensions (e.g. an identity shortcut whose
    input and output were given different groups) mixes channels under a random plan and fails."""
    case = CASES[name]
    module, tensors = real_model(case)
    layout = module.layout()
    model = FunctionalModule(lambda: case.build(case.width))
    gen = torch.Generator().manual_seed(1)
    tensors = {k: v.double() for k, v in tensors.items()}
    for r in (1 / 2, 1 / 8):
        plan = make_plan(module, case.width, POLICIES["random"], r, iteration=3)
        masked = {}
        for k, v in tensors.items():
            group = layout.dims[k][0]
            off = torch.ones(v.shape[0], dtype=torch.bool)
            if group is not None:
                off[plan[group]] = False
                v = v.clone()
                v[off] = 0
            masked[k] = v
        if case.sample is None:
            full_in = torch.zeros(BATCH, case.width, dtype=torch.float64)
            full_in[:, plan[FEATURES]] = torch.randn(BATCH, len(plan[FEATURES]), generator=gen, dtype=torch.float64)
            sub_in = full_in[:, plan[FEATURES]]
        else:
            full_in = sub_in = inputs_for(case, plan, gen, torch.float64)
        full = model(masked, full_in)
        if hasattr(module, "out_group"):
            full = full[:, plan[module.out_group]]
        sub = model(slice_tensors(tensors, layout, plan), sub_in)
        torch.testing.assert_close(sub, full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", CASES)
def test_double_backward_through_sliced_model(name):
    """A Hessian-vector product through the batch statistics matches central differences.

    The direction has unit norm and the step is small so that the differences do not cross
    a ReLU or max-pool kink; compared as whole vectors, as entries near zero carry only noise."""
    case = CASES[name]
    module, tensors = real_model(case)
    model = FunctionalModule(lambda: case.build(case.width))
    plan = make_plan(module, case.width, POLICIES["random"], 1 / 2, iteration=1)
    sliced = {k: v.double() for k, v in slice_tensors(tensors, module.layout(), plan).items()}
    gen = torch.Generator().manual_seed(2)
    images = inputs_for(case, plan, gen, torch.float64)
    labels = torch.randint(0, 3, (BATCH,), generator=gen)

    def grad(params, create_graph=False):
        params = {k: v.detach().requires_grad_() for k, v in params.items()}
        loss = F.cross_entropy(model(params, images), labels)
        return params, torch.autograd.grad(loss, list(params.values()), create_graph=create_graph)

    v = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in sliced.values()]
    norm = torch.cat([d.flatten() for d in v]).norm()
    v = [d / norm for d in v]
    params, g = grad(sliced, create_graph=True)
    hvp = torch.cat([h.flatten() for h in torch.autograd.grad(g, list(params.values()), grad_outputs=v)])
    eps = 1e-5
    plus = grad({k: t + eps * d for (k, t), d in zip(sliced.items(), v)})[1]
    minus = grad({k: t - eps * d for (k, t), d in zip(sliced.items(), v)})[1]
    differences = torch.cat([((p - m) / (2 * eps)).flatten() for p, m in zip(plus, minus)])
    assert torch.isfinite(hvp).all()
    assert (hvp - differences).norm() <= 1e-6 * hvp.norm()


@pytest.mark.parametrize("name", CASES)
def test_functional_module_is_functional_call(name):
    """FunctionalModule's slots give torch.func.functional_call's outputs, gradients and
    second-order products bit for bit, on sliced tensors, and leave the template on ``meta``."""
    case = CASES[name]
    module, tensors = real_model(case)
    model = FunctionalModule(lambda: case.build(case.width))
    template = model.module
    plan = make_plan(module, case.width, POLICIES["random"], 1 / 4, iteration=3)
    sliced = slice_tensors(tensors, module.layout(), plan)
    images = inputs_for(case, plan, torch.Generator().manual_seed(4))
    runs = []
    for forward in (model, lambda ts, *inputs: torch.func.functional_call(template, dict(ts), inputs, strict=True)):
        params = {k: v.detach().clone().requires_grad_() for k, v in sliced.items()}
        out = forward(params, images)
        grads = torch.autograd.grad(out.square().mean(), list(params.values()), create_graph=True)
        second = torch.autograd.grad(sum(g.sum() for g in grads), list(params.values()), allow_unused=True)
        runs.append([out, *grads, *(s for s in second if s is not None)])
    assert len(runs[0]) == len(runs[1]) > 1 + len(sliced)
    for ours, reference in zip(*runs):
        assert torch.equal(ours, reference)
    assert all(t.device.type == "meta" for t in [*template.parameters(), *template.buffers()])
    with pytest.raises(KeyError, match="missing"):
        model({k: v for k, v in list(sliced.items())[1:]}, images)
    assert all(t.device.type == "meta" for t in template.parameters())


def test_resnet12_runs_on_84x84_images():
    module = FunctionalModule(lambda: ResNet12(3, 8))
    torch.manual_seed(0)
    real = ResNet12(3, 8)
    out = module(init_module_tensors(real, real.layout()), torch.randn(2, 3, 84, 84))
    assert out.shape == (2, 80)


@pytest.mark.parametrize("name, cls", [("conv4", Conv4), ("resnet12", ResNet12), ("resnet18", ResNet18)])
def test_registry(name, cls):
    backbone = build_backbone(name, in_channels=1, width=8)
    assert isinstance(backbone, cls)
    assert backbone.out_group in backbone.layout().groups
    assert backbone.layout().groups[backbone.out_group] == backbone.out_features
