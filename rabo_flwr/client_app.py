"""ClientApp: message handlers around :class:`clients.Client` (messages in, tensors through, messages out)."""

from __future__ import annotations

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import Client

from .protocol import CAPACITY, CONFIG, ITERATION, METRICS, NODE_CAPACITY, NODE_PARTITION, PARTITION, PHASES, PROFILE, update_key
from .arrays import from_record, to_record
from .runtime import run_setup

app = ClientApp()


def _announced_capacity(context: Context) -> float:
    """The node's own ``capacity`` (deployment ``--node-config``); 0 leaves it to the scenario's profile."""
    return float(context.node_config.get(NODE_CAPACITY, 0.0))


def _handle(phase: str, message: Message, context: Context) -> Message:
    """Run ``phase`` for the partition named in the message (in simulation one node serves several)."""
    setup = run_setup(context.run_id, context.run_config)
    config = message.content[CONFIG]
    client = Client(setup.task, setup.scenario, int(config[PARTITION]), setup.device)
    arrays = {side: from_record(record) for side, record in message.content.array_records.items()}
    updates, metrics = client.run(phase, int(config[ITERATION]), arrays)
    metrics[CAPACITY] = _announced_capacity(context)
    content = RecordDict({update_key(side): to_record(u) for side, u in updates.items()})
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=message)


def _register(phase: str) -> None:
    app.train(phase)(lambda message, context: _handle(phase, message, context))


for _phase in PHASES:
    _register(_phase)


@app.query(PROFILE)
def profile(message: Message, context: Context) -> Message:
    """Partition id and announced capacity (0 when the node leaves it to the scenario)."""
    reply = {PARTITION: int(context.node_config[NODE_PARTITION]), CAPACITY: _announced_capacity(context)}
    return Message(RecordDict({PROFILE: MetricRecord(reply)}), reply_to=message)
