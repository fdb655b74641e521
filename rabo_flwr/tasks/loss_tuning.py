"""Loss-function tuning on long-tail CIFAR-10: x = VS-loss hyperparameters, y = the classifier.

Lower level g: the VS loss (Kini et al., 2021) of the classifier on a client's training batch,
with per-class weights w, additive logit offsets l and multiplicative logit scales Delta:
logits' = Delta * z + l, loss = mean_i w[y_i] * CE(logits'_i, y_i). Averaging over the batch
(not over the weights) keeps w's scale meaningful, and at w = 1, l = 0, Delta = 1 the loss is
plain cross-entropy. Upper level f: class-balanced cross-entropy of the plain logits on the
client's validation batch, so tail classes count as much as head classes; f depends on x only
through y*(x), so the whole hypergradient is the implicit term. x is never pruned.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cifar import load_cifar10, long_tail_indices, split_clients
from ..models import Classifier
from ..models.backbones import build_backbone
from ..scenario import Scenario
from ..submodel import Layout
from .base import BilevelTask, ClientBatch, FunctionalModule, Tensors, init_module_tensors
from .fewshot import seeded_generator

NUM_CLASSES = 10
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
EVAL_BATCH = 500  # BatchNorm uses batch statistics: evaluate in large batches


def vs_loss(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor, l: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Vector-scaling loss; equals cross-entropy at w = 1, l = 0, Delta = 1."""
    adjusted = logits * delta + l
    return (w[labels] * F.cross_entropy(adjusted, labels, reduction="none")).mean()


def balanced_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present of each class's mean cross-entropy."""
    losses = F.cross_entropy(logits, labels, reduction="none")
    per_class = torch.zeros(NUM_CLASSES, dtype=losses.dtype, device=losses.device).index_add(0, labels, losses)
    counts = torch.bincount(labels, minlength=NUM_CLASSES).to(losses.dtype)
    present = counts > 0
    return (per_class[present] / counts[present]).mean()


def to_input(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC -> normalised float NCHW."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div(255)
    return (x - MEAN.to(device)) / STD.to(device)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop with 4-pixel padding and horizontal flip, seeded (standard CIFAR augmentation)."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    return torch.where(flip.view(n, 1, 1, 1).to(out.device), out.flip(3), out)


class LossTuningTask(BilevelTask):
    def __init__(self, scenario: Scenario):
        self.scenario = scenario
        model = scenario.model
        self._classifier = lambda: Classifier(build_backbone(model.backbone, 3, model.width), NUM_CLASSES)
        self.classifier = FunctionalModule(self._classifier)
        self.x_layout = Layout(groups={}, dims={name: (None,) for name in ("w", "l", "Delta")})
        self.y_layout = self.classifier.module.layout()
        self.num_partitions = scenario.clients.num

    # ------------------------------------------------------------------ data

    @cached_property
    def _train(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = load_cifar10(train=True, download=self.scenario.task.download)
        return images, labels

    @cached_property
    def long_tail(self) -> np.ndarray:
        """Indices of the long-tail training set (n_c = n_0 * mu^c), optionally subsampled per class."""
        cfg, seed = self.scenario.task, self.scenario.seed
        _, labels = self._train
        indices = long_tail_indices(labels, cfg.imbalance_ratio, NUM_CLASSES, seed)
        if cfg.train_subsample < 1.0:
            indices = _subsample_per_class(indices, labels, cfg.train_subsample, seed)
        return indices

    @cached_property
    def client_splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, validation) indices per client: train fits y (lower), validation tunes x (upper)."""
        _, labels = self._train
        cfg = self.scenario.task
        return split_clients(self.long_tail, labels, self.scenario.clients.num, self.scenario.seed, cfg.val_fraction)

    @cached_property
    def _test(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels, _ = load_cifar10(train=False, download=self.scenario.task.download)
        keep = np.arange(len(labels))
        if self.scenario.task.test_subsample < 1.0:
            keep = _subsample_per_class(keep, labels, self.scenario.task.test_subsample, self.scenario.seed)
        # the archive is ordered by class; shuffled, every evaluation batch's statistics span the classes
        keep = np.random.default_rng(self.scenario.seed).permutation(keep)
        return images[keep], labels[keep]

    def prepare(self) -> None:
        self.client_splits, self._test  # noqa: B018 - loads and decodes both splits

    def client_batch(self, partition: int, iteration: int, device: torch.device) -> ClientBatch:
        images, labels = self._train
        train, val = self.client_splits[partition]
        gen = seeded_generator(self.scenario.seed, iteration, partition)
        size = self.scenario.task.batch_size
        pick = lambda idx: idx[torch.randint(len(idx), (min(size, len(idx)),), generator=gen).numpy()]
        lower_idx, upper_idx = pick(train), pick(val)
        lower = augment(to_input(images[lower_idx], device), gen)
        upper = to_input(images[upper_idx], device)
        as_labels = lambda idx: torch.from_numpy(labels[idx]).to(device)
        return ClientBatch(lower=(lower, as_labels(lower_idx)), upper=(upper, as_labels(upper_idx)),
                           examples=len(lower_idx) + len(upper_idx))

    # ------------------------------------------------------------------ model and losses

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        torch.manual_seed(seed)
        y = init_module_tensors(self._classifier(), self.y_layout)
        x = {"w": torch.ones(NUM_CLASSES), "l": torch.zeros(NUM_CLASSES), "Delta": torch.ones(NUM_CLASSES)}
        return x, y

    def lower_loss(self, x, y, batch):
        images, labels = batch
        loss = vs_loss(self.classifier(y, images), labels, x["w"], x["l"], x["Delta"])
        l2 = self.scenario.task.lower_l2
        return loss + 0.5 * l2 * sum(t.pow(2).sum() for t in y.values()) if l2 else loss

    def upper_loss(self, x, y, batch):
        images, labels = batch
        return balanced_cross_entropy(self.classifier(y, images), labels)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device) -> dict:
        """Accuracy, balanced accuracy and per-class accuracy on the balanced test set."""
        images, labels = self._test
        y = {k: v.to(device) for k, v in y.items()}
        predictions = []
        with torch.no_grad():
            for start in range(0, len(labels), EVAL_BATCH):
                logits = self.classifier(y, to_input(images[start:start + EVAL_BATCH], device))
                predictions.append(logits.argmax(1).cpu())
        correct = (torch.cat(predictions).numpy() == labels)
        per_class = [float(correct[labels == c].mean()) for c in range(NUM_CLASSES)]
        return {"test_accuracy": float(correct.mean()), "balanced_accuracy": float(np.mean(per_class)),
                "per_class_accuracy": per_class}


def _subsample_per_class(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded fraction of each class's indices, at least one per class."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(NUM_CLASSES):
        members = indices[labels[indices] == c]
        count = max(1, int(round(fraction * len(members))))
        keep.append(np.sort(rng.choice(members, size=count, replace=False)))
    return np.sort(np.concatenate(keep))
