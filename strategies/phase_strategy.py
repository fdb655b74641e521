"""Flower's side of a phase: which node serves which partition, a phase as messages, replies as outcomes.

Everything else (sampling, plans, reply checks, aggregation, evaluation, checkpoints, records)
is :class:`rabo_flwr.loop.TrainingLoop`'s, shared with the plain engine. This class is not a
``flwr.serverapp.strategy.Strategy``: Flower's strategies run one training round on one
``ArrayRecord`` per server round (``configure_train``/``aggregate_train``), while an iteration
here is one or two phases with coverage-counted steps on different sides; subclassing would
only leave Flower's hooks unused.

Nodes and partitions. Every node answers a profile query (``query.profile``) with its
``partition-id`` and the capacity it announces. In a deployment each node serves exactly its
own partition, with the capacity it announced, and the run waits (``run.node_wait_timeout``)
for ``clients.min_available`` of them. In simulation (``virtual_clients``) Flower starts as many
SuperNodes as the federation asks for (2 unless ``num-supernodes`` says otherwise), and a phase's
i-th message goes to the node with the i-th ``partition-id`` (mod the number of nodes): the
partition travels in the message, so any number of SuperNodes runs any number of clients, and a
phase's messages are spread evenly over the nodes (Flower's simulation hands each node one
message per 0.1 s tick).

Messages travel through :mod:`rabo_flwr.arrays` (tensors to ``ArrayRecord`` and back) and
:func:`rabo_flwr.exchange.send_and_receive` (replies polled every few milliseconds instead of
Flower's fixed 0.1 s or 3 s).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from logging import WARNING

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from rabo_flwr.algorithms import Phase
from rabo_flwr.arrays import from_record, to_record
from rabo_flwr.exchange import send_and_receive
from rabo_flwr.federation import SIDES
from rabo_flwr.loop import Assignment, Outcome
from rabo_flwr.protocol import (CAPACITY, CONFIG, ITERATION, METRICS, PARTITION, PROFILE, PROFILE_QUERY,
                                train_message, update_key)


@dataclass
class NodeProfile:
    """What the server knows of a node: its data partition and the capacity it announced (None: none)."""

    partition: int
    announced_capacity: float | None


class PhaseStrategy:
    """Moves the loop's phases over a Flower :class:`~flwr.serverapp.Grid`."""

    def __init__(self, grid: Grid, *, clients: int, min_available: int, virtual_clients: bool,
                 node_wait_timeout: float, phase_timeout: float):
        self.grid = grid
        self.clients = clients
        self.min_available = min_available
        self.virtual_clients = virtual_clients
        self.node_wait_timeout = node_wait_timeout
        self.phase_timeout = phase_timeout
        self.profiles: dict[int, NodeProfile] = {}

    # ------------------------------------------------------------------ nodes

    def partitions(self, iteration: int) -> dict[int, float | None]:
        """Partitions some node serves, with the capacity that node announced."""
        self._discover()
        if self.virtual_clients:
            return {p: None for p in range(self.clients)}
        return {profile.partition: profile.announced_capacity for profile in self.profiles.values()}

    def node_of(self, partition: int, index: int) -> int:
        """The node serving ``partition``, the ``index``-th client of a phase."""
        if self.virtual_clients:
            nodes = sorted(self.profiles, key=lambda n: self.profiles[n].partition)
            return nodes[index % len(nodes)]
        return next(n for n, p in self.profiles.items() if p.partition == partition)

    def _discover(self) -> None:
        """Profile nodes not seen before; in a deployment, first wait until ``min_available`` have registered."""
        deadline = time.monotonic() + self.node_wait_timeout
        while True:
            self._query_profiles([n for n in self.grid.get_node_ids() if n not in self.profiles])
            ready = len(self.profiles) >= (1 if self.virtual_clients else self.min_available)
            if ready:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.profiles)} of {self.min_available} nodes registered within "
                                   f"run.node_wait_timeout={self.node_wait_timeout:g} s (a deployment needs one "
                                   f"SuperNode per partition, --node-config \"partition-id=P\" for P in "
                                   f"0..{self.clients - 1})")
            time.sleep(0.5)

    def _query_profiles(self, nodes: list[int]) -> None:
        if not nodes:
            return
        messages = [Message(RecordDict(), dst_node_id=n, message_type=PROFILE_QUERY) for n in nodes]
        # a node's first message starts its ClientApp (imports, data): give it the node wait, not a phase's time
        for reply in send_and_receive(self.grid, messages, timeout=self.node_wait_timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "node %s did not answer its profile query: %s", node, reply.error.reason)
                continue
            profile = reply.content[PROFILE]
            partition, announced = int(profile[PARTITION]), float(profile[CAPACITY])
            if not 0.0 <= announced <= 1.0:
                log(WARNING, "node %s announced capacity %s outside (0, 1]; it is left out", node, announced)
                continue
            if not self.virtual_clients and not 0 <= partition < self.clients:
                log(WARNING, "node %s announced partition %d outside 0..%d; it is left out", node, partition,
                    self.clients - 1)
                continue
            if any(p.partition == partition for p in self.profiles.values()):
                log(WARNING, "node %s announced partition %d, which another node already has; it is left out",
                    node, partition)
                continue
            self.profiles[node] = NodeProfile(partition, announced if announced > 0 else None)

    # ------------------------------------------------------------------ phases

    def run_phase(self, phase: Phase, iteration: int, assignments: list[Assignment]) -> list[Outcome]:
        """One message per assignment; replies that arrive within ``phase_timeout`` become outcomes."""
        sent: dict[int, Message] = {}
        for index, a in enumerate(assignments):
            content = RecordDict({side: to_record(slices) for side, slices in a.arrays.items()})
            content[CONFIG] = ConfigRecord({ITERATION: iteration, PARTITION: a.partition, CAPACITY: a.capacity})
            sent[a.partition] = Message(content, dst_node_id=self.node_of(a.partition, index),
                                        message_type=train_message(phase.name), group_id=str(iteration))
        replies = send_and_receive(self.grid, list(sent.values()), timeout=self.phase_timeout)
        partition_of = {m.metadata.message_id: p for p, m in sent.items()}
        return [self._outcome(partition_of[r.metadata.reply_to_message_id], r, phase)
                for r in replies if r.metadata.reply_to_message_id in partition_of]

    def _outcome(self, partition: int, reply: Message, phase: Phase) -> Outcome:
        if reply.has_error():
            return Outcome(partition, error=reply.error.reason)
        content = reply.content
        try:
            updates = {side: from_record(content[update_key(side)])
                       for side in SIDES if update_key(side) in content.array_records}
            metrics = dict(content[METRICS]) if METRICS in content.metric_records else {}
        except Exception as err:  # noqa: BLE001 - an undecodable payload is the client's fault, not the run's
            updates, metrics = {}, {}
            log(WARNING, "partition %d: undecodable reply (%s)", partition, err)
        if self.profiles and not self.virtual_clients:  # a node may announce a new capacity with any reply
            self._update_capacity(reply.metadata.src_node_id, metrics.get(CAPACITY, 0.0))
        return Outcome(partition, updates, metrics)

    def _update_capacity(self, node: int, capacity: float) -> None:
        if node in self.profiles and 0 < capacity <= 1:
            self.profiles[node].announced_capacity = float(capacity)
