"""Flower strategies for the training loop (thin adapters over rabo_flwr's Flower-free core).

``Rabo`` (RABO, RAFBO, FedMBO, FedAvg of the lower level), ``BilevelFamily`` (FedNest, LFedNest,
SimFBO, ShroFBO), ``Decentralised`` (SLDBO, S3LDBO on the gossip engine) and ``SinglePhase`` (the
single-level and few-shot baselines) are ``flwr.serverapp.strategy.Strategy`` subclasses: use them
in your own ServerApp with ``strategy.start(grid, strategy.initial_arrays(), num_rounds)``.
"""

from .families import BilevelFamily, Decentralised, Rabo, SinglePhase, strategy_for
from .phase_strategy import PhaseStrategy, global_arrays, sides_of

__all__ = ["BilevelFamily", "Decentralised", "PhaseStrategy", "Rabo", "SinglePhase", "global_arrays", "sides_of",
           "strategy_for"]
