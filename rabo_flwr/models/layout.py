"""Helpers that spell out grouped dimensions for common layers."""

from __future__ import annotations

from ..submodel import Layout


class ModuleLayout:
    """Accumulates ``tensor name -> grouped dims`` while a model describes itself."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.groups: dict[str, int] = {}
        self.dims: dict[str, tuple] = {}

    def group(self, name: str, size: int) -> str:
        full = f"{self.prefix}.{name}"
        self.groups[full] = size
        return full

    def conv(self, name: str, out_group: str | None, in_group: str | None, bias: bool = False) -> None:
        self.dims[f"{name}.weight"] = (out_group, in_group, None, None)
        if bias:
            self.dims[f"{name}.bias"] = (out_group,)

    def linear(self, name: str, out_group: str | None, in_group: str | None, bias: bool = True) -> None:
        self.dims[f"{name}.weight"] = (out_group, in_group)
        if bias:
            self.dims[f"{name}.bias"] = (out_group,)

    def norm(self, name: str, group: str | None, running_stats: bool = False) -> None:
        self.dims[f"{name}.weight"] = (group,)
        self.dims[f"{name}.bias"] = (group,)
        if running_stats:
            self.dims[f"{name}.running_mean"] = (group,)
            self.dims[f"{name}.running_var"] = (group,)

    def build(self) -> Layout:
        return Layout(groups=dict(self.groups), dims=dict(self.dims))
