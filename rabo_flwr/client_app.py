"""ClientApp: message handlers around :class:`clients.BilevelClient`."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import BilevelClient

from .runtime import cached_task, choose_device
from .scenario import scenario_from_run_config

app = ClientApp()


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


def _announced_capacity(context: Context) -> float:
    """The node's own ``capacity`` (deployment ``--node-config``); 0 leaves it to the scenario's profile."""
    return float(context.node_config.get("capacity", 0.0))


def _client(context: Context) -> BilevelClient:
    scenario = scenario_from_run_config(context.run_config)
    return BilevelClient(cached_task(scenario), scenario, _partition(context), choose_device(scenario))


def _handle(phase: str, message: Message, context: Context) -> Message:
    client = _client(context)
    iteration = int(message.content["config"]["iteration"])
    x = message.content["x"].to_torch_state_dict()
    y = message.content["y"].to_torch_state_dict()
    update, metrics = getattr(client, phase)(iteration, x, y)
    metrics["capacity"] = _announced_capacity(context)
    return Message(RecordDict({"update": ArrayRecord(update), "metrics": MetricRecord(metrics)}), reply_to=message)


@app.train("inner")
def inner(message: Message, context: Context) -> Message:
    return _handle("inner", message, context)


@app.train("outer")
def outer(message: Message, context: Context) -> Message:
    return _handle("outer", message, context)


@app.query("profile")
def profile(message: Message, context: Context) -> Message:
    """Partition id and announced capacity (0 when the node leaves it to the scenario)."""
    profile = {"partition": _partition(context), "capacity": _announced_capacity(context)}
    return Message(RecordDict({"profile": MetricRecord(profile)}),
                   reply_to=message)
