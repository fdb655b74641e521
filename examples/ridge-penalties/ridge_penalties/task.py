"""A user's own bilevel task: per-feature ridge penalties of a linear model, tuned on validation data.

Lower level (each client i, its training split): g_i(x, w) = |A_i w - b_i|^2 / (2n) + sum_j exp(x_j) w_j^2 / 2,
the ridge fit of the weights w = y["w"] with penalties lambda_j = exp(x_j), x = x["log_penalty"].
Upper level (its validation split): f_i(w) = |V_i w - e_i|^2 / (2m). A test split, drawn like the
validation split, is read once for the reported number.

The data are built so that the federation's optimum is known exactly. Every client's design
has orthonormal columns scaled to A^T A / n = I (and V^T V / m = I), so the lower-level Hessian
I + diag(lambda) is the same everywhere and both levels decouple per feature. Along feature j,
the training targets project to c_ij = w_j (1 + rho_j) + delta_ij and the validation targets to
d_ij = w_j + eta_ij, where the client offsets delta, eta sum to zero over the clients: each
client alone would pick other penalties, but the federation's ridge solution is
w_j = mean_i c_ij / (1 + lambda_j), which fits the validation data exactly when
lambda_j = rho_j. The residuals outside the features' span set the loss floor, not the optimum.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from rabo_flwr.submodel import Layout
from rabo_flwr.tasks import BilevelTask, ClientBatch


@dataclass
class Options:
    """The task's options: the scenario's ``task.options`` (validated by rabo_flwr, with file and key)."""

    features: int = 6
    samples: int = 40  # training examples per client
    val_samples: int = 40  # validation examples per client
    test_samples: int = 40  # test examples per client
    noise: float = 0.5  # standard deviation of the residuals outside the features' span
    spread: float = 0.3  # how far each client's own data lie from the federation's

    def __post_init__(self):
        if self.features < 1:
            raise ValueError(f"features must be >= 1, got {self.features}")
        if min(self.samples, self.val_samples, self.test_samples) < self.features:
            raise ValueError(f"samples, val_samples and test_samples must be >= features ({self.features})")
        if self.noise < 0 or self.spread < 0:
            raise ValueError("noise and spread must be >= 0")


def orthonormal_design(rng: np.random.Generator, rows: int, columns: int) -> np.ndarray:
    """A rows x columns design with D^T D / rows = I."""
    q, _ = np.linalg.qr(rng.standard_normal((rows, columns)))
    return q * np.sqrt(rows)


def targets(rng: np.random.Generator, design: np.ndarray, projection: np.ndarray, noise: float) -> np.ndarray:
    """Targets t with design^T t / rows = projection, plus residual noise orthogonal to the design's columns."""
    rows = len(design)
    residual = noise * rng.standard_normal(rows)
    residual -= design @ (design.T @ residual) / rows
    return design @ projection + residual


def predict(design: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """design @ w as a matrix product, which torch's FLOP counter counts (a matrix-vector one it does not)."""
    return (design @ w.unsqueeze(1)).squeeze(1)


class RidgePenalties(BilevelTask):
    Options = Options

    def __init__(self, scenario):
        self.options: Options = scenario.task.options
        self.seed = scenario.seed
        self.num_partitions = scenario.clients.num
        features = self.options.features
        # no channel groups: both sides always travel whole (submodel masks are optional)
        self.x_layout = Layout(groups={}, dims={"log_penalty": (None,)})
        self.y_layout = Layout(groups={}, dims={"w": (None,)})
        self.main_metric, self.test_metric = "val_r2", "test_r2"
        self.true_weights = np.array([(-1) ** j * (1.5 + 0.5 * j / max(features - 1, 1)) for j in range(features)])

    def optimal_penalties(self) -> torch.Tensor:
        """The known optimum: lambda_j = rho_j, from 0.5 (feature 0) to 2 (the last one)."""
        features = self.options.features
        return torch.tensor([0.5 * 4 ** (j / max(features - 1, 1)) for j in range(features)], dtype=torch.float32)

    @cached_property
    def data(self) -> list[tuple[torch.Tensor, ...]]:
        """Per client: (A, b, V, e) as float32 tensors."""
        o, clients = self.options, self.num_partitions
        rng = np.random.default_rng(self.seed)
        rho = self.optimal_penalties().double().numpy()

        def offsets():  # zero-sum over the clients
            z = o.spread * rng.standard_normal((clients, o.features))
            return z - z.mean(0)

        delta, eta = offsets(), offsets()
        out = []
        for i in range(clients):
            a, v = orthonormal_design(rng, o.samples, o.features), orthonormal_design(rng, o.val_samples, o.features)
            b = targets(rng, a, self.true_weights * (1 + rho) + delta[i], o.noise)
            e = targets(rng, v, self.true_weights + eta[i], o.noise)
            out.append(tuple(torch.tensor(t, dtype=torch.float32) for t in (a, b, v, e)))
        return out

    @cached_property
    def test_data(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All clients' test split (T, t), drawn like their validation splits with offsets of its own."""
        o, clients = self.options, self.num_partitions
        rng = np.random.default_rng([self.seed, 1])
        z = o.spread * rng.standard_normal((clients, o.features))
        designs = [orthonormal_design(rng, o.test_samples, o.features) for _ in range(clients)]
        t = [targets(rng, d, self.true_weights + offset, o.noise) for d, offset in zip(designs, z - z.mean(0))]
        return (torch.tensor(np.concatenate(designs), dtype=torch.float32),
                torch.tensor(np.concatenate(t), dtype=torch.float32))

    def init_tensors(self, seed: int):
        features = self.options.features
        return {"log_penalty": torch.zeros(features)}, {"w": torch.zeros(features)}

    def client_batch(self, partition, iteration, device, steps):
        a, b, v, e = (t.to(device) for t in self.data[partition])
        return ClientBatch(lower_steps=[(a, b)] * steps, lower=(a, b), upper=(v, e), examples=len(b) + len(e))

    def lower_loss(self, x, y, batch):
        a, b = batch
        w = y["w"]
        return (predict(a, w) - b).pow(2).mean() / 2 + (x["log_penalty"].exp() * w.pow(2)).sum() / 2

    def upper_loss(self, x, y, batch):
        v, e = batch
        return (predict(v, y["w"]) - e).pow(2).mean() / 2

    def evaluate(self, x, y, device, split):
        """Loss and R^2 over all clients' ``split`` ("val": validation, the main metric; "test")."""
        v, e = ((torch.cat([d[2] for d in self.data]), torch.cat([d[3] for d in self.data])) if split == "val"
                else self.test_data)
        residual = predict(v, y["w"].cpu()) - e
        return {f"{split}_loss": float(residual.pow(2).mean() / 2),
                f"{split}_r2": float(1 - residual.pow(2).sum() / (e - e.mean()).pow(2).sum())}

    def evaluate_client(self, partition, x, y, device):
        """Federated evaluation: the global weights on this client's own validation split."""
        _, _, v, e = self.data[partition]
        return {"val_loss": float(self.upper_loss(x, {"w": y["w"].cpu()}, (v, e))), "examples": float(len(e))}
