"""What an algorithm is to the training loop: its phases per global iteration and each phase's client work.

A phase sends every sampled client its slices of some sides (x, y, and the algorithm's own
server variables), the client returns one reply per side the phase steps or assigns, and the
server applies ``side <- side - step * coverage-mean(update)`` for each stepped side and
``side <- coverage-mean(reply)`` for each assigned one (elements no client holds keep their
value), then the algorithm's :meth:`Algorithm.after_phase`. RABO has two phases (inner on y,
outer on x); single-level baselines have one that steps both sides, with updates
``(w_0 - w_T) / lr`` so that the server step with the same ``lr`` is the coverage-counted
average of the clients' models; FedNest has 2T + N + 2 or more (``algorithms/fednest.py``).

Decentralised methods (``algorithms/sldbo.py``) keep one copy of their variables per node in
``ServerState.nodes``: :meth:`Algorithm.arrays` sends each node its own copy (or nothing: a node
that skips this iteration), and a phase's ``gathers`` hands the replies, per node and unaveraged,
to :meth:`Algorithm.gather`, which mixes the node states with the gossip matrix.

Server variables beyond x and y (:class:`Side`) take the layout and the iteration's submodel of
the side they follow, so a y-shaped variable is sliced, checked and coverage-averaged exactly as
y is, under every mask policy.

State that a client keeps between phases and iterations (:class:`ClientState`: a warm start,
control variates, trackers) never travels: a phase reads it as ``ClientJob.state`` and returns
what to keep in ``LocalResult.state``. The engine keeps it per partition (the plain engine in its
process and in the checkpoint, Flower in the ClientApp's context), and the client hands a phase
only the state made on the submodel it is given now (see :class:`ClientState`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ClassVar, Mapping

import torch

from ..cost import CostMeter

if TYPE_CHECKING:
    from ..federation import ServerState
    from ..scenario import Scenario
    from ..tasks import BilevelTask

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Phase:
    """One message round of a global iteration."""

    name: str  # "<kind>" or "<kind>.<n>", unique within an iteration; the message type is train.<kind> (protocol)
    sends: tuple[str, ...]  # sides whose slices the client receives
    steps: Mapping[str, float]  # side -> server step size; the reply holds one update per side
    loss: str  # the client metric the phase's record averages ("": none)
    assigns: tuple[str, ...] = ()  # sides the server sets to the coverage-mean of the replies
    # sides whose replies go to Algorithm.gather per client, unaveraged; gather trains x and y with them, so
    # they count for the records' coverage (trained_x, C_x*) as a stepped side's replies do
    gathers: tuple[str, ...] = ()

    @property
    def replies(self) -> tuple[str, ...]:
        """The sides a reply holds: those stepped, then those assigned, then those gathered."""
        return (*self.steps, *self.assigns, *self.gathers)


@dataclass(frozen=True)
class Side:
    """A server variable beyond x and y: its layout and submodel are those of the side it ``follows``.

    A persistent side (SimFBO's v) starts at zero, lives across iterations and is checkpointed;
    a transient one (FedNest's q, p, v, h) is zero again at the start of every iteration.
    """

    name: str
    follows: str  # "x" or "y"
    persistent: bool = False


@dataclass
class ClientState:
    """What one partition's client keeps between phases and iterations: named tensors, and the
    submodel they were made on (``submodel``: the digest of the plan, :func:`~rabo_flwr.submodel.plan_key`).

    Tensors shaped like a slice only mean something on the submodel that sliced them, and the
    client only ever sees its slices, never the plan's indices (Flower's ClientApp keeps the
    state on the edge). So a phase reads the state only while the client's submodel is the one
    it was made on; on another submodel the phase starts without it, and the first state it
    keeps there replaces the old. Clients not sampled keep theirs; a client keeps what a
    completed phase returned even when the server then rejected or missed its reply (its
    ClientApp kept it too); a phase that raised keeps nothing.
    """

    submodel: str = ""
    tensors: Tensors = field(default_factory=dict)

    def readable(self, submodel: str) -> Tensors:
        """The tensors a phase on ``submodel`` may read: all of them on their own submodel, else none."""
        return self.tensors if submodel == self.submodel else {}

    def keep(self, submodel: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Keep ``tensors`` (replacing those of the same names) made on ``submodel``."""
        if tensors:
            self.tensors = {**self.readable(submodel), **{k: v.detach().cpu() for k, v in tensors.items()}}
            self.submodel = submodel


@dataclass
class ClientJob:
    """Everything one client's phase works with (its slices, data source, meter)."""

    task: "BilevelTask"
    scenario: "Scenario"
    partition: int
    iteration: int
    device: torch.device
    x: Tensors
    y: Tensors
    meter: CostMeter
    thresholds: Tensors = field(default_factory=dict)  # per tensor, the mask's threshold (FIARSE's), if sent
    sides: dict[str, Tensors] = field(default_factory=dict)  # the algorithm's own server variables sent (Side)
    state: Tensors = field(default_factory=dict)  # what this client kept on this submodel (ClientState)

    @property
    def local_steps(self) -> int:
        """This client's local steps: ``clients.local_steps`` (per partition) if given, else ``algorithm.inner_steps``."""
        return self.scenario.local_steps(self.partition)


@dataclass
class LocalResult:
    updates: dict[str, Tensors]  # side -> update slices
    metrics: dict[str, float] = field(default_factory=dict)
    state: Tensors = field(default_factory=dict)  # what the client keeps for its next phases (ClientState.keep)


class Algorithm:
    """Interface of an algorithm; instances are stateless and shared (``ALGORITHMS``)."""

    name: ClassVar[str]
    default_mask: ClassVar[str] = "importance"
    default_estimator: ClassVar[str] = ""  # "" for algorithms without a hypergradient
    full_model: ClassVar[bool] = False  # every client trains the whole model (capacity 1)
    episodic: ClassVar[bool] = False  # trains on few-shot episodes (needs the few-shot task)
    decentralised: ClassVar[bool] = False  # per-node states mixed by a gossip matrix (every node every iteration)
    # runs on segment submodels (algorithm.submodel: segment): every phase sends x and y, and the client work reads
    # the task only through client_batch, lower_loss, upper_loss and lower_objective, which tasks.segment restricts
    segments: ClassVar[bool] = False

    def phases(self, scenario: "Scenario") -> list[Phase]:
        raise NotImplementedError

    def client_state_key(self, scenario: "Scenario") -> str:
        """The scenario key that makes this algorithm's clients keep state between iterations (ClientState),
        "" when they keep none: Flower's simulation then needs one SuperNode per partition (PhaseStrategy)."""
        return ""

    def sides(self, scenario: "Scenario") -> tuple[Side, ...]:
        """Server variables beyond x and y that the phases send, step or assign."""
        return ()

    def after_phase(self, phase: Phase, state: "ServerState", scenario: "Scenario") -> None:
        """Server work after a phase's aggregation (FedNest: accumulate the Neumann sum). Default: none."""

    def arrays(self, phase: Phase, state: "ServerState", scenario: "Scenario", partition: int,
               iteration: int) -> dict[str, Tensors] | None:
        """What ``partition`` is sent in ``phase``, or None to leave it out of the phase. Default: its
        slices of the global sides the phase sends."""
        return state.slices(partition, phase.sends)

    def gather(self, phase: Phase, state: "ServerState", scenario: "Scenario",
               replies: Mapping[int, Mapping[str, Tensors]]) -> dict:
        """Server work on the accepted replies of a phase with ``gathers`` (partition -> side -> tensors);
        returns entries for the phase's record. Only decentralised methods have such phases."""
        raise NotImplementedError(f"{self.name} gathers no replies")

    def run(self, phase: str, job: ClientJob) -> LocalResult:
        raise NotImplementedError


def leaves(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Detached copies that require grad: the client's working parameters."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in tensors.items()}


def loss_and_grads(meter: CostMeter, unit: str, loss_fn: Callable[[], torch.Tensor],
                   params: list[torch.Tensor], signature) -> tuple[float, list[torch.Tensor]]:
    """One metered forward and backward: the loss value and its gradients (zeros where unused)."""
    def work():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return meter.unit(unit, signature, work)


def sgd_step(params: list[torch.Tensor], grads: list[torch.Tensor], lr: float) -> None:
    with torch.no_grad():
        for p, g in zip(params, grads):
            p.sub_(lr * g)


def scaled_change(start: Mapping[str, torch.Tensor], end: Mapping[str, torch.Tensor], lr: float) -> Tensors:
    """``(start - end) / lr``: the update whose server step with ``lr`` reproduces the local descent."""
    return {k: (start[k].detach() - end[k].detach()) / lr for k in start}

