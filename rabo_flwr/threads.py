"""Torch thread counts: a block on a given count, and work split over Python threads that gives
the bits of one thread."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TypeVar

import torch

Part = TypeVar("Part")
Result = TypeVar("Result")
_PART_THREADS: ContextVar[int] = ContextVar("part_threads", default=1)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextmanager
def part_threads(count: int) -> Iterator[None]:
    """Let :func:`map_one_thread_each` in the block run up to ``count`` parts at once. The loop gives
    the evaluation the run's threads this way, so a task's ``evaluate`` keeps its signature and a
    task that does not split its work is unaffected."""
    token = _PART_THREADS.set(count)
    try:
        yield
    finally:
        _PART_THREADS.reset(token)


def part_thread_count() -> int:
    """The parts :func:`map_one_thread_each` may run at once here (1 outside :func:`part_threads`)."""
    return _PART_THREADS.get()


def map_one_thread_each(fn: Callable[[Part], Result], parts: Sequence[Part]) -> list[Result]:
    """``[fn(part) for part in parts]`` with every torch operation on one thread, up to
    :func:`part_threads` parts at a time in Python threads (torch releases the GIL in its kernels).

    The results are those of one torch thread, bit for bit, whatever the count: each part's
    operations are the same, only when they run changes. Worth it where one operation is too small
    to share threads (a Conv4 on one episode's 5 to 100 images), so splitting the work itself uses
    the cores. ``fn`` must be safe to call from several threads at once; it runs with the caller's
    grad mode (a new thread's would be on), and other thread-local state of the caller's (context
    variables, torch's inference mode) does not reach it.
    """
    threads = min(part_thread_count(), len(parts))
    grad = torch.is_grad_enabled()

    def run(part: Part) -> Result:
        with torch.set_grad_enabled(grad):
            return fn(part)

    with torch_threads(1):
        if threads <= 1:
            return [fn(part) for part in parts]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(run, parts))
