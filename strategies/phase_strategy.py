"""The Flower side of the training loop: a ``flwr.serverapp.strategy.Strategy`` whose server round is one phase.

Everything else (sampling, plans, reply checks, coverage-counted aggregation, evaluation,
checkpoints, records) is :class:`rabo_flwr.loop.TrainingLoop`'s, shared with the plain engine:
:meth:`PhaseStrategy.start` runs that loop with this strategy as its engine, and each phase the
loop hands over becomes one server round, ``configure_train`` -> ``Grid.send_and_receive`` ->
``aggregate_train``, as in Flower's own ``Strategy.start``.

Nodes and partitions. Every node answers a profile query (``query.profile``) with its
``partition-id`` and the capacity it announces. In a deployment each node serves exactly its
own partition, with the capacity it announced, and the run waits (``run.node_wait_timeout``)
for ``clients.min_available`` of them. In simulation (``virtual_clients``) Flower starts as many
SuperNodes as the federation asks for (2 unless ``num-supernodes`` says otherwise), and a round's
i-th message goes to the node with the i-th ``partition-id`` (mod the number of nodes): the
partition travels in the message, so any number of SuperNodes runs any number of clients, and a
round's messages are spread evenly over the nodes (Flower's simulation hands each node one
message per 0.1 s tick).

Messages travel through :mod:`rabo_flwr.arrays` (tensors to ``ArrayRecord`` and back) and
:func:`rabo_flwr.exchange.send_and_receive` (replies polled every few milliseconds instead of
Flower's fixed 0.1 s or 3 s).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.superlink.grid import InMemoryGrid

from rabo_flwr.algorithms import ALGORITHMS, Phase
from rabo_flwr.arrays import from_record, to_record
from rabo_flwr.exchange import send_and_receive
from rabo_flwr.federation import SIDES, Tensors
from rabo_flwr.loop import Outcome, PhaseRound, TrainingLoop, mean_client_metrics
from rabo_flwr.protocol import (CAPACITY, CONFIG, ITERATION, METRICS, PARTITION, PHASE, PROFILE, PROFILE_QUERY,
                                SUBMODEL, UPDATE, phase_kind, train_message)
from rabo_flwr.runtime import cached_task, choose_device
from rabo_flwr.scenario import Scenario
from rabo_flwr.tasks import BilevelTask


@dataclass
class NodeProfile:
    """What the server knows of a node: its data partition and the capacity it announced (None: none)."""

    partition: int
    announced_capacity: float | None


def global_arrays(x: Tensors, y: Tensors) -> ArrayRecord:
    """x and y in one ArrayRecord, by name: ``"x.<tensor name>"`` and ``"y.<tensor name>"``."""
    return to_record({f"{side}.{name}": t for side, tensors in zip(SIDES, (x, y)) for name, t in tensors.items()})


def sides_of(arrays: ArrayRecord) -> tuple[Tensors, Tensors]:
    """The inverse of :func:`global_arrays`: (x, y) as name -> tensor dicts."""
    sides: dict[str, Tensors] = {side: {} for side in SIDES}
    for key, tensor in from_record(arrays).items():
        side, _, name = key.partition(".")
        if side not in sides or not name:
            raise ValueError(f"array {key!r} is not named 'x.<name>' or 'y.<name>'")
        sides[side][name] = tensor
    return sides["x"], sides["y"]


def metric_record(record: dict) -> MetricRecord:
    """A loop record's numbers (and lists of numbers) as a MetricRecord; texts and per-client lists stay behind."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    return MetricRecord({k: v for k, v in record.items() if number(v) or (
        isinstance(v, list) and v and (all(isinstance(e, float) for e in v) or all(type(e) is int for e in v)))})


class PhaseStrategy(Strategy):
    """Coverage-counted federated bilevel optimization on submodels, one phase per server round.

    The base of :class:`strategies.Rabo` and :class:`strategies.SinglePhase`, which differ only in
    the algorithms (``algorithm.name``) they accept. The scenario configures the run; the
    ClientApps read the same scenario, so both sides agree on the algorithm and the task.

    Parameters
    ----------
    scenario : Scenario
        The run's scenario (``rabo_flwr.scenario.load_scenario`` or ``scenario_from_run_config``):
        task, model, clients and their capacities, algorithm, run settings.
    task : BilevelTask, optional
        The bilevel task; built from ``scenario.task.name`` when omitted (a built-in task or a
        ``"package.module:ClassName"`` of your own).
    virtual_clients : bool, optional
        True: any node serves any partition (Flower's simulation, ``clients.num`` partitions over
        however many SuperNodes); False: each node serves the partition it announces (a
        deployment). Default: True exactly when ``start`` is given Flower's simulation grid.
    device : torch.device, optional
        Where the server evaluates; default: ``run.device`` of the scenario.
    """

    algorithms: ClassVar[tuple[str, ...]] = ()  # the algorithm.name values a family runs
    # what a client keeps between iterations lives in its ClientApp's context (rabo_flwr/client_app.py), not here:
    # a run resumed from the server's checkpoint starts the clients' states cold (README: resuming)
    client_states: ClassVar[None] = None

    def __init__(self, scenario: Scenario, task: BilevelTask | None = None, *, virtual_clients: bool | None = None,
                 device: torch.device | None = None) -> None:
        if not self.algorithms:
            raise TypeError("PhaseStrategy is the base of the family strategies: use Rabo or SinglePhase")
        if scenario.algorithm.name not in self.algorithms:
            raise ValueError(f"{type(self).__name__} runs algorithm.name in {', '.join(self.algorithms)}; "
                             f"the scenario's is {scenario.algorithm.name!r}")
        self.scenario = scenario
        self.task = task
        self.virtual_clients = virtual_clients
        self.device = device
        self.phases = ALGORITHMS[scenario.algorithm.name].phases(scenario)
        clients = scenario.clients
        self.clients = clients.num
        self.min_available = clients.min_available or clients.num
        self.node_wait_timeout = scenario.run.node_wait_timeout
        self.phase_timeout = scenario.run.phase_timeout
        self.profiles: dict[int, NodeProfile] = {}
        self.grid: Grid | None = None
        self._loop: TrainingLoop | None = None
        self._round: PhaseRound | None = None
        self._sent: dict[int, Message] = {}
        self._arrays = ArrayRecord()
        self._train_config = ConfigRecord()
        self._evaluate_config = ConfigRecord()

    @property
    def rounds_per_iteration(self) -> int:
        """Server rounds in one global iteration: the algorithm's phases (RABO: inner and outer)."""
        return len(self.phases)

    def initial_arrays(self) -> ArrayRecord:
        """The task's seeded initial x and y (``scenario.seed``), as :meth:`start` takes them."""
        return global_arrays(*self._task().init_tensors(self.scenario.seed))

    def summary(self) -> None:
        """Log summary configuration of the strategy."""
        s = self.scenario
        algorithm = s.algorithm
        log(INFO, "\t├──> Algorithm: %s (estimator %s, masks x=%s y=%s), phases per iteration: %s", algorithm.name,
            algorithm.resolved_estimator or "none", algorithm.mask("x"), algorithm.mask("y"),
            ", ".join(p.name for p in self.phases))
        log(INFO, "\t├──> Steps: alpha (x) %g, beta (y) %g, inner steps %d", algorithm.alpha, algorithm.beta,
            algorithm.inner_steps)
        log(INFO, "\t└──> Clients: %d (fraction %.2f, capacities %s), task %s", s.clients.num, s.clients.fraction,
            s.clients.capacities, s.task.name)

    def _task(self) -> BilevelTask:
        if self.task is None:
            self.task = cached_task(self.scenario)
        return self.task

    # ------------------------------------------------------------------ the run

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float | None = None,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Run ``num_rounds`` phases (``num_rounds / rounds_per_iteration`` global iterations) of the training loop.

        Parameters
        ----------
        grid : Grid
            The Grid to the nodes running the ClientApp.
        initial_arrays : ArrayRecord
            Initial x and y by name (``"x.<name>"``, ``"y.<name>"``), e.g. :meth:`initial_arrays`.
        num_rounds : int (default: 3)
            Server rounds, one per phase; a multiple of :attr:`rounds_per_iteration`.
        timeout : float, optional
            Seconds a phase waits for replies; default: the scenario's ``run.phase_timeout``.
        train_config : ConfigRecord, optional
            Extra entries for every training message's config (the loop's own entries win).
        evaluate_config : ConfigRecord, optional
            Extra entries for every federated evaluation message's config.
        evaluate_fn : Callable[[int, ArrayRecord], Optional[MetricRecord]], optional
            More server-side metrics, called with the server round and the global arrays at each of the
            run's evaluations (``run.eval_every``), beside the task's own evaluation.

        Returns
        -------
        Result
            The final x and y (``arrays``), each phase's aggregated record (``train_metrics_clientapp``),
            the server-side validation evaluations (``evaluate_metrics_serverapp``; the last round's
            also holds the test metrics of the model kept, and ``kept_iteration``) and, with
            ``run.federated_eval``, the clients' (``evaluate_metrics_clientapp``), indexed by server round.
        """
        per_iteration = self.rounds_per_iteration
        if num_rounds <= 0 or num_rounds % per_iteration:
            raise ValueError(f"num_rounds must be a positive multiple of {per_iteration} (phases per iteration of "
                             f"{self.scenario.algorithm.name}), got {num_rounds}")
        s = self.scenario
        run = dataclasses.replace(s.run, phase_timeout=timeout) if timeout is not None else s.run
        scenario = dataclasses.replace(s, run=run, algorithm=dataclasses.replace(s.algorithm,
                                                                                 iterations=num_rounds // per_iteration))
        self.phase_timeout = scenario.run.phase_timeout
        self.grid = grid
        if self.virtual_clients is None:
            self.virtual_clients = isinstance(grid, InMemoryGrid)  # Flower's simulation engine
        self._train_config = train_config or ConfigRecord()
        self._evaluate_config = evaluate_config or ConfigRecord()
        log(INFO, "Starting %s strategy: %d rounds (%d iterations of %s)", type(self).__name__, num_rounds,
            num_rounds // per_iteration, ", ".join(p.name for p in self.phases))
        self.summary()

        def server_metrics(iteration: int, x: Tensors, y: Tensors) -> dict | None:
            metrics = evaluate_fn(iteration * per_iteration, global_arrays(x, y))
            return dict(metrics) if metrics is not None else None

        started = time.time()
        self._arrays = initial_arrays
        self._loop = TrainingLoop(scenario, self._task(), self, self.device or choose_device(scenario), FLOWER_LOGGER,
                                  evaluate_fn=server_metrics if evaluate_fn else None)
        outcome = self._loop.run(initial=sides_of(initial_arrays))
        result = self._result(outcome.records, global_arrays(outcome.state.x, outcome.state.y))
        log(INFO, "Strategy execution finished in %.2fs: %d training rounds, %d server-side and %d federated "
            "evaluations recorded in the Result", time.time() - started, len(result.train_metrics_clientapp),
            len(result.evaluate_metrics_serverapp), len(result.evaluate_metrics_clientapp))
        return result

    def _result(self, records: list[dict], arrays: ArrayRecord) -> Result:
        """The loop's records as Flower's Result, by server round (an evaluation after iteration q: round q * phases)."""
        result = Result(arrays=arrays)
        index = {p.name: i for i, p in enumerate(self.phases)}
        per_iteration = self.rounds_per_iteration
        for r in records:
            if r["phase"] in index:
                result.train_metrics_clientapp[(r["iteration"] - 1) * per_iteration + index[r["phase"]] + 1] = metric_record(r)
            elif r["phase"] == "eval":
                server_round = r["iteration"] * per_iteration
                clients = {k.removeprefix("client_"): v for k, v in r.items() if k.startswith("client_")}
                result.evaluate_metrics_serverapp[server_round] = metric_record(
                    {k: v for k, v in r.items() if not k.startswith("client_")})
                if clients:
                    result.evaluate_metrics_clientapp[server_round] = metric_record(clients)
        for r in records:
            if r["phase"] == "test":  # read once, on the model kept: with the last round's evaluation
                last = max(result.evaluate_metrics_serverapp)
                test = {k: v for k, v in r.items() if k.startswith("test_") or k == self._task().test_metric}
                result.evaluate_metrics_serverapp[last] = metric_record(
                    dict(result.evaluate_metrics_serverapp[last]) | test | {"kept_iteration": r["iteration"]})
        return result

    # ------------------------------------------------------------------ the loop's engine: phases

    def run_phase(self, phase_round: PhaseRound) -> None:
        """One server round: this phase's messages out, the replies aggregated by the loop."""
        self._round = phase_round
        messages = self.configure_train(phase_round.number, self._arrays, self._train_config, self.grid)
        replies = send_and_receive(self.grid, messages, timeout=self.phase_timeout)
        self.aggregate_train(phase_round.number, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """One message per client of the current phase, carrying only that client's slices.

        Parameters
        ----------
        server_round : int
            The current round: the phase the training loop is in.
        arrays : ArrayRecord
            The current global x and y; each client is sent its submodel's slices of them, by side
            (records ``"x"`` and/or ``"y"``, as the phase sends).
        config : ConfigRecord
            Extra config entries for every message (beside ``iteration``, ``partition``, ``capacity``, ``submodel``).
        grid : Grid
            The Grid the messages go through.

        Returns
        -------
        Iterable[Message]
            Messages of type ``train.<kind>`` (``train.inner``, ``train.outer``, ``train.local``, FedNest's
            ``train.ihgp``, ...; :data:`rabo_flwr.protocol.PHASES`); a phase named ``<kind>.<n>`` has its
            name in the config under ``phase``. The records hold the slices of every side the phase sends
            (x, y and the algorithm's own server variables, e.g. FedNest's ``p``).
        """
        phase_round = self._current(server_round)
        sent: dict[int, Message] = {}
        for index, a in enumerate(phase_round.assignments):
            content = RecordDict({side: to_record(slices) for side, slices in a.arrays.items()})
            name = phase_round.phase.name
            content[CONFIG] = ConfigRecord({**dict(config), ITERATION: phase_round.iteration, PARTITION: a.partition,
                                            CAPACITY: a.capacity, SUBMODEL: a.submodel,
                                            **({PHASE: name} if name != phase_kind(name) else {})})
            sent[a.partition] = Message(content, dst_node_id=self.node_of(a.partition, index),
                                        message_type=train_message(phase_round.phase.name),
                                        group_id=str(phase_round.iteration))
        self._sent = sent
        return list(sent.values())

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check the replies and take the phase's coverage-counted steps (in the training loop).

        Parameters
        ----------
        server_round : int
            The current round: the phase the training loop is in.
        replies : Iterable[Message]
            Replies to this round's messages: ``update.<side>`` ArrayRecords and a ``metrics`` MetricRecord.
            Error replies, missing ones and malformed, non-finite or divergent updates are counted, not aggregated.

        Returns
        -------
        tuple[ArrayRecord, MetricRecord]
            The new global x and y by name, and the phase's record (loss, coverage ``C_x*``/``C_y*``,
            clients sent/aggregated/failed/rejected, FLOPs, bytes).
        """
        phase_round = self._current(server_round)
        partition_of = {m.metadata.message_id: p for p, m in self._sent.items()}
        outcomes = [self._outcome(partition_of[r.metadata.reply_to_message_id], r, phase_round.phase)
                    for r in replies if r.metadata.reply_to_message_id in partition_of]
        record = phase_round.finish(outcomes)
        self._arrays = global_arrays(self._loop.state.x, self._loop.state.y)
        return self._arrays, metric_record(record)

    def _current(self, server_round: int) -> PhaseRound:
        if self._round is None or self._round.number != server_round:
            raise RuntimeError(f"server round {server_round} is not the phase the training loop is in; "
                               f"rounds are driven by {type(self).__name__}.start")
        return self._round

    def _outcome(self, partition: int, reply: Message, phase: Phase) -> Outcome:
        if reply.has_error():
            return Outcome(partition, error=reply.error.reason)
        content = reply.content
        try:
            updates = {key.removeprefix(UPDATE): from_record(content[key])
                       for key in content.array_records if key.startswith(UPDATE)}
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

    # ------------------------------------------------------------------ the loop's engine: federated evaluation

    def evaluate_clients(self, iteration: int, x: Tensors, y: Tensors) -> dict[str, float]:
        """One evaluation round (``run.federated_eval``): every available partition evaluates the global model."""
        server_round = iteration * self.rounds_per_iteration
        messages = self.configure_evaluate(server_round, global_arrays(x, y), self._evaluate_config, self.grid)
        replies = send_and_receive(self.grid, messages, timeout=self.phase_timeout)
        metrics = self.aggregate_evaluate(server_round, replies)
        return dict(metrics) if metrics is not None else mean_client_metrics([])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """One ``evaluate`` message per available partition, with the whole global x and y.

        Parameters
        ----------
        server_round : int
            The round after which the model is evaluated.
        arrays : ArrayRecord
            The global x and y by name; sent as records ``"x"`` and ``"y"``.
        config : ConfigRecord
            Extra config entries for every message (beside ``iteration`` and ``partition``).
        grid : Grid
            The Grid the messages go through.

        Returns
        -------
        Iterable[Message]
            Messages of type ``evaluate``; each client answers with its task's ``evaluate_client`` metrics.
        """
        iteration = server_round // self.rounds_per_iteration
        x, y = sides_of(arrays)
        content = {"x": to_record(x), "y": to_record(y)}
        return [Message(RecordDict({**content, CONFIG: ConfigRecord({**dict(config), ITERATION: iteration,
                                                                     PARTITION: p})}),
                        dst_node_id=self.node_of(p, index), message_type=MessageType.EVALUATE,
                        group_id=f"eval.{iteration}")
                for index, p in enumerate(sorted(self.partitions(iteration)))]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The clients' metrics, weighted by their ``examples``; error replies are logged and left out.

        Parameters
        ----------
        server_round : int
            The round after which the model was evaluated.
        replies : Iterable[Message]
            Replies holding a ``metrics`` MetricRecord with an ``examples`` entry.

        Returns
        -------
        Optional[MetricRecord]
            Example-weighted means, ``examples`` (their total) and ``clients`` (how many replied); None if none did.
        """
        metrics = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "round %d evaluation: node %s failed: %s", server_round, reply.metadata.src_node_id,
                    reply.error.reason)
            else:
                metrics.append(dict(reply.content[METRICS]))
        return MetricRecord(mean_client_metrics(metrics)) if metrics else None

    # ------------------------------------------------------------------ nodes

    def partitions(self, iteration: int) -> dict[int, float | None]:
        """Partitions some node serves, with the capacity that node announced."""
        self._discover()
        if self.virtual_clients:
            self._check_stateful_simulation()
            return {p: None for p in range(self.clients)}
        return {profile.partition: profile.announced_capacity for profile in self.profiles.values()}

    def _stateful(self) -> str:
        """The scenario key that makes clients keep state between iterations ("" if none does)."""
        return ALGORITHMS[self.scenario.algorithm.name].client_state_key(self.scenario)

    def _check_stateful_simulation(self) -> None:
        """Clients that keep state need one SuperNode per partition in simulation: Flower's engine hands a
        node's messages to parallel workers, each with a copy of the node's context, and writes back whichever
        finishes last, so of two partitions a node serves in one round one would lose what it kept."""
        key = self._stateful()
        if key and len(self.profiles) < self.clients:
            raise ValueError(f"{key}: clients keep state between iterations, which Flower's simulation holds per "
                             f"SuperNode; run one SuperNode per partition (--federation-config "
                             f"\"num-supernodes={self.clients}\"), not {len(self.profiles)}")

    def node_of(self, partition: int, index: int) -> int:
        """The node serving ``partition``, the ``index``-th message of a round.

        In simulation, clients that keep state go to the (partition mod nodes)-th node, always the same one,
        so that what a virtual client keeps in its node's context (its ClientState) is there at its next
        phase; stateless clients go to the (index mod nodes)-th, spreading a round's messages over the nodes
        (Flower's simulation takes one message per node per tick, so messages piled on one node wait)."""
        if self.virtual_clients:
            nodes = sorted(self.profiles, key=lambda n: self.profiles[n].partition)
            return nodes[(partition if self._stateful() else index) % len(nodes)]
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
