"""ClientApp: message handlers around :class:`clients.Client` (messages in, tensors through, messages out).

``app`` is the project's; :func:`client_app` builds the same for a user's app whose scenario lives elsewhere.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import Client

from .protocol import CAPACITY, CONFIG, ITERATION, METRICS, NODE_CAPACITY, NODE_PARTITION, PARTITION, PHASES, PROFILE, update_key
from .runtime import cached_task, choose_device
from .scenario import Scenario, scenario_from_run_config

ScenarioOf = Callable[[Context], Scenario]


def project_scenario(context: Context) -> Scenario:
    """The project's scenario: ``scenario`` of the run config, relative to the project (with overrides)."""
    return scenario_from_run_config(context.run_config)


def _announced_capacity(context: Context) -> float:
    """The node's own ``capacity`` (deployment ``--node-config``); 0 leaves it to the scenario's profile."""
    return float(context.node_config.get(NODE_CAPACITY, 0.0))


def _handle(phase: str, message: Message, context: Context, scenario_of: ScenarioOf) -> Message:
    """Run ``phase`` for the partition named in the message (in simulation one node serves several)."""
    scenario = scenario_of(context)
    config = message.content[CONFIG]
    client = Client(cached_task(scenario), scenario, int(config[PARTITION]), choose_device(scenario))
    arrays = {side: record.to_torch_state_dict() for side, record in message.content.array_records.items()}
    updates, metrics = client.run(phase, int(config[ITERATION]), arrays)
    metrics[CAPACITY] = _announced_capacity(context)
    content = RecordDict({update_key(side): ArrayRecord(u) for side, u in updates.items()})
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=message)


def _evaluate(message: Message, context: Context, scenario_of: ScenarioOf) -> Message:
    """Federated evaluation: the global model on the named partition's own held-out data."""
    scenario = scenario_of(context)
    config = message.content[CONFIG]
    client = Client(cached_task(scenario), scenario, int(config[PARTITION]), choose_device(scenario))
    arrays = {side: record.to_torch_state_dict() for side, record in message.content.array_records.items()}
    metrics = client.evaluate(arrays.get("x", {}), arrays.get("y", {}))
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


def client_app(scenario_of: ScenarioOf = project_scenario) -> ClientApp:
    """A ClientApp serving every phase, federated evaluation and the profile query of the scenario
    that ``scenario_of`` reads from a message's context (a user's app passes where its scenario lives)."""
    built = ClientApp()
    for phase in PHASES:
        _register(built, phase, scenario_of)
    built.evaluate()(lambda message, context: _evaluate(message, context, scenario_of))
    built.query(PROFILE)(profile)
    return built


def _register(built: ClientApp, phase: str, scenario_of: ScenarioOf) -> None:
    built.train(phase)(lambda message, context: _handle(phase, message, context, scenario_of))


def profile(message: Message, context: Context) -> Message:
    """Partition id and announced capacity (0 when the node leaves it to the scenario)."""
    reply = {PARTITION: int(context.node_config[NODE_PARTITION]), CAPACITY: _announced_capacity(context)}
    return Message(RecordDict({PROFILE: MetricRecord(reply)}), reply_to=message)


app = client_app()
