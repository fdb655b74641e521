"""Client classes: a client's two phases on plain arrays, with cost metrics."""

from .bilevel_client import BilevelClient

__all__ = ["BilevelClient"]
