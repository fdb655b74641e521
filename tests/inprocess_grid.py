"""A Grid that delivers messages to the real ClientApp in this process.

It lets tests drive the real strategy, the real ClientApp dispatch and the client code
(faults, bad replies, resume) in seconds, without Ray; the end-to-end tests use Flower's engines.
"""

from __future__ import annotations

import uuid
from typing import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from rabo_flwr import client_app
from rabo_flwr.protocol import NODE_PARTITION


class InProcessGrid(Grid):
    """Nodes 101, 102, ... with partition ids 0, 1, ...; ``tamper`` may rewrite or drop a reply."""

    def __init__(self, run_config: dict, num_nodes: int, node_configs: dict[int, dict] | None = None,
                 tamper: Callable[[Message, Message], Message | None] | None = None):
        self.contexts = {
            101 + p: Context(run_id=1, node_id=101 + p,
                             node_config={NODE_PARTITION: p, **(node_configs or {}).get(p, {})},
                             state=RecordDict(), run_config=dict(run_config))
            for p in range(num_nodes)
        }
        self.tamper = tamper
        self.sent: list[Message] = []
        self.replies: dict[str, Message] = {}  # message id -> reply not pulled yet
        # Messages read the sender's identity from the process; Flower sets it in its own processes.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver each message to its node's ClientApp at once; the reply waits to be pulled."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # as Grid.push_messages does
            self.sent.append(message)
            try:
                reply = client_app.app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - a failing client becomes an error reply, as in Flower
                reply = Message(Error(code=0, reason=repr(err)), reply_to=message)
            if self.tamper is not None:
                reply = self.tamper(message, reply)
            if reply is not None:
                self.replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
