"""SLDBO and S3LDBO, decentralised bilevel optimization on the gossip engine (``rabo_flwr/gossip.py``).

SLDBO: Dong, Ma, Yang, Yin, "A Single-Loop Algorithm for Decentralized Bilevel Optimization",
arXiv:2311.08945 (Mathematics of Operations Research, 2025). S3LDBO: Yin, Dong, Ma, Wang, Yang,
"S^3LDBO: A Snapshot Single-Loop Algorithm for Decentralized Bilevel Optimization", arXiv:2605.31311.

RECONSTRUCTED. What was read: both abstracts and a summary of S3LDBO (SLDBO: SOBA-based, fully single
loop, the hypergradient approximated with two matrix-vector products per iteration, gradient
tracking and a projection, no gradient heterogeneity assumption; S3LDBO: SLDBO with a snapshot
gradient-tracking mechanism, "SSGT", after Di et al.'s snap-shot DSGT, ICML 2024, by which agents
intermittently skip gradient, Jacobian and Hessian evaluations, analysed in the deterministic
setting). The algorithm boxes were not reached, so the paper's algorithm numbers are not cited
(rechecked in the sixth session: the journal version's abstract adds only that the method is "built
on the basis of the SOBA framework" and that gradient tracking and projection are what remove the
heterogeneity assumption; S3LDBO's HTML page was reachable to its introduction's first paragraph; no
full text or public code of either).
Assumed: the SOBA directions below, tracking of all three of them, adapt-then-combine mixing of
states and trackers, v projected per node onto a ball after mixing, and for S3LDBO a per-node coin
of probability p (seeded by seed, iteration, node) that refreshes the node's snapshot point.

Every node i (partition i; ``clients.num`` nodes, ``clients.fraction`` 1) has g_i and f_i on its
own data. At its point (x_i, y_i, v_i) its directions are, with H_i = d^2 g_i / dy^2 and
J_i v = d/dx <grad_y g_i, v> (the two matrix-vector products):

    d^x_i = grad_x f_i - J_i v_i,    d^y_i = grad_y g_i,    d^v_i = H_i v_i - grad_y f_i

(SimFBO's local directions, ``simfbo.local_directions`` with one step). With the nodes' rows
stacked (X, Y, V; trackers S^x, S^y, S^v; directions D^x, D^y, D^v) and W the mixing matrix,
iteration k is, for w in (x, y, v) with steps alpha, beta and gamma = ``algorithm.v_step`` (0: beta):

    D^k    = D^{k-1} with the rows of the nodes that computed this iteration replaced
    S^k_w  = W (S^{k-1}_w + D^k_w - D^{k-1}_w)              (S^{-1} = D^{-1} = 0: gradient tracking)
    X^{k+1} = W (X^k - alpha S^k_x),   Y^{k+1} = W (Y^k - beta S^k_y)
    V^{k+1} = P_r(W (V^k - gamma S^k_v))                      (P_r: each v_i onto ||v_i|| <= r)

r = ``algorithm.v_radius`` (0: no projection). Because W is doubly stochastic, the mean of the
trackers is the mean of the directions at every k, so the node averages move along the average
direction whatever the nodes' heterogeneity. SLDBO: every node computes every iteration.
S3LDBO: a node computes at its first iteration and then only when its coin (probability
p = ``algorithm.snapshot_probability``) refreshes its snapshot, the point it was at; otherwise its
row of D is reused (D^k_i - D^{k-1}_i = 0) and it is sent no message at all. A node that fails is
treated as one that skipped (its previous directions are reused), so the tracking invariant holds.

Reduction: with W = (1/n) 11' (``topology: complete``, or the matrix given) every node holds the
average after one mixing, S^k_i = mean_j D^k_j, and all nodes start at the same point, so every
node follows x <- x - alpha mean_i d^x_i(x, y, v) (likewise y with beta, v with gamma): one
SOBA step on the mean functions per iteration, which is ``simfbo`` with one local step
(``inner_steps: 1``) and the same alpha, beta and v_step (without projection). ``sldbo`` is
therefore compared with SimFBO, its federated counterpart (a test checks x, y and v agree).

Owned elements (``Layout.owners``: hyper-cleaning's x, one weight per training example, each node's
own block): a node holds the whole model except the owned groups, of which it holds its own index
set (:func:`node_plan`), the block a server-based method sends the same client. Node i keeps, is
sent, and steps only its block of x, and W acts on an element among its holders only
(``gossip.mix`` with ``held``): an owned element has one holder, so its mixing is the identity, its
tracker is its holder's current direction (s = s + d - d_prev with s and d starting at 0) and the
block steps x_i <- x_i - alpha d^x_i(x_i, y_i, v_i), while y, v and their trackers are mixed with W
as above. Why this is right: an element with one holder has no copy elsewhere, so there is no
consensus to reach and the average over its holders of the directions is the holder's own. Under
W = (1/n) 11' the reduction above still holds: y_i and v_i are the averages at every node, and the
owned block steps by alpha d^x_i at (x_i, y_bar, v_bar), which is SimFBO's coverage-counted step of
an element of count 1 (its holder's reply); a test checks it on hyper-cleaning. That step is n times
the gradient of F = (1/n) sum_i f_i in those coordinates (F's is (1/n) d^x_i), the same uniform
scaling the server-based methods take, so alpha means the same in every row of the family.

Rounds: one message round per iteration (``local``): the server sends node i its (x_i, y_i, v_i)
and receives its (d^x_i, d^y_i, d^v_i); the server holds every node's state and applies W, in the
plain engine and under Flower alike (the SuperLink relays; the nodes never talk to each other).
Traffic: a record's ``bytes_down`` and ``bytes_up`` are what the relay moved; ``bytes_p2p`` is
what a peer-to-peer network would send for the same iteration, two mixings (trackers, then
states) in which every node sends its mixed x- and two y-shaped vectors to each neighbour:
directed edges x 2 (|x| + 2 |y|) x bytes per element.

Design: the node states are server-side variables keyed by partition (row i of a stacked tensor
is partition i's), not client state: the issue's gossip engine has the server apply W, under
Flower's simulation any SuperNode may serve any partition (so a ClientApp's context would not
follow the node), and a checkpoint of the server then holds the whole run. State
(``ServerState.nodes``, checkpointed): per node x, y, v, the trackers s^x, s^y, s^v and the
directions last absorbed d^x, d^y, d^v (stacked over the nodes), initialised at the first
iteration from the global x_0, y_0 and v = 0; the global x, y and v (a persistent side) are set to
the node averages after every iteration, and the evaluation's ``x_error`` is that of the node
average of x (for an owned element, its holder's value). A node's row of an owned tensor is
full-sized; the elements it does not hold stay at their start and are neither sent nor mixed. Each
record has ``consensus_x``, ``consensus_y`` (||X - 1 x_bar|| / ||1 x_bar|| over the elements each
node holds: an owned element adds nothing to the spread), ``bytes_p2p`` (on each edge the elements
both nodes hold: an owned block never travels) and ``directions_reused`` (nodes whose previous
directions were used). Clients keep nothing. Submodels: none (the full model on every node,
capacity 1), owned groups aside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from ..gossip import edge_bytes, mix, mixing_matrix
from ..protocol import LOCAL
from ..submodel import Plan, open_index, scatter_into, slice_tensors
from .base import Algorithm, Phase, Side
from .simfbo import local_directions, v_step

if TYPE_CHECKING:
    from ..federation import ServerState
    from ..scenario import Scenario

VARIABLES = ("x", "y", "v")
COMPUTED = "computed"  # nodes.computed.count: how many times each node's directions were received


def refreshes(scenario: "Scenario", iteration: int, partition: int) -> bool:
    """S3LDBO's coin: whether ``partition`` refreshes its snapshot (computes its directions) at ``iteration``."""
    coin = np.random.default_rng([scenario.seed, iteration, partition, 4_242]).random()
    return bool(coin < scenario.algorithm.snapshot_probability)


def node_plan(state: "ServerState", partition: int) -> Plan:
    """What node ``partition`` holds: every tensor whole (the full model) but the groups a layout gives to
    data partitions (``Layout.owners``), of which its own index set: the plan the loop builds for it at
    capacity 1, so its replies pass the loop's shape checks."""
    return {group: owned[partition] for layout in state.layouts.values() for group, owned in layout.owners.items()}


def holdings(state: "ServerState", n: int) -> dict[str, dict[str, torch.Tensor | None]]:
    """Per variable and tensor, which node holds which element ((n, *shape) bool), or None where every
    node holds the whole tensor (no dimension in an owned group)."""
    plans = [node_plan(state, i) for i in range(n)]
    out: dict[str, dict[str, torch.Tensor | None]] = {}
    for w in VARIABLES:
        dims = state.layout(w).dims
        out[w] = {}
        for name, t in state.tensors[w].items():
            if not any(group in plans[0] for group in dims[name] if group):
                out[w][name] = None
                continue
            held = torch.zeros(n, *t.shape, dtype=torch.bool)
            for i, plan in enumerate(plans):
                held[i][open_index(dims[name], t.shape, plan)] = True
            out[w][name] = held
    return out


def node_mean(stacked: torch.Tensor, held: torch.Tensor | None, previous: torch.Tensor) -> torch.Tensor:
    """Each element's average over the nodes that hold it (``previous`` where none does)."""
    if held is None:
        return stacked.mean(0)
    h = held.to(stacked.dtype)
    count = h.sum(0)
    return torch.where(count > 0, (h * stacked).sum(0) / count.clamp_min(1), previous)


def init_nodes(state: "ServerState", n: int) -> None:
    """Every node at the global x, y and v; trackers and directions zero."""
    nodes = {}
    for w in VARIABLES:
        start = state.tensors[w]
        nodes[w] = {name: t.expand(n, *t.shape).clone() for name, t in start.items()}
        for kind in ("s", "d"):
            nodes[kind + w] = {name: torch.zeros(n, *t.shape, dtype=t.dtype) for name, t in start.items()}
    nodes[COMPUTED] = {"count": torch.zeros(n, dtype=torch.long)}
    state.nodes = nodes


def project(stacked: Mapping[str, torch.Tensor], radius: float) -> dict[str, torch.Tensor]:
    """Each node's row (over all of v's tensors) onto the ball of ``radius``; 0 leaves them."""
    if not radius:
        return dict(stacked)
    n = next(iter(stacked.values())).shape[0]
    norms = sum(t.reshape(n, -1).pow(2).sum(1) for t in stacked.values()).sqrt()
    scale = torch.clamp(radius / norms.clamp_min(1e-300), max=1.0)
    return {name: t * scale.reshape(n, *[1] * (t.dim() - 1)).to(t.dtype) for name, t in stacked.items()}


def consensus(stacked: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor | None]) -> float:
    """||Z - 1 z_bar|| / ||1 z_bar|| over every tensor's held elements, z_bar the holders' average (0 when
    the average is zero and the holders agree)."""
    spread = size = 0.0
    for name, t in stacked.items():
        h = torch.ones_like(t, dtype=torch.float64) if held[name] is None else held[name].double()
        average = node_mean(t, held[name], t.mean(0)).double()
        spread += float((h * (t.double() - average).pow(2)).sum())
        size += float((h * average.pow(2)).sum())
    spread, size = spread ** 0.5, size ** 0.5
    return spread / size if size else spread


def shared_bytes(stacked: Mapping[str, torch.Tensor], held: Mapping[str, torch.Tensor | None]) -> torch.Tensor:
    """(n, n): bytes of the elements of these tensors that nodes i and j both hold."""
    n = next(iter(stacked.values())).shape[0]
    out = torch.zeros(n, n, dtype=torch.long)
    for name, t in stacked.items():
        if held[name] is None:
            out += t[0].numel() * t.element_size()
        else:
            h = held[name].reshape(n, -1).double()
            out += (h @ h.T).round().long() * t.element_size()
    return out


class Gossip(Algorithm):
    """SLDBO (``snapshot=False``) or S3LDBO (``snapshot=True``); see the module docstring."""

    default_mask = "off"
    full_model = True
    decentralised = True

    def __init__(self, name: str, snapshot: bool):
        self.name, self.snapshot = name, snapshot

    def phases(self, scenario):
        return [Phase(LOCAL, VARIABLES, {}, "lower_loss", gathers=VARIABLES)]

    def sides(self, scenario):
        return (Side("v", "y", persistent=True),)

    def arrays(self, phase, state, scenario, partition, iteration):
        """Node ``partition``'s own x, y and v (what it holds: :func:`node_plan`); None for an S3LDBO
        node that keeps its snapshot."""
        if not state.nodes:
            init_nodes(state, scenario.clients.num)
        computed = int(state.nodes[COMPUTED]["count"][partition])
        if self.snapshot and computed and not refreshes(scenario, iteration, partition):
            return None
        plan = node_plan(state, partition)
        return {w: slice_tensors({name: t[partition] for name, t in state.nodes[w].items()}, state.layout(w), plan)
                for w in VARIABLES}

    def gather(self, phase, state, scenario, replies):
        """Gradient tracking and mixing of every node's state (the module docstring's iteration k)."""
        algo = scenario.algorithm
        n, W, nodes = scenario.clients.num, mixing_matrix(scenario), state.nodes
        held = holdings(state, n)
        steps = {"x": algo.alpha, "y": algo.beta, "v": v_step(algo)}
        for partition in replies:
            nodes[COMPUTED]["count"][partition] += 1
        for w in VARIABLES:
            dims = state.layout(w).dims
            previous = nodes["d" + w]
            current = {k: t.clone() for k, t in previous.items()}
            for partition, update in replies.items():
                plan = node_plan(state, partition)
                for k, t in update[w].items():
                    current[k][partition] = scatter_into(current[k][partition], t, dims[k], plan)
            nodes["s" + w] = {k: mix(W, nodes["s" + w][k] + current[k] - previous[k], held[w][k]) for k in current}
            nodes["d" + w] = current
            nodes[w] = {k: mix(W, nodes[w][k] - steps[w] * nodes["s" + w][k], held[w][k]) for k in current}
        nodes["v"] = project(nodes["v"], algo.v_radius)
        for w in VARIABLES:
            state.tensors[w] = {k: node_mean(t, held[w][k], state.tensors[w][k]) for k, t in nodes[w].items()}
        shared = sum(shared_bytes(nodes[w], held[w]) for w in VARIABLES)
        return {"bytes_p2p": edge_bytes(W, 2 * shared), "consensus_x": consensus(nodes["x"], held["x"]),
                "consensus_y": consensus(nodes["y"], held["y"]), "directions_reused": n - len(replies)}

    def run(self, phase, job):
        if phase != LOCAL:
            raise ValueError(f"{self.name} has no phase {phase!r}")
        return local_directions(job, normalised=False, steps=1)
