"""The few-shot evaluation (all episodes' batches in one backbone call, Conv4's fast arrangement)
gives the features and accuracies of a plain per-episode evaluation.

Real Omniglot evaluation episodes and the CPU-scale backbone (Conv4, width 64): its seeded
initialisation, the same with a third of the BatchNorm scales negated (the pooling reordering
treats those channels apart), and a backbone after a few training steps. The reference
evaluates each episode on its own, through the training path: the support set and the query
set are each one forward batch (BatchNorm with that batch's statistics), and a head is fitted
to that episode alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rabo_flwr.models.resnet12 import ResNet12
from rabo_flwr.runtime import cached_task
from rabo_flwr.scenario import load_scenario
from rabo_flwr.threads import part_threads

REPO = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
# 60 episodes of 95 queries: one query classified differently moves the mean by 0.018 points
CPU_SCALE = {"model.backbone": "conv4", "model.width": 64, "task.eval_episodes": 60}


@pytest.fixture(scope="module")
def setting():
    scenario = load_scenario(REPO / "scenarios" / "paper" / "table2" / "rabo.yaml", CPU_SCALE)
    return scenario, cached_task(scenario)


@pytest.fixture(scope="module")
def backbones(setting):
    """The fresh backbone, the same with negated scales, and a trained one."""
    scenario, task = setting
    fresh, _ = task.init_tensors(scenario.seed)
    return {"fresh": fresh, "negated scales": negated_scales(fresh), "trained": trained_backbone(task, scenario)}


def reference_accuracies(task, x, episodes, n_way: int) -> torch.Tensor:
    """Features one set at a time through the training path; then the heads (per episode, batched as before)."""
    with torch.no_grad():
        support = torch.stack([task.features(x, e.support_x) for e in episodes])
        query = torch.stack([task.features(x, e.query_x) for e in episodes])
    weight, bias = task._fit_heads(support, torch.stack([e.support_y for e in episodes]), n_way)
    logits = torch.einsum("end,ecd->enc", query, weight) + bias[:, None, :]
    return (logits.argmax(-1) == torch.stack([e.query_y for e in episodes])).float().mean(-1)


def trained_backbone(task, scenario, steps: int = 5):
    """x after a few SGD steps on the query loss of client episodes, through a fixed random head."""
    x, y = task.init_tensors(scenario.seed)
    torch.manual_seed(1)
    y = {k: 0.1 * torch.randn_like(v) for k, v in y.items()}
    x = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    for step in range(steps):
        (episode,) = task.client_episodes(0, step, CPU, 1)
        loss = task.upper_loss(x, y, (episode.query_x, episode.query_y))
        grads = torch.autograd.grad(loss, list(x.values()))
        with torch.no_grad():
            for t, g in zip(x.values(), grads):
                t -= 0.5 * g
    return {k: v.detach() for k, v in x.items()}


def negated_scales(x):
    """x with a seeded third of each BatchNorm's scales negated."""
    gen = torch.Generator().manual_seed(3)
    return {k: torch.where(torch.rand(v.shape, generator=gen) < 1 / 3, -v, v) if k.endswith("bn.weight") else v
            for k, v in x.items()}


def test_batched_backbone_equals_one_batch_at_a_time(setting, backbones):
    _, task = setting
    episodes = task._episodes("test")[:4]
    images = torch.stack([e.query_x for e in episodes])
    for name, x in backbones.items():
        assert any(bool((v < 0).any()) for k, v in x.items() if k.endswith("bn.weight")) == (name == "negated scales")
        with torch.no_grad():
            batched = task.backbone(x, images)
            one_by_one = torch.stack([task.backbone(x, e.query_x) for e in episodes])
            exact = torch.stack([task.backbone({k: v.double() for k, v in x.items()}, e.query_x.double())
                                 for e in episodes])
        assert batched.shape == one_by_one.shape == (4, 95, 64)
        assert float(one_by_one.abs().max()) > 1.0  # real activations, not a collapsed network
        # both float32 arrangements are within rounding of the double-precision function
        torch.testing.assert_close(batched.double(), exact, rtol=0, atol=5e-5, msg=name)
        torch.testing.assert_close(one_by_one.double(), exact, rtol=0, atol=5e-5, msg=name)


def test_batched_backbone_keeps_each_batch_statistics(setting):
    """An episode's features do not depend on which other episodes share the call."""
    scenario, task = setting
    x, _ = task.init_tensors(scenario.seed)
    episodes = task._episodes("test")[:3]
    with torch.no_grad():
        alone = task.backbone(x, episodes[0].query_x[None])[0]
        together = task.backbone(x, torch.stack([e.query_x for e in episodes]))[0]
        shifted = task.backbone(x, torch.stack([episodes[0].query_x, 1 - episodes[1].query_x]))[0]
    assert torch.equal(alone, together) and torch.equal(alone, shifted)


def test_resnet12_batches_apart():
    torch.manual_seed(0)
    model = ResNet12(in_channels=1, width=4)
    images = torch.rand(3, 6, 1, 28, 28)
    with torch.no_grad():
        batched = model(images)
        assert torch.equal(batched, torch.stack([model(b) for b in images]))
    assert batched.shape == (3, 6, 40)


def test_evaluation_matches_per_episode_reference(setting, backbones):
    scenario, task = setting
    episodes = task._episodes("test")
    n_way = scenario.task.n_way
    for name, x in backbones.items():
        reference = reference_accuracies(task, x, episodes, n_way)
        accuracies = task._episode_accuracies(x, episodes, n_way, CPU)
        assert accuracies.shape == reference.shape == (60,)
        assert 0.3 < float(reference.mean()) < 1.0, name  # a real classifier, not chance (0.2) nor degenerate
        assert abs(float(accuracies.mean() - reference.mean())) <= 0.0005, name  # 0.05 points
        assert int((accuracies != reference).sum()) <= 2, name  # at most a query or two on the edge


def test_first_block_patch_products_match_a_double_precision_conv(setting, backbones):
    """Conv4's first block on real query sets (folded 8 images at a time, a set of 95 is not a multiple):
    the pooled conv output and the BatchNorm statistics from the patches' sums and products, against the
    plain conv, max-pooling and statistics in double precision."""
    from rabo_flwr.models.conv4 import PATCH_CHUNK, _pooled_patch_conv

    _, task = setting
    for episode in task._episodes("test")[:3]:
        images = episode.query_x
        assert images.shape[0] % PATCH_CHUNK
        for x in backbones.values():
            weight = x["blocks.0.0.conv.weight"]
            conv = torch.nn.Conv2d(1, weight.shape[0], 3, padding=1, bias=False)  # its kernel size and padding
            pooled, mean, var = _pooled_patch_conv(images, weight.flatten(1), conv)
            full = torch.nn.functional.conv2d(images.double(), weight.double(), None, 1, 1)
            torch.testing.assert_close(pooled.double(), torch.nn.functional.max_pool2d(full, 2), rtol=0, atol=2e-6)
            torch.testing.assert_close(mean.double(), full.mean((0, 2, 3)), rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(var.double(), full.var((0, 2, 3), correction=0), rtol=1e-6, atol=1e-9)


def test_evaluation_on_several_threads_gives_the_bits_of_one(setting, backbones):
    """The episodes split over 2 or 3 threads (uneven parts: 60 episodes into 3, and 7 into 3) give
    every episode's accuracy and the metrics bit for bit as on one thread, and leave torch's thread
    count as it was."""
    scenario, task = setting
    episodes, n_way = task._episodes("test"), scenario.task.n_way
    before = torch.get_num_threads()
    for name, x in backbones.items():
        one = task._episode_accuracies(x, episodes, n_way, CPU)
        metrics = task.evaluate(x, {}, CPU, "test")
        for threads in (2, 3):
            with part_threads(threads):
                assert torch.equal(task._episode_accuracies(x, episodes, n_way, CPU), one), (name, threads)
                assert torch.equal(task._episode_accuracies(x, episodes[:7], n_way, CPU), one[:7]), (name, threads)
                assert task.evaluate(x, {}, CPU, "test") == metrics, (name, threads)
    assert torch.get_num_threads() == before

