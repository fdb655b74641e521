"""The gossip engine's network: a mixing matrix W from the scenario, its checks, its products and its traffic.

Plain PyTorch, Flower-free. A decentralised method (``rabo_flwr/algorithms/sldbo.py``) keeps one
copy of each of its variables per node, stacked along a leading node dimension, and mixes them
with W: row i of ``W @ Z`` is node i's weighted average of its neighbours' (and its own) values.

Topologies (``algorithm.topology``), on ``clients.num`` = n nodes, node i = partition i:

- ``ring``: i ~ i +- 1 (mod n).
- ``torus``: a 2-D torus of a x b nodes, a the largest divisor of n with a <= sqrt(n): node
  (r, c) ~ (r +- 1, c) and (r, c +- 1), modulo a and b (with a = 1 it is the ring; with a or b = 2
  the two neighbours along that dimension coincide and are one edge).
- ``complete``: every pair; W = (1/n) 11' exactly, so one mixing is the exact average.
- ``erdos-renyi``: each pair an edge with probability ``algorithm.edge_probability``, drawn from
  the scenario's seed, redrawn (same generator) until the graph is connected: the same seed gives
  the same graph.
- ``matrix``: W as given in ``algorithm.mixing`` (n rows of n weights); checked as below.

The graph's W are Metropolis-Hastings weights, w_ij = 1 / (1 + max(d_i, d_j)) on an edge (d the
degrees) and w_ii = 1 - sum_{j != i} w_ij: symmetric, doubly stochastic and nonnegative for any
undirected graph, and for a connected graph its second largest singular value is below 1, which
is what gossip needs (every node's value contracts towards the average). A given matrix must
be square of size n, nonnegative, with rows and columns summing to 1 (to 1e-9) and connected
(its nonzero pattern); symmetric is not required. :func:`mixing_problem` returns the first
violation as (key, message), which the scenario loader turns into one line naming the file and key.

Elements with one holder (:func:`mix` with ``held``): a node mixes an element only with the
neighbours that hold it, and keeps the weight of a neighbour that does not,
z_i <- z_i + sum_{j != i, j holds it} w_ij (z_j - z_i). Where every node holds the element this is
W; where exactly one node holds it (hyper-cleaning's per-example weights, ``Layout.owners``) it is
the identity: no other node has a copy to agree with. These are the only two cases a decentralised
method meets (every node trains the full model, and owned index sets are disjoint), and both
matrices are doubly stochastic, so gradient tracking keeps its invariant element by element.

Traffic (:func:`edge_bytes`): on a peer-to-peer network node j sends each i with w_ij != 0, i != j,
the elements of what it mixes that i holds too; the bytes of one mixing are those summed over the
directed edges (a ring of n nodes whose nodes hold the same vectors: 2n edges times their bytes; an
element with one holder is never sent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .scenario import Scenario

TOPOLOGIES = ("ring", "torus", "complete", "erdos-renyi", "matrix")
TOLERANCE = 1e-9
ER_DRAWS = 1000  # Erdos-Renyi graphs drawn at most before giving up on a connected one


def ring_edges(n: int) -> set[tuple[int, int]]:
    return {tuple(sorted((i, (i + 1) % n))) for i in range(n) if n > 1 and i != (i + 1) % n}


def torus_shape(n: int) -> tuple[int, int]:
    """(a, b), a * b = n, a the largest divisor of n not above sqrt(n)."""
    a = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return a, n // a


def torus_edges(n: int) -> set[tuple[int, int]]:
    a, b = torus_shape(n)
    edges = set()
    for r in range(a):
        for c in range(b):
            i = r * b + c
            for j in (((r + 1) % a) * b + c, r * b + (c + 1) % b):
                if i != j:
                    edges.add(tuple(sorted((i, j))))
    return edges


def complete_edges(n: int) -> set[tuple[int, int]]:
    return {(i, j) for i in range(n) for j in range(i + 1, n)}


def connected(n: int, edges: set[tuple[int, int]]) -> bool:
    """Whether the undirected graph on nodes 0..n-1 is connected (a breadth-first search from node 0)."""
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for i, j in edges:
        neighbours[i].add(j)
        neighbours[j].add(i)
    seen, frontier = {0}, [0]
    while frontier:
        frontier = [j for i in frontier for j in neighbours[i] if j not in seen]
        seen.update(frontier)
    return len(seen) == n


def erdos_renyi_edges(n: int, probability: float, seed: int) -> set[tuple[int, int]] | None:
    """A connected G(n, p) graph drawn from ``seed`` (redrawn until connected), or None after ER_DRAWS draws."""
    rng = np.random.default_rng([seed, 31_337])
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    for _ in range(ER_DRAWS):
        edges = {pair for pair, hit in zip(pairs, rng.random(len(pairs)) < probability) if hit}
        if connected(n, edges):
            return edges
    return None


def metropolis(n: int, edges: set[tuple[int, int]]) -> torch.Tensor:
    """Metropolis-Hastings weights of an undirected graph: symmetric and doubly stochastic (float64)."""
    degree = [0] * n
    for i, j in edges:
        degree[i] += 1
        degree[j] += 1
    W = torch.zeros(n, n, dtype=torch.float64)
    for i, j in edges:
        W[i, j] = W[j, i] = 1.0 / (1 + max(degree[i], degree[j]))
    W += torch.diag(1.0 - W.sum(1))
    return W


def complete(n: int) -> torch.Tensor:
    """(1/n) 11': what Metropolis weights give the complete graph, written exactly."""
    return torch.full((n, n), 1.0 / n, dtype=torch.float64)


def mixing_problem(scenario: "Scenario") -> tuple[str, str] | None:
    """Why the scenario's mixing matrix cannot be used, as (dotted key, message), or None."""
    algo, n = scenario.algorithm, scenario.clients.num
    if algo.topology not in TOPOLOGIES:
        return "algorithm.topology", f"{algo.topology!r} is not one of {', '.join(TOPOLOGIES)}"
    if algo.mixing and algo.topology != "matrix":
        return "algorithm.mixing", f"a given matrix needs algorithm.topology: matrix (it is {algo.topology!r})"
    if algo.topology == "erdos-renyi":
        if not 0.0 < algo.edge_probability <= 1.0:
            return "algorithm.edge_probability", f"must be in (0, 1], got {algo.edge_probability}"
        if erdos_renyi_edges(n, algo.edge_probability, scenario.seed) is None:
            return "algorithm.edge_probability", (f"{algo.edge_probability} drew no connected graph on {n} nodes "
                                                  f"in {ER_DRAWS} draws; raise it")
    if algo.topology != "matrix":
        return None
    rows = algo.mixing
    if len(rows) != n or any(len(row) != n for row in rows):
        return "algorithm.mixing", f"must be {n} x {n} (clients.num), got {len(rows)} rows of lengths {sorted({len(r) for r in rows})}"
    W = torch.tensor(rows, dtype=torch.float64)
    if (W < 0).any():
        i, j = (int(k) for k in (W < 0).nonzero()[0])
        return f"algorithm.mixing[{i}][{j}]", f"weights must be >= 0, got {W[i, j].item()}"
    for axis, name in ((1, "row"), (0, "column")):
        sums = W.sum(axis)
        bad = (sums - 1).abs() > TOLERANCE
        if bad.any():
            k = int(bad.nonzero()[0])
            return "algorithm.mixing", f"{name} {k} sums to {sums[k].item():.12g}; W must be doubly stochastic"
    edges = {(i, j) for i in range(n) for j in range(i + 1, n) if W[i, j] > 0 or W[j, i] > 0}
    if not connected(n, edges):
        return "algorithm.mixing", "the graph of its nonzero weights is not connected: gossip cannot reach consensus"
    return None


def mixing_matrix(scenario: "Scenario") -> torch.Tensor:
    """W (n x n, float64) of the scenario's topology; the scenario was validated (:func:`mixing_problem`)."""
    algo, n = scenario.algorithm, scenario.clients.num
    if algo.topology == "matrix":
        return torch.tensor(algo.mixing, dtype=torch.float64)
    if algo.topology == "complete":
        return complete(n)
    edges = {"ring": ring_edges, "torus": torus_edges}.get(algo.topology)
    return metropolis(n, edges(n) if edges else erdos_renyi_edges(n, algo.edge_probability, scenario.seed))


def mix(W: torch.Tensor, stacked: torch.Tensor, held: torch.Tensor | None = None) -> torch.Tensor:
    """W applied along the leading node dimension: row i is sum_j w_ij stacked[j]. ``held`` (bool, the
    shape of ``stacked``: which node holds which element; None: every node all of them) restricts each
    element's mixing to its holders (the module docstring); an element a node does not hold keeps its value."""
    W = W.to(stacked.dtype)
    if held is None:
        return torch.tensordot(W, stacked, dims=1)
    h = held.to(stacked.dtype)
    return stacked + h * (torch.tensordot(W, h * stacked, dims=1) - torch.tensordot(W, h, dims=1) * stacked)


def directed_edges(W: torch.Tensor) -> int:
    """How many (j -> i) pairs, i != j, have w_ij != 0: the messages of one mixing on a peer-to-peer network."""
    off = W.clone()
    off.fill_diagonal_(0)
    return int((off != 0).sum())


def edge_bytes(W: torch.Tensor, shared: int | torch.Tensor) -> int:
    """Bytes one mixing sends over a peer-to-peer network: on each directed edge j -> i, the bytes of the
    elements both nodes hold, ``shared`` (one number for every pair, or an n x n tensor of them)."""
    edges = W != 0
    edges.fill_diagonal_(False)
    return int((edges.long() * torch.as_tensor(shared, dtype=torch.long)).sum())
