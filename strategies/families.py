"""The strategies a ServerApp uses, one per family of algorithms (they differ only in what they accept)."""

from __future__ import annotations

from rabo_flwr.algorithms import ALGORITHMS
from rabo_flwr.algorithms.aggitd import AggITD
from rabo_flwr.algorithms.bilevel import Bilevel, LowerOnly
from rabo_flwr.algorithms.fednest import FedNest
from rabo_flwr.algorithms.simfbo import SimFBO
from rabo_flwr.algorithms.sldbo import Gossip
from rabo_flwr.scenario import Scenario

from .phase_strategy import PhaseStrategy


class Rabo(PhaseStrategy):
    """Resource-adaptive federated bilevel optimization: RABO, RAFBO, FedMBO, and FedAvg of the lower level.

    Each global iteration has two server rounds (phases). Inner: every sampled client takes
    ``algorithm.inner_steps`` SGD steps on the lower-level loss g over its submodel of y and
    replies ``(y_0 - y_T) / beta``; the server steps y by ``beta`` times the coverage-counted mean
    (each element averaged over the clients that hold it). Outer: every client replies its
    hypergradient of the upper-level loss f on its submodel of x; the server steps x by ``alpha``
    likewise. The scenario's ``algorithm.name`` picks the member: ``rabo`` (exact hypergradient,
    importance masks), ``rafbo`` (finite-difference hypergradient, Algorithm 2 of the paper),
    ``fedmbo`` (Neumann series, full model), ``fedavg`` (the inner phase alone, x fixed); its
    ``estimator``, ``mask_x`` and ``mask_y`` override the member's own.

    Implementation based on arXiv:2512.24667. Parameters: see :class:`PhaseStrategy`.
    """

    algorithms = tuple(name for name, a in ALGORITHMS.items() if isinstance(a, (Bilevel, LowerOnly)))


class BilevelFamily(PhaseStrategy):
    """The federated bilevel literature on the same loop, each method with its own rounds per iteration, on submodels.

    ``algorithm.name``: ``fednest`` (FedSVRG rounds on y, N rounds of global Hessian-vector products
    for the Neumann series, a hypergradient round: 2T + N + 2 server rounds per iteration) and its
    local variant ``lfednest`` (T + 1), ``simfbo``, ``shrofbo`` and ``memfbo`` (one round with x, y
    and v; reconstructed), ``aggitd`` (N rounds of FedAvg on y carrying the ITD products; reconstructed).
    The algorithms' own server variables (FedNest's q, p, v, h; SimFBO's v; AggITD's u) travel in the
    messages beside x and y, sliced to each client's submodel (``rabo_flwr/algorithms/``
    ``fednest.py``, ``simfbo.py`` and ``aggitd.py`` give each method's equations, rounds and state).

    Parameters: see :class:`PhaseStrategy`.
    """

    algorithms = tuple(name for name, a in ALGORITHMS.items() if isinstance(a, (FedNest, SimFBO, AggITD)))


class Decentralised(PhaseStrategy):
    """Decentralised bilevel methods on the gossip engine: SLDBO and S3LDBO, one server round per iteration.

    The nodes are the partitions, and the server holds every node's x, y, v and trackers: each round
    it sends node i its own (x_i, y_i, v_i), receives its local directions, and mixes the node states
    with the scenario's mixing matrix (``algorithm.topology``), so the SuperLink relays what a
    peer-to-peer network would exchange (``bytes_p2p`` in the records counts it per edge). S3LDBO
    sends nothing to a node that keeps its snapshot. ``rabo_flwr/algorithms/sldbo.py`` gives the
    equations (reconstructed), ``rabo_flwr/gossip.py`` the topologies.

    Parameters: see :class:`PhaseStrategy`.
    """

    algorithms = tuple(name for name, a in ALGORITHMS.items() if isinstance(a, Gossip))


class SinglePhase(PhaseStrategy):
    """Single-level submodel training and full-model few-shot baselines: one server round per iteration.

    Every sampled client trains its submodel (x and, where the algorithm has one, y) for
    ``algorithm.inner_steps`` local steps and replies ``(w_0 - w_T) / lr``; the server's step with
    the same ``lr`` is the coverage-counted average of the clients' models. ``algorithm.name``:
    ``static`` (HeteroFL), ``oap``, ``fedrolex``, ``fiarse``, ``dist-protonet``, ``dist-maml``.

    Parameters: see :class:`PhaseStrategy`.
    """

    algorithms = tuple(name for name in ALGORITHMS
                       if name not in Rabo.algorithms + BilevelFamily.algorithms + Decentralised.algorithms)


def strategy_for(scenario: Scenario, **kwargs) -> PhaseStrategy:
    """The family's strategy for the scenario's algorithm (``kwargs``: :class:`PhaseStrategy`'s)."""
    name = scenario.algorithm.name
    cls = next(c for c in (Rabo, BilevelFamily, Decentralised, SinglePhase) if name in c.algorithms)
    return cls(scenario, **kwargs)
