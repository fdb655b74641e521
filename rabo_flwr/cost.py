"""What a client's phase costs: FLOPs, wall time and peak memory.

FLOPs come from ``torch.utils.flop_counter``, which dispatches every operator through Python
and roughly triples the time of whatever it watches on a CPU. The count of a model evaluation
depends only on the shapes involved, so :class:`CostMeter` counts each distinct unit of work
(a named computation on given tensor shapes, e.g. "grad_y of g on this submodel and batch")
once per process and adds the remembered count every later time the unit runs. A phase's
total is then exact, including estimators whose number of products varies from call to call
(conjugate gradient, truncated Neumann series), at the price of one counted run per unit.
``tests/test_cost.py`` checks the total against a full count.

The counts are also kept on disk (``$RABO_CACHE_DIR/flops``, keyed by the unit, the torch
version and a hash of this project's source), because a deployment runs every message in a
fresh process: without them each message would count again, and its first count imports
``torch._dynamo`` (seconds).
"""

from __future__ import annotations

import hashlib
import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, TypeVar

import torch

T = TypeVar("T")

# (unit name, shapes, context) -> FLOPs of one run; per process, shared by every meter
_UNIT_FLOPS: dict[Hashable, int] = {}


@lru_cache(maxsize=1)
def _source_hash() -> str:
    """A hash of this project's Python source: what a unit computes, hence its count, depends on it."""
    digest = hashlib.sha256(torch.__version__.encode())
    root = Path(__file__).resolve().parent
    for path in sorted([*root.rglob("*.py"), *(root.parent / "clients").glob("*.py")]):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _stored_count_path(key: Hashable) -> Path | None:
    """Where the count of ``key`` is kept on disk; None for a key whose text is not stable."""
    from .data.paths import cache_dir

    text = repr(key)
    if " at 0x" in text:  # an object's address: another process would not find it
        return None
    name = hashlib.sha256(f"{_source_hash()} {text}".encode()).hexdigest()[:32]
    return cache_dir() / "flops" / f"{name}.json"


def _load_count(key: Hashable) -> int | None:
    path = _stored_count_path(key)
    try:
        return int(json.loads(path.read_text())["flops"]) if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _store_count(key: Hashable, count: int) -> None:
    from .files import atomic_write

    path = _stored_count_path(key)
    if path is not None:
        try:
            atomic_write(path, lambda f: json.dump({"flops": count, "unit": repr(key)}, f), "w")
        except OSError:
            pass  # a read-only cache only costs the next process a count


def shapes(*groups: Iterable[torch.Tensor] | Any) -> tuple:
    """A hashable signature of the shapes of tensors (nested in lists, tuples or dicts)."""
    def sig(value):
        if isinstance(value, torch.Tensor):
            return tuple(value.shape)
        if isinstance(value, dict):
            return tuple((k, sig(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return tuple(sig(v) for v in value)
        return value
    return tuple(sig(g) for g in groups)


class CostMeter:
    """Meters one phase of one client.

    ``context`` identifies what shapes alone do not (the model and task); units run through
    :meth:`unit` are counted once per ``(name, shapes, context)``. ``count_flops=False``
    reports ``flops = -1``; ``cache=False`` counts every run (the reference in tests).
    """

    def __init__(self, device: torch.device, count_flops: bool = True, context: Hashable = (), cache: bool = True):
        self.device = device
        self.count_flops = count_flops
        self.context = context
        self.cache = cache
        self.flops = 0
        self.units_counted = 0  # units run under the counter (the rest reused a remembered count)

    def unit(self, name: str, signature: Hashable, work: Callable[[], T]) -> T:
        """Run ``work`` and add its FLOPs, counting them only the first time this unit is seen."""
        if not self.count_flops:
            return work()
        key = (name, signature, self.context)
        known = _UNIT_FLOPS.get(key) if self.cache else None
        if known is None and self.cache:
            known = _load_count(key)
            if known is not None:
                _UNIT_FLOPS[key] = known
        if known is not None:
            self.flops += known
            return work()
        from torch.utils.flop_counter import FlopCounterMode  # imports triton: only when counting

        with FlopCounterMode(display=False) as counter:
            result = work()
        count = counter.get_total_flops()
        _UNIT_FLOPS[key] = count
        if self.cache:
            _store_count(key, count)
        self.flops += count
        self.units_counted += 1
        return result

    def __enter__(self) -> "CostMeter":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _reset_peak_rss()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.wall_time = time.perf_counter() - self.start
        return False

    def metrics(self) -> dict[str, float]:
        return {"flops": float(self.flops) if self.count_flops else -1.0, "wall_time": self.wall_time,
                "peak_memory": float(_peak_memory(self.device))}


def _reset_peak_rss() -> None:
    """Linux: restart the process's peak-RSS count, so the peak is this phase's, not the process's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # elsewhere the peak stays the process's lifetime peak


def _peak_memory(device: torch.device) -> int:
    """CUDA peak allocation on GPU; on CPU the peak resident set size since the phase began."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
