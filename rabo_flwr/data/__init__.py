"""Data layer: Omniglot and CIFAR-10 loaders, few-shot episodes and federated client splits.

Raw archives are read from :func:`data_dir` (``$RABO_DATA_DIR``); decoded arrays are cached
in :func:`cache_dir` (``$RABO_CACHE_DIR``), never next to the data, which may be read-only.
"""

from .cifar import CIFAR10_CLASSES, load_cifar10, long_tail_indices, split_clients, subsample_per_class, load_test_subset
from .omniglot import (
    Episode,
    EpisodeSampler,
    OmniglotSplit,
    OneShotRun,
    load_omniglot,
    load_one_shot_runs,
    shard_classes,
    shard_classes_by_alphabet,
)
from .paths import DataError, cache_dir, data_dir

__all__ = [
    "CIFAR10_CLASSES",
    "DataError",
    "Episode",
    "EpisodeSampler",
    "OmniglotSplit",
    "OneShotRun",
    "cache_dir",
    "data_dir",
    "load_cifar10",
    "load_omniglot",
    "load_one_shot_runs",
    "long_tail_indices",
    "shard_classes",
    "shard_classes_by_alphabet",
    "split_clients",
    "subsample_per_class",
    "load_test_subset",
]
