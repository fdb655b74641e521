"""Loss-function tuning on long-tail CIFAR-10: x = VS-loss hyperparameters, y = the classifier.

Lower level g: the VS loss (Kini et al., NeurIPS 2021) of the classifier on a fresh training
mini-batch per step: logits' = Delta * z + l, loss = mean_i w[y_i] * CE(logits'_i, y_i), plus the
ridge ``task.lower_l2``. x is parametrised so that every value is valid:

    w = C * softmax(w_logits)   (positive, mean 1: weights shift emphasis between classes; their
                                 overall scale would only rescale the lower level's step size)
    l = l                       (additive logit offsets, any real value)
    Delta = exp(log_Delta)      (positive multiplicative logit scales)

x = 0 is plain cross-entropy. ``task.x_init: vs-recommended`` starts from the values the VS
loss's authors recommend (their released code, github.com/orparask/VS-Loss: Delta_c =
(n_c / n_max)^gamma with gamma = 0.3, l_c = tau * log(prior_c) with tau = 1, w = 1).

Upper level f (``task.upper_objective``), on the client's validation split:

- ``balanced-ce`` (default): the mean over classes of each class's cross-entropy of the plain
  logits, i.e. a loss whose minimiser is the balanced-accuracy classifier the task is judged by
  (AutoBalance, Li et al., NeurIPS 2021, tunes the same VS parameters against such a
  class-weighted validation loss). f does not read x, so the whole hypergradient is the implicit
  term through y*(x).
- ``vs``: the paper's printed objective, the VS loss with the same x on the (long-tailed)
  validation split. It reads x directly, and its direct gradient favours what lowers the
  validation VS loss itself. The loss weights each example's loss by w of its class, so a class
  contributes in proportion to its count of validation examples, and the weight w (its sum is
  fixed) moves to the classes with the fewest: measured at CPU scale, w reached 6.41 on the rarest
  class and 0.03 on the most frequent within 40 iterations, and balanced test accuracy fell to
  24.46% (45.00% with ``balanced-ce``; the README's loss-tuning table). That does not serve
  balanced test accuracy, which is why it is not the default.

x is never pruned; y (the classifier) is. Validation (early stopping, the model kept, step sizes)
is the clients' validation splits pooled: training data, long-tailed, scored by balanced
accuracy; the balanced test set is read only for the reported numbers.
"""

from __future__ import annotations

import math
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F

from ..data.cifar import load_cifar10, long_tail_indices, split_clients, subsample_per_class, load_test_subset
from ..models import Classifier
from ..models.backbones import build_backbone
from ..scenario import Scenario
from ..submodel import Layout
from .base import BilevelTask, ClientBatch, FunctionalModule, Tensors, init_module_tensors
from .fewshot import seeded_generator

NUM_CLASSES = 10
HEAD_CLASSES, TAIL_CLASSES = range(0, 5), range(5, 10)  # most and least frequent halves of the long tail
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
EVAL_BATCH = 500  # BatchNorm uses batch statistics: evaluate in large batches
X_NAMES = ("w_logits", "l", "log_Delta")


def hyperparameters(x: Tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, l, Delta) from x: w = C softmax(w_logits), l, Delta = exp(log_Delta)."""
    w = x["w_logits"].softmax(0) * x["w_logits"].numel()
    return w, x["l"], x["log_Delta"].exp()


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
        self.x_layout = Layout(groups={}, dims={name: (None,) for name in X_NAMES})
        self.y_layout = self.classifier.module.layout()
        self.num_partitions = scenario.clients.num
        self.main_metric = "val_balanced_accuracy"
        self.test_metric = "balanced_accuracy"

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
            indices = subsample_per_class(indices, labels, cfg.train_subsample, seed)
        return indices

    @cached_property
    def class_counts(self) -> np.ndarray:
        """Training images per class in the long-tail set (what the VS recommendations are built from)."""
        _, labels = self._train
        return np.bincount(labels[self.long_tail], minlength=NUM_CLASSES)

    @cached_property
    def client_splits(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(train, validation) indices per client: train fits y (lower), validation tunes x (upper)."""
        _, labels = self._train
        cfg = self.scenario.task
        return split_clients(self.long_tail, labels, self.scenario.clients.num, self.scenario.seed, cfg.val_fraction)

    @cached_property
    def _test(self) -> tuple[np.ndarray, np.ndarray]:
        return load_test_subset(self.scenario.task.test_subsample, self.scenario.seed, self.scenario.task.download)

    def prepare(self) -> None:
        self.client_splits, self._validation, self._test  # noqa: B018 - loads and decodes both splits

    def client_batch(self, partition: int, iteration: int, device: torch.device, steps: int) -> ClientBatch:
        """A fresh augmented training mini-batch per inner step and one more for g in the
        hypergradient; f sees the client's whole validation split."""
        images, labels = self._train
        train, val = self.client_splits[partition]
        gen = seeded_generator(self.scenario.seed, iteration, partition)
        size = min(self.scenario.task.batch_size, len(train))

        def train_batch():
            idx = train[torch.randperm(len(train), generator=gen)[:size].numpy()]
            return augment(to_input(images[idx], device), gen), torch.from_numpy(labels[idx]).to(device)

        lower_steps = [train_batch() for _ in range(steps)]
        lower = train_batch()
        upper = (to_input(images[val], device), torch.from_numpy(labels[val]).to(device))
        return ClientBatch(lower_steps=lower_steps, lower=lower, upper=upper, examples=size * (steps + 1) + len(val))

    # ------------------------------------------------------------------ model and losses

    def init_tensors(self, seed: int) -> tuple[Tensors, Tensors]:
        torch.manual_seed(seed)
        y = init_module_tensors(self._classifier(), self.y_layout)
        x = {name: torch.zeros(NUM_CLASSES) for name in X_NAMES}
        if self.scenario.task.x_init == "vs-recommended":
            counts = torch.tensor(self.class_counts, dtype=torch.float32)
            x["l"] = self.scenario.task.vs_tau * torch.log(counts / counts.sum())
            x["log_Delta"] = self.scenario.task.vs_gamma * torch.log(counts / counts.max())
        return x, y

    def lower_loss(self, x, y, batch):
        images, labels = batch
        loss = vs_loss(self.classifier(y, images), labels, *hyperparameters(x))
        l2 = self.scenario.task.lower_l2
        return loss + 0.5 * l2 * sum(t.pow(2).sum() for t in y.values()) if l2 else loss

    def upper_loss(self, x, y, batch):
        images, labels = batch
        return self._upper_objective(x, self.classifier(y, images), labels)

    def _upper_objective(self, x, logits, labels):
        if self.scenario.task.upper_objective == "vs":
            return vs_loss(logits, labels, *hyperparameters(x))
        return balanced_cross_entropy(logits, labels)

    # ------------------------------------------------------------------ evaluation

    @cached_property
    def _validation(self) -> tuple[np.ndarray, np.ndarray]:
        """Every client's validation split, pooled."""
        images, labels = self._train
        pooled = np.concatenate([val for _, val in self.client_splits])
        return images[pooled], labels[pooled]

    def _per_class_accuracy(self, y: Tensors, images: np.ndarray, labels: np.ndarray, device: torch.device):
        """Whether each image is classified right, and each class's accuracy (nan for a class absent)."""
        y = {k: v.to(device) for k, v in y.items()}
        predictions = []
        with torch.no_grad():
            for start in range(0, len(labels), EVAL_BATCH):
                logits = self.classifier(y, to_input(images[start:start + EVAL_BATCH], device))
                predictions.append(logits.argmax(1).cpu())
        correct = torch.cat(predictions).numpy() == labels
        return correct, [float(correct[labels == c].mean()) if (labels == c).any() else math.nan for c in range(NUM_CLASSES)]

    def evaluate(self, x: Tensors, y: Tensors, device: torch.device, split: str) -> dict:
        """Validation: balanced accuracy on the pooled validation splits. Test: accuracy, balanced and
        per-class accuracy on the balanced test set, and the hyperparameters."""
        if split == "val":
            correct, per_class = self._per_class_accuracy(y, *self._validation, device)
            return {"val_accuracy": float(correct.mean()), "val_balanced_accuracy": float(np.nanmean(per_class))}
        if split != "test":
            raise ValueError(f"unknown split {split!r} (val or test)")
        correct, per_class = self._per_class_accuracy(y, *self._test, device)
        w, l, delta = (t.tolist() for t in hyperparameters({k: v.cpu() for k, v in x.items()}))
        return {"test_accuracy": float(correct.mean()), "balanced_accuracy": float(np.mean(per_class)),
                "head_accuracy": float(np.mean([per_class[c] for c in HEAD_CLASSES])),
                "tail_accuracy": float(np.mean([per_class[c] for c in TAIL_CLASSES])),
                "per_class_accuracy": per_class, "w": w, "l": l, "Delta": delta}

    def evaluate_client(self, partition: int, x: Tensors, y: Tensors, device: torch.device) -> dict[str, float]:
        """Accuracy and the upper-level loss f of the global model on the partition's validation split."""
        images, labels = self._train
        _, val = self.client_splits[partition]
        with torch.no_grad():
            logits = torch.cat([self.classifier(y, to_input(images[val[s:s + EVAL_BATCH]], device))
                                for s in range(0, len(val), EVAL_BATCH)])
            targets = torch.from_numpy(labels[val]).to(device)
            loss = self._upper_objective(x, logits, targets)
        return {"val_accuracy": float((logits.argmax(1) == targets).float().mean()), "val_loss": float(loss),
                "examples": float(len(val))}

