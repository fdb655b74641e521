"""ClientApp: message handlers around :class:`clients.Client` (messages in, tensors through, messages out).

``app`` is the project's; :func:`client_app` builds the same for a user's app whose scenario lives elsewhere.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients import Client

from .algorithms import ClientState
from .protocol import (CAPACITY, CLIENT_STATE, CONFIG, ITERATION, METRICS, NODE_CAPACITY, NODE_PARTITION, PARTITION,
                       PHASE, PHASES, PROFILE, SUBMODEL, update_key)
from .arrays import from_record, to_record
from .runtime import project_scenario, run_setup
from .scenario import Scenario

ScenarioOf = Callable[[Context], Scenario]


def _announced_capacity(context: Context) -> float:
    """The node's own ``capacity`` (deployment ``--node-config``); 0 leaves it to the scenario's profile."""
    return float(context.node_config.get(NODE_CAPACITY, 0.0))


def _client_and_arrays(message: Message, context: Context, scenario_of: ScenarioOf) -> tuple[Client, dict]:
    """The client of the partition named in the message, and the message's arrays by side."""
    setup = run_setup(context, scenario_of)
    client = Client(setup.task, setup.scenario, int(message.content[CONFIG][PARTITION]), setup.device)
    return client, {side: from_record(record) for side, record in message.content.array_records.items()}


def _kept_state(context: Context, partition: int) -> ClientState:
    """What the client of ``partition`` kept in this node's context (nothing before its first phase here)."""
    key = f"{CLIENT_STATE}.{partition}"
    if key not in context.state:
        return ClientState()
    return ClientState(str(context.state[f"{key}.submodel"]["submodel"]), from_record(context.state[key]))


def _keep_state(context: Context, partition: int, state: ClientState) -> None:
    if state.tensors:
        key = f"{CLIENT_STATE}.{partition}"
        context.state[key] = to_record(state.tensors)
        context.state[f"{key}.submodel"] = ConfigRecord({"submodel": state.submodel})


def _handle(kind: str, message: Message, context: Context, scenario_of: ScenarioOf) -> Message:
    """Run the phase named in the message (of this handler's ``kind``) for the partition named in it
    (in simulation one node serves several), with what that partition's client kept in the node's
    context from its last phase (keyed by partition, so virtual clients sharing a node keep theirs apart)."""
    client, arrays = _client_and_arrays(message, context, scenario_of)
    config = message.content[CONFIG]
    phase = str(config[PHASE]) if PHASE in config else kind
    state = _kept_state(context, client.partition)
    updates, metrics = client.run(phase, int(config[ITERATION]), arrays, state, str(config.get(SUBMODEL, "")))
    _keep_state(context, client.partition, state)
    metrics[CAPACITY] = _announced_capacity(context)
    content = RecordDict({update_key(side): to_record(u) for side, u in updates.items()})
    content[METRICS] = MetricRecord(metrics)
    return Message(content, reply_to=message)


def _evaluate(message: Message, context: Context, scenario_of: ScenarioOf) -> Message:
    """Federated evaluation: the global model on the named partition's own held-out data."""
    client, arrays = _client_and_arrays(message, context, scenario_of)
    metrics = client.evaluate(arrays.get("x", {}), arrays.get("y", {}))
    return Message(RecordDict({METRICS: MetricRecord(metrics)}), reply_to=message)


def client_app(scenario_of: ScenarioOf = project_scenario) -> ClientApp:
    """A ClientApp serving every phase, federated evaluation and the profile query of the scenario
    that ``scenario_of`` reads from a message's context (a user's app passes where its scenario lives)."""
    built = ClientApp()
    for kind in PHASES:
        _register(built, kind, scenario_of)
    built.evaluate()(lambda message, context: _evaluate(message, context, scenario_of))
    built.query(PROFILE)(profile)
    return built


def _register(built: ClientApp, kind: str, scenario_of: ScenarioOf) -> None:
    built.train(kind)(lambda message, context: _handle(kind, message, context, scenario_of))


def profile(message: Message, context: Context) -> Message:
    """Partition id and announced capacity (0 when the node leaves it to the scenario)."""
    reply = {PARTITION: int(context.node_config[NODE_PARTITION]), CAPACITY: _announced_capacity(context)}
    return Message(RecordDict({PROFILE: MetricRecord(reply)}), reply_to=message)


app = client_app()
