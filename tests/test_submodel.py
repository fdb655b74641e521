"""Submodels: slicing really shrinks tensors, and scattering back leaves the rest untouched."""

from __future__ import annotations


import pytest
import torch

from rabo_flwr.masks import RandomMask, StaticMask, build_plan
from rabo_flwr.models import Conv4, LinearHead
from rabo_flwr.submodel import kept_count, numel_in_plan, open_index, scatter_into, slice_tensor, slice_tensors
from rabo_flwr.tasks.base import FunctionalModule, init_module_tensors


def conv4_with_head(width=16):
    backbone = Conv4(1, width)
    head = LinearHead(backbone.out_features, 5, backbone.out_group)
    layouts = {"x": backbone.layout(), "y": head.layout()}
    return backbone, head, layouts


@pytest.mark.parametrize("r,size,expected", [(1, 64, 64), (0.5, 64, 32), (1 / 16, 64, 4), (1 / 3, 10, 4), (0.01, 5, 1)])
def test_kept_count_is_ceil(r, size, expected):
    assert kept_count(r, size) == expected


@pytest.mark.parametrize("r", [0.0, -0.5, 1.5])
def test_kept_count_rejects_capacity_outside_unit_interval(r):
    with pytest.raises(ValueError, match="capacity"):
        kept_count(r, 8)


def test_slice_then_scatter_round_trip_changes_only_the_slice():
    torch.manual_seed(0)
    backbone, head, layouts = conv4_with_head()
    x = init_module_tensors(backbone, layouts["x"])
    plan = build_plan(layouts, {"x": RandomMask(3), "y": RandomMask(3)}, 0.25, iteration=2, client=1)
    for name, tensor in x.items():
        dims = layouts["x"].dims[name]
        piece = slice_tensor(tensor, dims, plan)
        assert piece.numel() < tensor.numel()
        # unchanged values scatter back to the identical tensor
        assert torch.equal(scatter_into(tensor, piece, dims, plan), tensor)
        # a modified slice lands exactly on the kept entries
        back = scatter_into(tensor, piece + 1.0, dims, plan)
        mask = torch.zeros_like(tensor, dtype=torch.bool)
        mask[open_index(dims, tensor.shape, plan)] = True
        assert torch.equal(back[~mask], tensor[~mask])
        assert torch.allclose(back[mask], tensor[mask] + 1.0)


def test_narrow_client_runs_a_physically_smaller_network():
    backbone, head, layouts = conv4_with_head(width=64)
    x = init_module_tensors(backbone, layouts["x"])
    y = init_module_tensors(head, layouts["y"])
    plan = build_plan(layouts, {"x": StaticMask(), "y": StaticMask()}, 1 / 16, 0, 0)
    xs, ys = slice_tensors(x, layouts["x"], plan), slice_tensors(y, layouts["y"], plan)
    assert xs["blocks.0.0.conv.weight"].shape == (4, 1, 3, 3)
    assert xs["blocks.1.0.conv.weight"].shape == (4, 4, 3, 3)
    assert ys["fc.weight"].shape == (5, 4)
    full = sum(t.numel() for t in x.values())
    assert numel_in_plan(x, layouts["x"], plan) == sum(t.numel() for t in xs.values()) < full / 100
    features = FunctionalModule(lambda: Conv4(1, 64))(xs, torch.rand(3, 1, 28, 28))
    assert features.shape == (3, 4)

