"""The paper's single-level baselines of Table II: one phase per iteration, no hypergradient.

Each client takes its iteration's episode of its shard, the same one the bilevel rows' inner and
outer phases use (so that an iteration means the same client data in every row), takes T local
steps on it, and replies ``(w_0 - w_T) / lr`` per side; the server step with the same ``lr`` is
the coverage-counted average of the clients' models (FedAvg when everyone holds everything).

- Submodel rows (``static``, ``oap``, ``fedrolex``, ``fiarse``): backbone x and head y trained
  together on one objective, cross-entropy of the head on an episode's support and query images
  together, on the client's submodel; they differ only in their extraction rule (mask policy).
  Their scenarios (``scenarios/paper/table2/``) set ``task.labels: global``: the head classifies
  every background character and the images carry their character ids. With per-episode labels
  0..N-1 the same output names a different character in every episode, and training on that
  lowers the backbone's few-shot accuracy below its random initialisation (README, step-size sweep).
- ``dist-protonet``: the full backbone, the prototypical loss (Snell et al., 2017): query
  features classified by negative squared distance to the support prototypes. No head.
- ``dist-maml``: the full backbone and head, first-order MAML (Finn et al., 2017, Sec. 5.2;
  "FOMAML" in Nichol et al., 2018): ``adapt_steps`` SGD steps on the support set from the
  current parameters, then the query-set gradient at the adapted parameters, applied to the
  un-adapted ones. First order because second-order MAML through the backbone costs several
  times more on a CPU, and on Omniglot the two reach similar accuracy (Finn et al., Sec. 5.2).

All of them are evaluated like RABO: a fresh linear head fitted on each test episode's support
features (``FewShotTask.evaluate``), so the rows compare backbones under one protocol.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from ..cost import shapes
from ..data.omniglot import Episode
from ..protocol import LOCAL
from .base import Algorithm, ClientJob, LocalResult, Phase, leaves, loss_and_grads, scaled_change, sgd_step


def _episodes(job: ClientJob) -> list[Episode]:
    """The iteration's episode once per local step (T steps on one episode, as the bilevel inner steps)."""
    (episode,) = job.task.client_episodes(job.partition, job.iteration, job.device, 1)
    return [episode] * job.scenario.algorithm.inner_steps


def _result(updates: dict, losses: list[float], episodes: list[Episode]) -> LocalResult:
    """The reply of a phase of local steps: updates, first and last loss, distinct examples seen."""
    examples = len(episodes[0].support_y) + len(episodes[0].query_y)
    return LocalResult(updates, {"loss_start": losses[0], "loss": losses[-1], "examples": examples})


def fiarse_gradient_factors(weights: Mapping[str, torch.Tensor], thresholds: Mapping[str, torch.Tensor]
                            ) -> dict[str, torch.Tensor]:
    """FIARSE's gradient factor d(w m(|w|))/dw = 1 + 2 theta |w| / (|w| + theta)^2 of every weight with a threshold.

    FIARSE trains w through the masked weight w m(|w|), m = 1[|w| >= theta], whose derivative it
    replaces by 2 theta / (|w| + theta)^2. ``weights`` are the client's current values (FIARSE
    recomputes the mask in every forward pass), ``thresholds`` the per-tensor theta the server
    sent (``rabo_flwr.masks.ImportanceThresholdMask``).
    """
    factors = {}
    for name, theta in thresholds.items():
        if name in weights:
            s = weights[name].detach().abs()
            theta = theta.to(s).reshape(())
            # 0/0 where |w| = theta = 0 (a zero-initialised head): no boost there, as FIARSE's nan_to_num gives
            factors[name] = 1 + torch.nan_to_num(2 * theta * s / (s + theta) ** 2, nan=0.0, posinf=0.0)
    return factors


class SingleLevel(Algorithm):
    """Submodel training of backbone and head on one objective, with the extraction rule ``mask``."""

    episodic = True

    def __init__(self, name: str, mask: str):
        self.name, self.default_mask = name, mask

    def phases(self, scenario):
        algo = scenario.algorithm
        return [Phase(LOCAL, ("x", "y"), {"x": algo.alpha, "y": algo.beta}, "loss")]

    def run(self, phase, job):
        task, meter, algo = job.task, job.meter, job.scenario.algorithm
        x, y = leaves(job.x), leaves(job.y)
        episodes = _episodes(job)
        losses = []
        for ep in episodes:
            images = torch.cat([ep.support_x, ep.query_x])
            labels = torch.cat([ep.support_y, ep.query_y])
            if job.scenario.task.labels == "global":
                labels = ep.classes.to(images.device)[labels]  # character ids
            params = list(x.values()) + list(y.values())
            loss, grads = loss_and_grads(meter, "local.step", lambda: F.cross_entropy(
                task.head(y, task.features(x, images)), labels), params, shapes(x, y, images))
            losses.append(loss)
            factors = fiarse_gradient_factors(x | y, job.thresholds)  # FIARSE's extraction sent thresholds
            grads = [g * factors[n] if n in factors else g for n, g in zip(list(x) + list(y), grads)]
            sgd_step(list(x.values()), grads[:len(x)], algo.alpha)
            sgd_step(list(y.values()), grads[len(x):], algo.beta)
        return _result({"x": scaled_change(job.x, x, algo.alpha), "y": scaled_change(job.y, y, algo.beta)}, losses, episodes)


def prototypical_loss(task, x, episode: Episode) -> torch.Tensor:
    """Cross-entropy of query features against support-class prototypes (negative squared distance)."""
    support = task.features(x, episode.support_x)
    query = task.features(x, episode.query_x)
    n_way = int(episode.support_y.max()) + 1
    prototypes = torch.zeros(n_way, support.shape[1], dtype=support.dtype, device=support.device)
    prototypes = prototypes.index_add(0, episode.support_y, support) / torch.bincount(episode.support_y, minlength=n_way)[:, None]
    return F.cross_entropy(-torch.cdist(query, prototypes).pow(2), episode.query_y)


class ProtoNet(Algorithm):
    """Dist-ProtoNet: full backbone, prototypical loss, local SGD, averaging."""

    name = "dist-protonet"
    default_mask = "off"
    full_model = True
    episodic = True

    def phases(self, scenario):
        return [Phase(LOCAL, ("x",), {"x": scenario.algorithm.alpha}, "loss")]

    def run(self, phase, job):
        task, meter, algo = job.task, job.meter, job.scenario.algorithm
        x = leaves(job.x)
        episodes = _episodes(job)
        losses = []
        for ep in episodes:
            loss, grads = loss_and_grads(meter, "local.step", lambda: prototypical_loss(task, x, ep), list(x.values()),
                                         shapes(x, ep.support_x, ep.query_x))
            losses.append(loss)
            sgd_step(list(x.values()), grads, algo.alpha)
        return _result({"x": scaled_change(job.x, x, algo.alpha)}, losses, episodes)


class Maml(Algorithm):
    """Dist-MAML: full backbone and head, first-order MAML meta-steps, averaging."""

    name = "dist-maml"
    default_mask = "off"
    full_model = True
    episodic = True

    def phases(self, scenario):
        algo = scenario.algorithm
        return [Phase(LOCAL, ("x", "y"), {"x": algo.alpha, "y": algo.beta}, "loss")]

    def run(self, phase, job):
        task, meter, algo = job.task, job.meter, job.scenario.algorithm
        x, y = leaves(job.x), leaves(job.y)
        n_x = len(x)
        episodes = _episodes(job)
        losses = []

        def loss_at(params, images, labels):
            px, py = dict(zip(x, params[:n_x])), dict(zip(y, params[n_x:]))
            return F.cross_entropy(task.head(py, task.features(px, images)), labels)

        for ep in episodes:
            start = list(x.values()) + list(y.values())
            adapted = [p.detach().clone().requires_grad_(True) for p in start]
            for _ in range(algo.adapt_steps):
                _, grads = loss_and_grads(meter, "maml.adapt_step", lambda: loss_at(adapted, ep.support_x, ep.support_y),
                                          adapted, shapes(start, ep.support_x))
                sgd_step(adapted, grads, algo.adapt_lr)
            loss, meta = loss_and_grads(meter, "maml.query_step", lambda: loss_at(adapted, ep.query_x, ep.query_y),
                                        adapted, shapes(start, ep.query_x))
            losses.append(loss)
            sgd_step(start[:n_x], meta[:n_x], algo.alpha)
            sgd_step(start[n_x:], meta[n_x:], algo.beta)
        return _result({"x": scaled_change(job.x, x, algo.alpha), "y": scaled_change(job.y, y, algo.beta)}, losses, episodes)
