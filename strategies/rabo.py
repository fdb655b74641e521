"""RABO/RAFBO as a Flower strategy: each global iteration is two message rounds.

``train.inner`` sends every sampled client its slices of x_q and y_q and aggregates G into
y_{q+1}; ``train.outer`` sends the slices of x_q and y_{q+1} and aggregates H into x_{q+1}.
The arithmetic lives in :class:`rabo_flwr.federation.BilevelServer`; this class only samples
nodes, builds and checks messages, and logs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from rabo_flwr.federation import BilevelServer, Reply, check_update, sample_clients
from rabo_flwr.masks import MaskPolicy
from rabo_flwr.submodel import Layout


INNER, OUTER = "inner", "outer"


@dataclass
class NodeProfile:
    """What the server knows of a node: its data partition and the capacity it announced."""

    partition: int
    announced_capacity: float | None


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


class RaboStrategy(Strategy):
    """Two-phase bilevel rounds with partial participation and coverage-counted aggregation.

    ``capacity_of(partition, iteration)`` is the scenario's resource profile; a node that
    announces its own capacity (deployment ``--node-config capacity=...``) overrides it.
    """

    def __init__(
        self,
        layouts: Mapping[str, Layout],
        policies: Mapping[str, MaskPolicy],
        *,
        alpha: float,
        beta: float,
        fraction: float,
        min_available: int,
        capacity_of: Callable[[int, int], float],
        seed: int,
        log_record: Callable[[dict], None],
        phase_timeout: float = 3600.0,
    ):
        self.layouts = dict(layouts)
        self.policies = dict(policies)
        self.alpha, self.beta = alpha, beta
        self.fraction = fraction
        self.min_available = min_available
        self.capacity_of = capacity_of
        self.seed = seed
        self.log_record = log_record
        self.phase_timeout = phase_timeout
        self.profiles: dict[int, NodeProfile] = {}
        self.server: BilevelServer | None = None
        self._selected: dict[int, int] = {}  # node id -> partition, this iteration
        self._capacities: dict[int, float] = {}  # partition -> capacity, this iteration
        self._bytes_down: dict[int, int] = {}  # partition -> bytes of the arrays sent in this phase

    # ------------------------------------------------------------------ Flower's Strategy interface

    def summary(self) -> None:
        log(INFO, "RaboStrategy: alpha=%s beta=%s fraction=%s min_available=%s masks=%s",
                 self.alpha, self.beta, self.fraction, self.min_available,
                 {side: p.name for side, p in self.policies.items()})

    # Flower's Strategy interface covers one training round; ``start`` drives both phases of an
    # iteration through ``_phase_messages``/``_aggregate``, which these wrap for the inner phase.
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Messages of the inner phase (``train.inner``)."""
        return self._phase_messages(INNER, server_round, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """y_{q+1} from the inner replies that arrived and passed the checks."""
        record = self._aggregate(INNER, server_round, replies)
        return tensors_to_record(self.server.y), MetricRecord({k: v for k, v in record.items() if isinstance(v, (int, float))})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        """Evaluation is centralised on the server's held-out episodes; no client round."""
        return []

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ the run

    def start(  # pylint: disable=arguments-differ
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int,
        timeout: float = 3600.0,
        train_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, dict, dict], dict] | None = None,
        eval_every: int = 0,
        first_round: int = 1,
        on_round_end: Callable[[int, BilevelServer], None] | None = None,
    ) -> Result:
        """Run ``num_rounds`` global iterations; ``initial_arrays`` holds ``x.*`` and ``y.*`` tensors."""
        self.summary()
        state = initial_arrays.to_torch_state_dict()
        x = {k[2:]: v for k, v in state.items() if k.startswith("x.")}
        y = {k[2:]: v for k, v in state.items() if k.startswith("y.")}
        self.server = BilevelServer(self.layouts, x, y, self.policies, self.alpha, self.beta)
        config = train_config or ConfigRecord()
        result = Result()
        self._wait_for_nodes(grid, timeout)
        if evaluate_fn is not None and first_round == 1:
            self._evaluate(evaluate_fn, 0, result)
        for q in range(first_round, num_rounds + 1):
            self._refresh_profiles(grid, timeout)
            self._select(q)
            for phase in (INNER, OUTER):
                phase_start = time.perf_counter()
                messages = list(self._phase_messages(phase, q, config, grid))
                replies = list(grid.send_and_receive(messages, timeout=self.phase_timeout))
                record = self._aggregate(phase, q, replies, sent=len(messages), started=phase_start)
                result.train_metrics_clientapp[q] = MetricRecord(
                    {k: v for k, v in record.items() if isinstance(v, (int, float))})
            if evaluate_fn is not None and (q == num_rounds or (eval_every and q % eval_every == 0)):
                self._evaluate(evaluate_fn, q, result)
            if on_round_end is not None:
                on_round_end(q, self.server)
        result.arrays = self.global_record()
        return result

    def global_record(self) -> ArrayRecord:
        return tensors_to_record({f"x.{k}": v for k, v in self.server.x.items()} | {f"y.{k}": v for k, v in self.server.y.items()})

    # ------------------------------------------------------------------ nodes

    def _wait_for_nodes(self, grid: Grid, timeout: float) -> None:
        """Nodes register asynchronously: wait until ``min_available`` have."""
        deadline = time.monotonic() + timeout
        while len(list(grid.get_node_ids())) < self.min_available:
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(list(grid.get_node_ids()))} of {self.min_available} nodes registered")
            time.sleep(0.5)

    def _refresh_profiles(self, grid: Grid, timeout: float) -> None:
        """Ask nodes not seen before for their partition and announced capacity (``query.profile``)."""
        new = [n for n in grid.get_node_ids() if n not in self.profiles]
        if not new:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type="query.profile") for n in new]
        # a node's first message starts its ClientApp (imports, data): give it the node wait, not a phase's time
        for reply in grid.send_and_receive(messages, timeout=timeout):
            if reply.has_error():
                log(WARNING, "node %s did not answer its profile query: %s", reply.metadata.src_node_id, reply.error.reason)
                continue
            metrics = reply.content["profile"]
            node, announced, partition = reply.metadata.src_node_id, float(metrics["capacity"]), int(metrics["partition"])
            if not 0.0 <= announced <= 1.0:
                log(WARNING, "node %s announced capacity %s outside (0, 1]; it is left out", node, announced)
                continue
            if any(p.partition == partition for p in self.profiles.values()):
                log(WARNING, "node %s announced partition %d, which another node already has; it is left out",
                    node, partition)
                continue
            self.profiles[node] = NodeProfile(partition, announced if announced > 0 else None)

    def _select(self, iteration: int) -> None:
        """A seeded fraction of the known nodes, chosen by partition so runs repeat."""
        node_of = {p.partition: node for node, p in self.profiles.items()}
        if not node_of:
            raise RuntimeError("no node answered the profile query; check the SuperNodes' logs")
        chosen = sample_clients(list(node_of), self.fraction, self.seed, iteration)
        self._selected = {node_of[partition]: partition for partition in chosen}
        capacities = {}
        for node, partition in self._selected.items():
            announced = self.profiles[node].announced_capacity
            capacities[partition] = announced if announced is not None else self.capacity_of(partition, iteration)
        self._capacities = capacities
        self.server.plan_iteration(iteration, capacities)

    # ------------------------------------------------------------------ phases

    def _phase_messages(self, phase: str, iteration: int, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self._bytes_down = {}
        for node, partition in self._selected.items():
            slices = self.server.slices(partition)
            x, y = tensors_to_record(slices["x"]), tensors_to_record(slices["y"])
            self._bytes_down[partition] = x.count_bytes() + y.count_bytes()
            content = RecordDict({
                "x": x,
                "y": y,
                "config": ConfigRecord({**dict(config), "iteration": iteration, "partition": partition,
                                        "capacity": self._capacities[partition]}),
            })
            yield Message(content, dst_node_id=node, message_type=f"train.{phase}", group_id=str(iteration))

    def _aggregate(self, phase: str, iteration: int, replies: Iterable[Message], sent: int | None = None,
                   started: float | None = None) -> dict:
        start = time.perf_counter()
        side = "y" if phase == INNER else "x"
        accepted, clients, failures, rejected = [], [], 0, 0
        loss_key = "lower_loss" if phase == INNER else "upper_loss"
        for reply in replies:
            node = reply.metadata.src_node_id
            partition = self._selected.get(node)
            if reply.has_error() or partition is None:
                failures += 1
                log(WARNING, "iteration %d %s: node %s failed: %s", iteration, phase, node,
                    reply.error.reason if reply.has_error() else "not selected")
                continue
            parsed = self._parse_reply(reply, partition, side, loss_key)
            if isinstance(parsed, str):
                rejected += 1
                log(WARNING, "iteration %d %s: rejected the reply of partition %d: %s", iteration, phase, partition, parsed)
                continue
            update, metrics, size = parsed
            if 0 < metrics.get("capacity", 0) <= 1 and node in self.profiles:
                self.profiles[node].announced_capacity = float(metrics["capacity"])
            accepted.append(Reply(partition, update))
            clients.append(metrics | {"bytes_up": size, "bytes_down": self._bytes_down.get(partition, 0)})
        sent = len(self._selected) if sent is None else sent
        failures += sent - (len(accepted) + rejected + failures)
        record = self.server.finish_phase(phase, iteration, accepted, clients, sent, failures, rejected,
                                          started if started is not None else start)
        self.log_record(record)
        log(INFO, "iteration %d %s: %d/%d aggregated, %s=%s, C_%s*=%d, uncovered=%.3f",
            iteration, phase, len(accepted), sent, loss_key, record[loss_key], side,
            record[f"C_{side}*"], record[f"uncovered_{side}"])
        return record

    REQUIRED_METRICS = ("flops", "wall_time")

    def _parse_reply(self, reply: Message, partition: int, side: str, loss_key: str):
        """(update, metrics, bytes) of a well-formed reply, or the reason to reject it."""
        content = reply.content
        if "update" not in content.array_records or "metrics" not in content.metric_records:
            return f"missing records (has {sorted(content.keys())})"
        record = content["update"]
        try:
            update = record.to_torch_state_dict()
        except Exception as err:  # noqa: BLE001 - any undecodable payload is a bad reply
            return f"undecodable arrays: {err}"
        problem = check_update(update, self.server.expected_shapes(partition, side))
        if problem:
            return problem
        metrics = dict(content["metrics"])
        missing = [k for k in (loss_key, *self.REQUIRED_METRICS) if k not in metrics]
        if missing:
            return f"missing metrics {missing}"
        return update, metrics, record.count_bytes()

    def _evaluate(self, evaluate_fn, iteration: int, result: Result) -> None:
        start = time.perf_counter()
        metrics = evaluate_fn(iteration, self.server.x, self.server.y)
        metrics = dict(metrics, eval_time=time.perf_counter() - start)
        result.evaluate_metrics_serverapp[iteration] = MetricRecord(metrics)
        self.log_record({"iteration": iteration, "phase": "eval", **metrics})
        log(INFO, "iteration %d evaluation: %s", iteration, metrics)
