"""The same server and client computation as the Flower app, in a plain Python loop.

Used by the benchmark to measure Flower's overhead and by tests that need the algorithm's
numbers without starting Ray.
"""

from __future__ import annotations

import time
from typing import Callable


from clients import BilevelClient

from .federation import BilevelServer, Reply, sample_clients
from .masks import make_policy
from .runtime import cached_task, choose_device
from .scenario import Scenario


def _nbytes(tensors) -> int:
    """Raw tensor bytes (Flower's count adds a little metadata per array)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_plain(scenario: Scenario, log: Callable[[dict], None] = lambda r: None, evaluate: bool = True) -> BilevelServer:
    """Run ``scenario`` without Flower; client sampling matches the strategy's."""
    task = cached_task(scenario)
    task.prepare()
    device = choose_device(scenario)
    algo = scenario.algorithm
    x, y = task.init_tensors(scenario.seed)
    policies = {side: make_policy(getattr(algo, f"mask_{side}"), scenario.seed, algo.rolling_step) for side in ("x", "y")}
    server = BilevelServer(task.layouts, x, y, policies, algo.alpha, algo.beta)
    clients = {p: BilevelClient(task, scenario, p, device) for p in range(scenario.clients.num)}
    if evaluate:
        log({"iteration": 0, "phase": "eval", **task.evaluate(server.x, server.y, device)})
    for q in range(1, algo.iterations + 1):
        chosen = sample_clients(list(clients), scenario.clients.fraction, scenario.seed, q)
        server.plan_iteration(q, {p: scenario.capacity(p, q) for p in chosen})
        for phase in ("inner", "outer"):
            start = time.perf_counter()
            replies, metrics = [], []
            for p in server.plans:
                sent = server.slices(p)
                update, m = getattr(clients[p], phase)(q, sent["x"], sent["y"])
                replies.append(Reply(p, update))
                metrics.append(m | {"bytes_down": _nbytes(sent["x"]) + _nbytes(sent["y"]), "bytes_up": _nbytes(update)})
            log(server.finish_phase(phase, q, replies, metrics, sent=len(replies), started=start))
    if evaluate:
        log({"iteration": algo.iterations, "phase": "eval", **task.evaluate(server.x, server.y, device)})
    return server
