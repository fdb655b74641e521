"""Few-shot hyper-representation on Omniglot: x = backbone, y = classifier head.

Lower level g: cross-entropy of the head on an episode's support set plus a ridge term
(which makes g strongly convex in a linear head). Upper level f: cross-entropy on the same
episode's query set. ``task.val_alphabets`` whole background alphabets are held out as
validation; the characters of the other background alphabets are sharded across clients
(:class:`~rabo_flwr.data.omniglot.ClassShards`: whole alphabets, or characters, overlapping when
there are more clients than ``n_way``-character shards). Validation episodes serve every choice
(early stopping, the model kept, step sizes); the evaluation alphabets (test) are never trained
on and are read once, for the reported number (``run.final_test``).

``task.labels`` says what the head classifies: ``episode`` (the bilevel rows, ProtoNet, MAML:
an N-way head over an episode's own labels 0..N-1, fitted per episode) or ``global`` (the
single-level submodel rows: one head over all background characters, trained with the
characters' ids, as supervised federated training does; a head over per-episode labels would be
asked to map a different permutation of classes to its outputs in every episode).
"""

from __future__ import annotations

import functools
import math
import operator
from functools import cached_property
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ..data.omniglot import ClassShards, Episode, EpisodeSampler, hold_out_alphabets, load_omniglot, load_one_shot_runs
from ..models import build_head
from ..models.backbones import build_backbone
from ..cost import shapes
from ..scenario import Scenario
from ..threads import map_one_thread_each, part_thread_count
from .base import BilevelTask, ClientBatch, FunctionalModule, Tensors, init_module_tensors


def seeded_generator(*entropy: int) -> torch.Generator:
    """A torch generator from several integers (seed, iteration, partition, ...), stable across runs."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(entropy)).generate_state(1)[0]))


CLIENT_EVAL_ITERATION = 2**31 - 2  # seeds the clients' evaluation episodes apart from any training iteration's


class FewShotTask(BilevelTask):
    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        cfg, model = scenario.task, scenario.model
        self._backbone = lambda: build_backbone(model.backbone, in_channels=1, width=model.width)
        backbone = FunctionalModule(self._backbone)
        feature_group, features = backbone.module.out_group, backbone.module.out_features
        outputs = cfg.n_way if cfg.labels == "episode" else len(self._train[0].class_names)
        self._head = lambda: build_head(model.head, features, outputs, feature_group, model.head_hidden)
        self.backbone = backbone
        self.head = FunctionalModule(self._head)
        self.x_layout = backbone.module.layout()
        self.y_layout = self.head.module.layout()
        self.num_partitions = scenario.clients.num
        self.main_metric = "val_accuracy"
        self.test_metric = "test_accuracy"

    # ------------------------------------------------------------------ data

    @cached_property
    def _train(self):
        split = load_omniglot(background=True, image_size=self.scenario.task.image_size, download=self.scenario.task.download)
        return split, EpisodeSampler(split.images, split.labels)

    @cached_property
    def _background_classes(self) -> tuple[np.ndarray, np.ndarray]:
        """(training, validation) character ids of the background split."""
        split, _ = self._train
        return hold_out_alphabets(split.alphabet_of_class, self.scenario.task.val_alphabets, self.scenario.seed)

    @cached_property
    def _shards(self) -> ClassShards:
        """Each partition's share of the training characters (positions in ``_background_classes[0]``),
        worked out when asked (the same memory for 10 or 10,000 clients)."""
        split, _ = self._train
        training, _ = self._background_classes
        cfg = self.scenario.task
        return ClassShards(split.alphabet_of_class[training], self.scenario.clients.num, self.scenario.seed,
                           by=cfg.shard_by, min_classes=cfg.n_way)

    def _classes_of(self, partition: int) -> np.ndarray:
        """The character ids the partition holds."""
        training, _ = self._background_classes
        return training[self._shards[partition]]

    def prepare(self) -> None:
        self._shards, self._episodes("val"), self._episodes("test")  # noqa: B018 - loads and decodes both splits
        if self.scenario.task.eval_one_shot_runs:
            self._one_shot_runs  # noqa: B018

    def client_episodes(self, partition: int, iteration: int, device: torch.device, count: int) -> list[Episode]:
        """``count`` episodes of the partition's characters, seeded by (seed, iteration, partition)."""
        cfg = self.scenario.task
        _, sampler = self._train
        gen = seeded_generator(self.scenario.seed, iteration, partition)
        episodes = [sampler.sample(self._classes_of(partition), cfg.n_way, cfg.k_shot, cfg.n_query or None, gen)
                    for _ in range(count)]
        return [Episode(e.support_x.to(device), e.support_y.to(device), e.query_x.to(device), e.query_y.to(device),
                        e.classes) for e in episodes]

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        """One episode: every inner step fits the head on its support set, f is its query loss."""
        (ep,) = self.client_episodes(partition, iteration, device, 1)
        support = (ep.support_x, ep.support_y)
        return ClientBatch(lower_steps=[support] * steps, lower=support, upper=(ep.query_x, ep.query_y),
                           examples=len(ep.support_y) + len(ep.query_y))

    # ------------------------------------------------------------------ model and losses

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        torch.manual_seed(seed)
        backbone, head = self._backbone(), self._head()
        x = init_module_tensors(backbone, self.x_layout)
        y = init_module_tensors(head, self.y_layout)
        return x, {k: torch.zeros_like(v) for k, v in y.items()}

    def _ridge(self, y: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # t * t is what pow(t, 2) computes, with a cheaper backward (a node of every Hessian-vector
        # product's graph); summed from the first square, not from 0 as sum() would: the same value,
        # one operation less
        return 0.5 * self.scenario.task.lower_l2 * functools.reduce(operator.add, ((t * t).sum() for t in y.values()))

    def features(self, x: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Backbone features, optionally L2-normalised to a fixed norm (bounded logits, stable bilevel).

        ``images`` is one batch ``(n, C, H, W)`` or E batches ``(E, n, C, H, W)``, each normalised
        by the backbone's BatchNorm with its own statistics (features ``(E, n, dim)``).
        """
        return self._normalised(self.backbone(x, images))

    def _normalised(self, features: torch.Tensor) -> torch.Tensor:
        scale = self.scenario.model.feature_norm
        return scale * F.normalize(features, dim=-1) if scale else features

    def lower_loss(self, x, y, batch):
        images, labels = batch
        return F.cross_entropy(self.head(y, self.features(x, images)), labels) + self._ridge(y)

    def upper_loss(self, x, y, batch):
        images, labels = batch
        return F.cross_entropy(self.head(y, self.features(x, images)), labels)

    def lower_objective(self, x, batch, meter):
        images, labels = batch
        with torch.no_grad():
            features = meter.unit("lower.features", shapes(x, images), lambda: self.features(x, images))
        return lambda y: F.cross_entropy(self.head(y, features), labels) + self._ridge(y)

    # ------------------------------------------------------------------ evaluation

    @cached_property
    def _validation_episodes(self) -> list[Episode]:
        """A fixed, seeded set of episodes from the held-out background alphabets."""
        cfg = self.scenario.task
        _, sampler = self._train
        _, classes = self._background_classes
        gen = seeded_generator(self.scenario.seed, 2**31 - 2)
        return [sampler.sample(classes, cfg.n_way, cfg.k_shot, cfg.n_query or None, gen) for _ in range(cfg.val_episodes)]

    @cached_property
    def _test_episodes(self) -> list[Episode]:
        """A fixed, seeded set of episodes from the evaluation alphabets (comparable across runs)."""
        cfg = self.scenario.task
        split = load_omniglot(background=False, image_size=cfg.image_size, download=cfg.download)
        sampler = EpisodeSampler(split.images, split.labels)
        classes = np.arange(len(split.alphabet_of_class))
        seed = self.scenario.seed if cfg.eval_seed < 0 else cfg.eval_seed
        gen = seeded_generator(seed, 2**31 - 1)
        return [sampler.sample(classes, cfg.n_way, cfg.k_shot, cfg.n_query or None, gen) for _ in range(cfg.eval_episodes)]

    def _episodes(self, split: str) -> list[Episode]:
        """The fixed episodes of ``split``: "val" (held-out background alphabets) or "test" (evaluation alphabets)."""
        if split not in ("val", "test"):
            raise ValueError(f"unknown split {split!r} (val or test)")
        return self._validation_episodes if split == "val" else self._test_episodes

    def _fit_heads(self, support: torch.Tensor, labels: torch.Tensor, n_way: int) -> torch.Tensor:
        """Ridge-regularised logistic regression per episode, all episodes at once, from zero."""
        cfg = self.scenario.task
        episodes, _, dim = support.shape
        weight = torch.zeros(episodes, n_way, dim, device=support.device, requires_grad=True)
        bias = torch.zeros(episodes, n_way, device=support.device, requires_grad=True)
        onehot = F.one_hot(labels, n_way).float()
        for _ in range(cfg.eval_steps):
            logits = torch.einsum("end,ecd->enc", support, weight) + bias[:, None, :]
            loss = -(onehot * logits.log_softmax(-1)).sum(-1).mean(-1).sum()
            loss = loss + 0.5 * cfg.eval_l2 * (weight.pow(2).sum() + bias.pow(2).sum())
            gw, gb = torch.autograd.grad(loss, (weight, bias))
            with torch.no_grad():
                weight -= cfg.eval_lr * gw
                bias -= cfg.eval_lr * gb
        return weight.detach(), bias.detach()

    def _episode_accuracies(self, x: Tensors, episodes: list[Episode], n_way: int, device: torch.device) -> torch.Tensor:
        """Query accuracy of each episode. Its support set and its query set are each one batch for
        BatchNorm (transductive, per episode). On a CPU the episodes are cut into one part per thread
        the run gives (:func:`~rabo_flwr.threads.part_threads`) and the parts run at once, each on one
        torch thread (:func:`~rabo_flwr.threads.map_one_thread_each`: one episode's operations are too
        small to share threads); an episode's numbers are its own alone, so they are the same bits
        for any thread count."""
        x = {k: v.to(device) for k, v in x.items()}
        size = math.ceil(len(episodes) / (part_thread_count() if device.type == "cpu" else 1))
        parts = [episodes[start:start + size] for start in range(0, len(episodes), size)]
        with self.backbone.bound(x) as backbone:
            accuracies = map_one_thread_each(lambda part: self._part_accuracies(backbone, part, n_way, device), parts)
        return torch.cat(accuracies)

    def _part_accuracies(self, backbone: torch.nn.Module, episodes: list[Episode], n_way: int,
                         device: torch.device) -> torch.Tensor:
        """:meth:`_episode_accuracies` of some episodes: every episode's sets in one backbone call each."""
        with torch.no_grad():
            support = self._normalised(backbone(torch.stack([e.support_x for e in episodes]).to(device)))
            query = self._normalised(backbone(torch.stack([e.query_x for e in episodes]).to(device)))
        support_y = torch.stack([e.support_y for e in episodes]).to(device)
        query_y = torch.stack([e.query_y for e in episodes]).to(device)
        with torch.enable_grad():
            weight, bias = self._fit_heads(support, support_y, n_way)
        logits = torch.einsum("end,ecd->enc", query, weight) + bias[:, None, :]
        return (logits.argmax(-1) == query_y).float().mean(-1).cpu()

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device, split: str) -> dict[str, float]:
        """Adapt a fresh head on each support set with the backbone x; report query accuracy.

        ``<split>_accuracy`` is the mean over the split's fixed episodes and ``<split>_accuracy_se``
        its standard error (standard deviation over episodes / sqrt(episodes)).
        """
        per_episode = self._episode_accuracies(x, self._episodes(split), self.scenario.task.n_way, device)
        metrics = {f"{split}_accuracy": float(per_episode.mean()),
                   f"{split}_accuracy_se": float(per_episode.std() / len(per_episode) ** 0.5) if len(per_episode) > 1 else 0.0}
        if split == "test" and self.scenario.task.eval_one_shot_runs:
            metrics["one_shot_runs_accuracy"] = float(self._episode_accuracies(x, self._one_shot_runs, 20, device).mean())
        return metrics

    def evaluate_client(self, partition: int, x: Tensors, y: Tensors, device: torch.device) -> dict[str, float]:
        """Query accuracy of fresh heads (as in :meth:`evaluate`) on episodes of the partition's own
        characters: a fixed, seeded set of ``task.eval_episodes / clients.num`` (at least one)."""
        cfg = self.scenario.task
        count = max(1, cfg.eval_episodes // self.scenario.clients.num)
        episodes = self.client_episodes(partition, CLIENT_EVAL_ITERATION, torch.device("cpu"), count)
        per_episode = self._episode_accuracies(x, episodes, cfg.n_way, device)
        return {"accuracy": float(per_episode.mean()), "examples": float(sum(len(e.query_y) for e in episodes))}

    @cached_property
    def _one_shot_runs(self) -> list[Episode]:
        """The official 20 runs of 20-way one-shot classification, as episodes."""
        episodes = []
        for run in load_one_shot_runs(image_size=self.scenario.task.image_size, download=self.scenario.task.download):
            to_float = lambda a: torch.from_numpy(a).float().div(255).unsqueeze(1)
            episodes.append(Episode(to_float(run.train_images), torch.arange(20),
                                    to_float(run.test_images), torch.from_numpy(run.test_labels), torch.arange(20)))
        return episodes
