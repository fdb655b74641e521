"""Structured submodels: which channels a client keeps, and moving tensors in and out of them.

A model declares *channel groups* (a named set of channels, e.g. the output channels of one
conv block) and, for every tensor in its state, which group each dimension belongs to
(``None`` for dimensions that are never pruned, such as image input channels, class outputs
and kernel sizes). A submodel is then just a map ``group -> kept indices``; every tensor is
sliced with ``index_select`` along its grouped dimensions, so a client really holds and
computes a narrower network, and only those slices travel.

``algorithm.submodel`` says what a plan's kept channels give a client (:func:`held_layout`):
``sliced`` (the default) the sub-network of those channels, as above; ``segment`` the filters of
those channels inside the full network, which the client forwards whole, every other element a
constant at the server's value (``rabo_flwr.tasks.segment``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

DimGroups = tuple  # per-dimension group name or None, e.g. ("conv1", "conv0", None, None)


@dataclass(frozen=True)
class Layout:
    """Named tensors of one side of the bilevel problem (x or y) and their grouped dims.

    ``groups`` are the channel groups this side owns (its mask policy decides them);
    ``dims`` may also refer to groups owned by the other side (a head reads the backbone's
    channels), which is why plans span both sides.

    ``owners`` names groups whose elements belong to data partitions rather than to a model
    (hyper-cleaning's one weight per training example): partition p holds exactly
    ``owners[group][p]`` (sorted indices), whatever its capacity and the side's mask policy.
    Owned index sets are disjoint, so each such element has one holder, and coverage-counted
    aggregation (count 1) gives it exactly its holder's update.
    """

    groups: Mapping[str, int]
    dims: Mapping[str, DimGroups]
    owners: Mapping[str, Sequence[torch.Tensor]] = field(default_factory=dict)


SUBMODELS = ("sliced", "segment")  # algorithm.submodel: what a client holds of its plan's channels


def held_layout(layout: Layout, submodel: str) -> Layout:
    """The layout of what a client holds of ``layout``'s tensors under ``algorithm.submodel``.

    ``sliced``: ``layout`` itself, an element is held iff every grouped index of it is kept (a
    conv between two groups is held on r^2 of its weights, the sub-network of the kept channels).
    ``segment``: an element is held iff its *output* channel is kept, the first dimension (the
    order of PyTorch's conv, linear and norm tensors, which ``ModuleLayout`` keeps): a kept
    filter's weight row, bias and BatchNorm entries, whichever channels it reads. A client of
    capacity r then trains r of every layer's weights, in the context of the whole network (it
    forwards the full model), and clients whose kept windows tile a group train all of it in one
    iteration. Tensors whose first dimension is ungrouped (a head's class outputs) are held whole.
    """
    if submodel == "sliced":
        return layout
    if submodel != "segment":
        raise ValueError(f"unknown submodel {submodel!r}; choose one of {SUBMODELS}")
    dims = {name: groups[:1] + (None,) * (len(groups) - 1) for name, groups in layout.dims.items()}
    return Layout(groups=layout.groups, dims=dims, owners=layout.owners)


def kept_count(capacity: float, size: int) -> int:
    """ceil(r * size), at least one channel: the width a client of capacity r trains."""
    if not 0.0 < capacity <= 1.0:
        raise ValueError(f"capacity must be in (0, 1], got {capacity}")
    return max(1, math.ceil(capacity * size - 1e-9))


Plan = Mapping[str, torch.Tensor]  # group name -> sorted LongTensor of kept indices


def _index_for(dim_groups: DimGroups, shape: torch.Size, plan: Plan) -> list[torch.Tensor | None]:
    out = []
    for size, group in zip(shape, dim_groups):
        if group is None or group not in plan or len(plan[group]) == size and _is_identity(plan[group]):
            out.append(None)
        else:
            out.append(plan[group])
    return out


def _is_identity(idx: torch.Tensor) -> bool:
    return bool(torch.equal(idx, torch.arange(len(idx), device=idx.device)))


def slice_tensor(tensor: torch.Tensor, dim_groups: DimGroups, plan: Plan) -> torch.Tensor:
    """The client's slice of a global tensor (a copy, physically smaller)."""
    out = tensor
    for dim, idx in enumerate(_index_for(dim_groups, tensor.shape, plan)):
        if idx is not None:
            out = out.index_select(dim, idx.to(out.device))
    return out if out is not tensor else tensor.clone()


def slice_tensors(tensors: Mapping[str, torch.Tensor], layout: Layout, plan: Plan) -> dict[str, torch.Tensor]:
    return {name: slice_tensor(tensors[name], layout.dims[name], plan) for name in layout.dims}


def sliced_shape(shape: torch.Size, dim_groups: DimGroups, plan: Plan) -> tuple[int, ...]:
    return tuple(
        size if idx is None else len(idx)
        for size, idx in zip(shape, _index_for(dim_groups, shape, plan))
    )


def open_index(dim_groups: DimGroups, shape: torch.Size, plan: Plan) -> tuple[torch.Tensor, ...]:
    """Broadcastable index tuple addressing the slice inside the global tensor.

    ``global[open_index(...)]`` is the slice; ``index_put_(open_index(...), values,
    accumulate=True)`` scatters a client's values back in one vectorised call.
    """
    idx = _index_for(dim_groups, shape, plan)
    ndim = len(shape)
    out = []
    for dim, (size, kept) in enumerate(zip(shape, idx)):
        kept = torch.arange(size) if kept is None else kept
        view = [1] * ndim
        view[dim] = len(kept)
        out.append(kept.reshape(view))
    return tuple(out)


def scatter_into(target: torch.Tensor, values: torch.Tensor, dim_groups: DimGroups, plan: Plan) -> torch.Tensor:
    """Write a client's slice back into (a copy of) the global tensor; the rest is unchanged.

    Differentiable in ``values`` (to any order): a segment client's losses see its held slices
    through it (``rabo_flwr.tasks.segment``)."""
    out = target.clone()
    if out.ndim == 0:
        out.copy_(values)
        return out
    index = tuple(i.to(out.device) for i in open_index(dim_groups, out.shape, plan))
    out.index_put_(index, values.to(out.dtype))
    return out


def numel_in_plan(tensors: Mapping[str, torch.Tensor], layout: Layout, plan: Plan) -> int:
    """Number of elements a client with this plan holds on this side."""
    return sum(math.prod(sliced_shape(tensors[n].shape, layout.dims[n], plan)) for n in layout.dims)


def plan_key(plan: Plan) -> str:
    """A digest of a plan's kept indices, group by group: equal digests, equal submodels (a client's
    state is read only on the submodel it was made on, :class:`~rabo_flwr.algorithms.ClientState`)."""
    digest = hashlib.sha256()
    for group in sorted(plan):
        indices = plan[group].detach().cpu().to(torch.int64).contiguous()
        digest.update(f"{group}:{indices.numel()}:".encode())
        digest.update(indices.numpy().tobytes())
    return digest.hexdigest()[:16]
