"""Finding and stopping the processes a Flower run starts (by pid, never by name).

Flower's local SuperLink is detached and outlives ``flwr run``; each SuperExec starts in a new
session; Ray forks workers. So neither a process group nor a command line finds them all: a
private Flower home marks everything (its path is in their environment or command line), and
:func:`stop_processes` takes each pid's whole tree.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path
from typing import Iterable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def ancestors() -> set[int]:
    """This process and its parents, which a cleanup must never signal."""
    pids, pid = set(), os.getpid()
    while pid and pid > 1:
        pids.add(pid)
        pid = _parent(pid)
    return pids


def _pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie holds its pid until its parent reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except (OSError, IndexError):
        return False


def processes_marked(text: str) -> list[int]:
    """Running pids (not this process or its parents) whose command line or environment mentions ``text``."""
    marker, found, spared = text.encode(), [], ancestors()
    for pid in _pids():
        if pid in spared:
            continue
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes() or marker in Path(f"/proc/{pid}/environ").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return [p for p in found if running(p)]


def process_tree(pids: Iterable[int]) -> set[int]:
    """The pids and all their descendants (collected before a parent's death re-parents them)."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        parent = _parent(pid)
        if parent is not None:
            children.setdefault(parent, []).append(pid)
    tree, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in tree:
            tree.add(pid)
            todo += children.get(pid, [])
    return tree - ancestors()


def stop_processes(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM the pids and their descendants, SIGKILL what is left after ``grace`` seconds."""
    tree = process_tree(pids)
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        tree |= process_tree(p for p in tree if running(p))
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(running(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not any(running(p) for p in tree):
            return
