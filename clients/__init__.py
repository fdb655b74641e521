"""The client side of a phase on plain tensors, with fault injection; Flower-free."""

from .client import Client

__all__ = ["Client"]
