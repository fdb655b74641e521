"""The Flower side of the training loop (a thin adapter over rabo_flwr's Flower-free core)."""

from .phase_strategy import PhaseStrategy

__all__ = ["PhaseStrategy"]
