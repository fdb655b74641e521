"""Federated data hyper-cleaning on CIFAR-10: x = one weight per training example, y = a classifier.

The benchmark the federated bilevel papers share (FedNest, SimFBO, ... after Franceschi et al.,
ICML 2018), on CIFAR-10 instead of MNIST. A seeded, class-stratified subset of CIFAR-10's
training images (``task.train_subsample``) is split into IID client shards, each into a training
and a clean validation part (``task.val_fraction``, :func:`~rabo_flwr.data.cifar.split_clients`).
In each client's training part a fraction p = ``task.flip_fraction`` of the labels is flipped:
round(p n_i) examples drawn uniformly, each relabelled to a uniformly drawn *other* class
(:func:`flip_labels`, seeded by the scenario's seed and the partition).

    g_i(x, y) = (1/n_i) sum_j sigmoid(x_j) CE(y; a_j, noisy label_j) + (lower_l2 / 2) ||y||^2
    f_i(x, y) = mean CE(y) over the client's clean validation split          (does not read x)

so the hypergradient is the implicit term alone, -(1/n_i) sigmoid'(x_j) grad_y CE_j' v with
v = [H_yy]^-1 grad_y f_i: it is of order 1/n_i per example, which is why the scenarios' alpha is
large. x starts at 0 (every weight 1/2). The inner steps use mini-batches of ``task.batch_size``
of the client's training split (the whole split when it is smaller); g in the hypergradient is
the whole split, so every weight of the client gets its hypergradient at every iteration.

x per example meets submodels and coverage through ``Layout.owners``: x is one vector
(``"weights"``) over every client's training examples, the clients' blocks in partition order,
and its one group (``"examples"``) is owned: partition p holds exactly its own block, whatever
its capacity and whatever mask policy the scenario gives x (``build_plan``). A client is sent its
own weights only (position k of its slice is its k-th training example, the order of the
batches' ``positions``), replies with updates for them only, and the server's coverage count of
every element is 1 when its holder replied and 0 otherwise, so the coverage-counted step gives
each weight exactly its holder's update, and a weight whose holder was not sampled or failed
keeps its value. y (the classifier) follows the scenario's y-mask policy as in any task:
``task.classifier: linear`` (a linear layer on a fixed feature map, :meth:`HyperCleaningTask.features`;
no channel groups, so it always travels whole) or ``backbone`` (``model.backbone`` at
``model.width`` with its linear head on the images, channel groups and submodels).

Metrics: ``val_accuracy`` on the clients' clean validation splits pooled (what the upper level
trains on: it selects the model kept), ``test_accuracy`` on the (clean) test set, and on both
splits ``flip_precision`` and ``flip_recall`` of the down-weighted examples (sigmoid(x_j) < 1/2,
i.e. x_j < 0) against the flipped ones, and ``downweighted`` (their share) (:func:`cleaning_scores`).
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.cifar import load_cifar10, split_clients, subsample_per_class, load_test_subset
from ..models import Classifier
from ..models.backbones import build_backbone
from ..scenario import Scenario
from ..submodel import Layout
from .base import BilevelTask, ClientBatch, FunctionalModule, Tensors, init_module_tensors
from .fewshot import seeded_generator
from .loss_tuning import EVAL_BATCH, NUM_CLASSES, to_input

GROUP = "examples"
WEIGHTS = "weights"
FLIP_STREAM, FEATURE_STREAM = 16_000, 16_001  # seed the label flips and the feature map apart from other uses
FEATURE_POOL = 8  # the feature map averages each filter's response over 8x8 cells: a 4x4 grid of 32x32 images


def flip_labels(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): round(fraction * n) examples drawn uniformly, each given a
    uniformly drawn class other than its own."""
    chosen = rng.choice(len(labels), size=int(round(fraction * len(labels))), replace=False)
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + rng.integers(1, NUM_CLASSES, size=len(chosen))) % NUM_CLASSES
    flipped = np.zeros(len(labels), dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def cleaning_scores(weights: torch.Tensor, flipped: torch.Tensor) -> dict[str, float]:
    """Precision and recall of the down-weighted examples (sigmoid(x_j) < 1/2, i.e. x_j < 0) against
    the flipped ones, and the share down-weighted. Precision is 0 when none is down-weighted
    (scikit-learn's convention); recall is 0 when none is flipped."""
    down = weights < 0
    hits = int((down & flipped).sum())
    return {"flip_precision": hits / int(down.sum()) if down.any() else 0.0,
            "flip_recall": hits / int(flipped.sum()) if flipped.any() else 0.0,
            "downweighted": float(down.float().mean())}


class Precomputed(nn.Module):
    """The linear classifier's "backbone": its inputs are already the fixed features (no parameters, no groups)."""

    def __init__(self, features: int):
        super().__init__()
        self.out_features = features
        self.out_group = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def layout(self) -> Layout:
        return Layout(groups={}, dims={})


class Examples(NamedTuple):
    """A batch: the classifier's inputs (features or normalised images), labels, and the positions of
    the examples in the client's x slice (lower-level batches; the upper level's are unused)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor


class HyperCleaningTask(BilevelTask):
    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        cfg, model = scenario.task, scenario.model
        if cfg.classifier == "linear":
            gen = seeded_generator(scenario.seed, FEATURE_STREAM)
            self.filters = torch.randn(cfg.random_filters, 3, 3, 3, generator=gen) / 27 ** 0.5
            features = cfg.random_filters * (32 // FEATURE_POOL) ** 2
            self._classifier = lambda: Classifier(Precomputed(features), NUM_CLASSES)
        else:
            self._classifier = lambda: Classifier(build_backbone(model.backbone, 3, model.width), NUM_CLASSES)
        self.classifier = FunctionalModule(self._classifier)
        self._client_inputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.y_layout = self.classifier.module.layout()
        self.num_partitions = scenario.clients.num
        self.main_metric = "val_accuracy"
        self.test_metric = "test_accuracy"

    @cached_property
    def x_layout(self) -> Layout:
        """One weight per training example; partition p owns its block (see the module docstring).
        Built when first asked for: its size is the data's."""
        owners = [torch.arange(start, start + len(train)) for start, (train, _) in zip(self.offsets, self.client_splits)]
        return Layout(groups={GROUP: self.offsets[-1]}, dims={WEIGHTS: (GROUP,)}, owners={GROUP: owners})

    # ------------------------------------------------------------------ data

    @cached_property
    def _train(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = load_cifar10(train=True, download=self.scenario.task.download)
        return images, labels

    @cached_property
    def client_splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, validation) indices into CIFAR-10's training set per client: a seeded per-class
        subsample (``task.train_subsample``) in IID shards, each split stratified by class."""
        _, labels = self._train
        cfg, seed = self.scenario.task, self.scenario.seed
        indices = np.arange(len(labels))
        if cfg.train_subsample < 1.0:
            indices = subsample_per_class(indices, labels, cfg.train_subsample, seed)
        return split_clients(indices, labels, self.scenario.clients.num, seed, cfg.val_fraction)

    @cached_property
    def offsets(self) -> list[int]:
        """Where each partition's block of x starts, and (last) the length of x."""
        return [0, *np.cumsum([len(train) for train, _ in self.client_splits]).tolist()]

    @cached_property
    def noisy_labels(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per client, (noisy training labels, flipped mask), in the order of its training indices."""
        _, labels = self._train
        out = []
        for partition, (train, _) in enumerate(self.client_splits):
            rng = np.random.default_rng([self.scenario.seed, FLIP_STREAM, partition])
            out.append(flip_labels(labels[train], self.scenario.task.flip_fraction, rng))
        return out

    @cached_property
    def flipped(self) -> torch.Tensor:
        """Which elements of x belong to flipped examples (x's order)."""
        return torch.from_numpy(np.concatenate([flipped for _, flipped in self.noisy_labels]))

    @cached_property
    def _validation(self) -> tuple[np.ndarray, np.ndarray]:
        """Every client's clean validation split, pooled."""
        images, labels = self._train
        pooled = np.concatenate([val for _, val in self.client_splits])
        return images[pooled], labels[pooled]

    @cached_property
    def _test(self) -> tuple[np.ndarray, np.ndarray]:
        return load_test_subset(self.scenario.task.test_subsample, self.scenario.seed, self.scenario.task.download)

    def features(self, images: np.ndarray, device: torch.device) -> torch.Tensor:
        """The classifier's inputs for uint8 images: normalised images (``backbone``) or, for the linear
        classifier, fixed random features: ``task.random_filters`` seeded Gaussian 3x3 filters of
        variance 1/27 (one over their fan-in) on the normalised images, ReLU, each filter's response
        averaged over 8x8 cells (16 cells). Why not pixels: the cleaning signal follows the classifier's
        quality. Measured on ``scenarios/hyper_cleaning/base.yaml``'s data, with y solved at x = 0:
        validation accuracy 0.43 on these features, 0.34 on 4x4-pooled pixels, and the first
        hypergradient's down-weighted examples are flipped ones with precision 0.60 and 0.51."""
        images = to_input(images, device)
        if self.scenario.task.classifier != "linear":
            return images
        return torch.cat([F.avg_pool2d(F.relu(F.conv2d(images[s:s + EVAL_BATCH], self.filters.to(device), padding=1)),
                                       FEATURE_POOL).flatten(1) for s in range(0, len(images), EVAL_BATCH)])

    def client_inputs(self, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs of the partition's training and validation splits (CPU), computed once per process."""
        if partition not in self._client_inputs:
            images, _ = self._train
            train, val = self.client_splits[partition]
            self._client_inputs[partition] = (self.features(images[train], torch.device("cpu")),
                                              self.features(images[val], torch.device("cpu")))
        return self._client_inputs[partition]

    def prepare(self) -> None:
        self.noisy_labels, self._validation, self._test  # noqa: B018 - loads and decodes both splits

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        """A mini-batch of the noisy training split per inner step, the whole split for g in the
        hypergradient, the clean validation split for f."""
        _, labels = self._train
        train, val = self.client_splits[partition]
        noisy, _ = self.noisy_labels[partition]
        inputs, val_inputs = (t.to(device) for t in self.client_inputs(partition))
        targets = torch.from_numpy(noisy).to(device)
        gen = seeded_generator(self.scenario.seed, iteration, partition)
        size = min(self.scenario.task.batch_size, len(train))

        def batch(positions: torch.Tensor) -> Examples:
            positions = positions.to(device)
            return Examples(inputs[positions], targets[positions], positions)

        lower_steps = [batch(torch.randperm(len(train), generator=gen)[:size]) for _ in range(steps)]
        lower = Examples(inputs, targets, torch.arange(len(train), device=device))
        upper = Examples(val_inputs, torch.from_numpy(labels[val]).to(device),
                         torch.zeros(0, dtype=torch.long, device=device))
        return ClientBatch(lower_steps=lower_steps, lower=lower, upper=upper,
                           examples=size * steps + len(train) + len(val))

    # ------------------------------------------------------------------ model and losses

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        torch.manual_seed(seed)
        y = init_module_tensors(self._classifier(), self.y_layout)
        return {WEIGHTS: torch.zeros(self.offsets[-1])}, y

    def lower_loss(self, x, y, batch: Examples):
        """Mean of sigmoid(x_j) CE_j over the batch, plus the ridge; ``x`` is the client's slice."""
        losses = F.cross_entropy(self.classifier(y, batch.inputs), batch.labels, reduction="none")
        loss = (torch.sigmoid(x[WEIGHTS][batch.positions]) * losses).mean()
        l2 = self.scenario.task.lower_l2
        return loss + 0.5 * l2 * sum(t.pow(2).sum() for t in y.values()) if l2 else loss

    def upper_loss(self, x, y, batch: Examples):
        return F.cross_entropy(self.classifier(y, batch.inputs), batch.labels)

    # ------------------------------------------------------------------ evaluation

    def _accuracy(self, y: Tensors, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
        y = {k: v.to(device) for k, v in y.items()}
        with torch.no_grad():
            predictions = torch.cat([self.classifier(y, self.features(images[s:s + EVAL_BATCH], device)).argmax(1).cpu()
                                     for s in range(0, len(labels), EVAL_BATCH)])
        return float((predictions.numpy() == labels).mean())

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device, split: str) -> dict[str, float]:
        """Accuracy on the pooled clean validation splits ("val") or the test set ("test"), and on
        both the cleaning scores of x."""
        if split not in ("val", "test"):
            raise ValueError(f"unknown split {split!r} (val or test)")
        data = self._validation if split == "val" else self._test
        return {f"{split}_accuracy": self._accuracy(y, *data, device),
                **cleaning_scores(x[WEIGHTS].cpu(), self.flipped)}
