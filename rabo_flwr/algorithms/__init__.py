"""Every algorithm the scenario's ``algorithm.name`` can select, in one registry.

Bilevel (two phases): ``rabo`` (exact hypergradient), ``rafbo`` (Algorithm 2's finite
differences), ``fedmbo`` (full model, Neumann series). The federated bilevel family on the same
loop: ``fednest`` (FedSVRG inner rounds, global Neumann rounds, 2T + N + 2 rounds) and its local
variant ``lfednest`` (T + 1 rounds); ``simfbo`` and ``shrofbo`` (one round, x, y and v together;
reconstructed); ``memfbo`` (SimFBO's round with first-order products only; reconstructed); ``aggitd``
(FedAvg rounds on y with the ITD hypergradient aggregated alongside: N rounds; reconstructed).
Lower level only: ``fedavg`` (x fixed). Decentralised, on the gossip engine:
``sldbo`` and its snapshot variant ``s3ldbo`` (per-node states mixed by W; reconstructed).
Single-level submodel training (one phase), by extraction rule: ``static`` (HeteroFL),
``oap``, ``fedrolex`` (rolling window), ``fiarse``. Full-model few-shot baselines:
``dist-protonet``, ``dist-maml``.
"""

from .aggitd import AggITD
from .base import Algorithm, ClientJob, ClientState, LocalResult, Phase, Side
from .bilevel import Bilevel, LowerOnly
from .episodic import Maml, ProtoNet, SingleLevel
from .fednest import FedNest
from .simfbo import SimFBO
from .sldbo import Gossip

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (
    Bilevel("rabo", estimator="exact", mask="importance"),
    Bilevel("rafbo", estimator="fd-coordinate", mask="importance"),
    Bilevel("fedmbo", estimator="neumann", mask="off", full_model=True),
    FedNest("fednest", local=False, optimizer="svrg"),
    FedNest("lfednest", local=True, optimizer="sgd"),
    SimFBO("simfbo", normalised=False),
    SimFBO("shrofbo", normalised=True),
    SimFBO("memfbo", normalised=False, first_order=True),
    AggITD(),
    Gossip("sldbo", snapshot=False),
    Gossip("s3ldbo", snapshot=True),
    LowerOnly(),
    SingleLevel("static", mask="static"),
    SingleLevel("oap", mask="oap"),
    SingleLevel("fedrolex", mask="rolling"),
    SingleLevel("fiarse", mask="fiarse"),
    ProtoNet(),
    Maml(),
)}

__all__ = ["ALGORITHMS", "Algorithm", "ClientJob", "ClientState", "LocalResult", "Phase", "Side"]
