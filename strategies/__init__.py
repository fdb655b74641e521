"""Flower strategies (thin adapters over rabo_flwr's Flower-free core)."""

from .rabo import RaboStrategy

__all__ = ["RaboStrategy"]
