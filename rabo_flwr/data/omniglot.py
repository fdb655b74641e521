"""Omniglot: background/evaluation splits, the official 20 one-shot runs, episodes, shards.

The zip archives are read in place (the data dir may be shared and read-only); images are
decoded once with PIL to ``image_size`` x ``image_size`` uint8 with stroke=255, background=0
(the PNGs are black strokes on white, inverted so that padding/zero means "no ink"), and
cached as one ``.npz`` per archive in :func:`~rabo_flwr.data.paths.cache_dir`.
"""

from __future__ import annotations

import io
import os
import posixpath
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .paths import DataError, cache_file, data_dir, downloads_allowed, file_key, load_cached, missing_data, save_cached

# Same URLs and md5 values as torchvision.datasets.Omniglot (md5 of the original zips).
_URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}
_RUNS_URL = (
    "https://github.com/brendenlake/omniglot/raw/master/python/one-shot-classification/all_runs.zip"
)
_RUNS_MD5 = "e8996daecdf12afeeb4a53a179f06b19"  # the original all_runs.zip (torchvision has no entry for it)
_ARCHIVES = ["omniglot/images_background.zip", "omniglot/images_evaluation.zip", "omniglot/all_runs.zip"]
# Bump when the decoded format changes so old caches are ignored.
_CACHE_VERSION = 1
# Errors that a truncated or damaged zip member / PNG raises while being read or decoded.
_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)


@dataclass
class OmniglotSplit:
    """One Omniglot split; ``labels`` index ``class_names`` (characters) within the split."""

    images: np.ndarray  # uint8 [N, H, W], stroke=255
    labels: np.ndarray  # int64 [N], 0..C-1
    alphabet_of_class: np.ndarray  # int64 [C], index into ``alphabets``
    alphabets: list[str]  # sorted alphabet names
    class_names: list[str]  # "Alphabet/characterNN", sorted


@dataclass
class OneShotRun:
    """One official 20-way one-shot run: ``test_labels[i]`` indexes the train image of test i."""

    name: str
    train_images: np.ndarray  # uint8 [20, H, W], one per class (class01..class20)
    test_images: np.ndarray  # uint8 [20, H, W] (item01..item20)
    test_labels: np.ndarray  # int64 [20]


@dataclass
class Episode:
    """A few-shot episode; ``*_y`` are episode labels 0..n_way-1, ``classes`` their class ids."""

    support_x: torch.Tensor  # float32 [n_way*k_shot, 1, H, W] in [0, 1]
    support_y: torch.Tensor  # int64 [n_way*k_shot]
    query_x: torch.Tensor  # float32 [Q, 1, H, W]
    query_y: torch.Tensor  # int64 [Q]
    classes: torch.Tensor  # int64 [n_way]


def download_url(url: str, root: str, filename: str, md5: str) -> None:
    """torchvision's downloader, imported when a download happens (importing torchvision takes
    seconds, which every fresh ClientApp process of a deployment would pay)."""
    from torchvision.datasets.utils import download_url as fetch

    fetch(url, root, filename=filename, md5=md5)


def _download(url: str, dest: Path, md5: str) -> None:
    """Download ``url`` to ``dest`` via a temp name in the same dir; no partial file survives."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.part-{os.getpid()}"
    try:
        download_url(url, str(dest.parent), filename=tmp.name, md5=md5)
        if not zipfile.is_zipfile(tmp):
            raise DataError(f"download of {url} is not a valid zip archive (meant for {dest})")
        os.replace(tmp, dest)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, DataError):
            raise
        raise DataError(f"could not download {url} to {dest}: {e}") from e


def _archive(name: str, url: str, md5: str, download: bool) -> Path:
    """Path of ``omniglot/<name>.zip`` in the data dir, downloaded (md5-checked) if missing and allowed."""
    path = data_dir() / "omniglot" / f"{name}.zip"
    if not path.is_file():
        if not downloads_allowed(download):
            raise missing_data(f"Omniglot ({name}.zip)", _ARCHIVES, "downloads are off: RABO_OFFLINE=1 or task.download=false")
        try:
            _download(url, path, md5)
        except DataError as err:
            raise missing_data(f"Omniglot ({name}.zip)", _ARCHIVES, str(err)) from err
    return path


def _open_zip(path: Path, expected: str) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"corrupt archive {path}: expected a zip holding {expected} ({e})") from e


def _decode(data: bytes, image_size: int) -> np.ndarray:
    """PNG bytes -> uint8 [S, S], LANCZOS-resized, inverted so strokes are 255."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)


def _decode_members(z: zipfile.ZipFile, path: Path, names: Sequence[str], image_size: int):
    out = np.empty((len(names), image_size, image_size), dtype=np.uint8)
    for i, name in enumerate(names):
        try:
            out[i] = _decode(z.read(name), image_size)
        except _CORRUPT as e:
            raise DataError(f"corrupt archive {path}: cannot decode PNG member {name} ({e})") from e
    return out


def _check_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")


def _decode_split(path: Path, split: str, image_size: int) -> dict[str, np.ndarray]:
    expected = f"{split}/<Alphabet>/characterNN/*.png"
    pattern = re.compile(rf"^{split}/([^/]+)/([^/]+)/[^/]+\.png$")
    with _open_zip(path, expected) as z:
        members = sorted(
            (m.group(1), m.group(2), info.filename)
            for info in z.infolist()
            if (m := pattern.match(info.filename))
        )
        if not members:
            raise DataError(f"no images in {path}: expected {expected}")
        images = _decode_members(z, path, [f for _, _, f in members], image_size)
    class_names = sorted({f"{a}/{c}" for a, c, _ in members})
    alphabets = sorted({a for a, _, _ in members})
    class_index = {n: i for i, n in enumerate(class_names)}
    alphabet_index = {a: i for i, a in enumerate(alphabets)}
    return {
        "images": images,
        "labels": np.array([class_index[f"{a}/{c}"] for a, c, _ in members], dtype=np.int64),
        "alphabet_of_class": np.array(
            [alphabet_index[n.split("/")[0]] for n in class_names], dtype=np.int64
        ),
        "alphabets": np.array(alphabets),
        "class_names": np.array(class_names),
    }


def load_omniglot(background: bool, image_size: int = 28, download: bool = True) -> OmniglotSplit:
    """Load the background (964 characters) or evaluation (659) split, decoding on first use."""
    _check_size(image_size)
    split = "images_background" if background else "images_evaluation"
    path = _archive(split, f"{_URL_PREFIX}/{split}.zip", _MD5[split], download)
    cache = cache_file(f"omniglot-{split}-{image_size}", file_key(path), image_size, _CACHE_VERSION)
    arrays = load_cached(cache)
    if arrays is None:
        arrays = _decode_split(path, split, image_size)
        save_cached(cache, arrays)
    return OmniglotSplit(
        images=arrays["images"],
        labels=arrays["labels"],
        alphabet_of_class=arrays["alphabet_of_class"],
        alphabets=arrays["alphabets"].tolist(),
        class_names=arrays["class_names"].tolist(),
    )


def _decode_runs(path: Path, image_size: int) -> dict[str, np.ndarray]:
    expected = "runNN/{training,test}/*.png and runNN/class_labels.txt"
    image_re = re.compile(r"^(run\d+)/(training|test)/([^/]+\.png)$")
    labels_re = re.compile(r"^(run\d+)/class_labels\.txt$")
    runs: dict[str, dict] = {}
    with _open_zip(path, expected) as z:
        for info in z.infolist():
            if m := image_re.match(info.filename):
                run = runs.setdefault(m.group(1), {"training": [], "test": [], "labels": None})
                run[m.group(2)].append(info.filename)
            elif m := labels_re.match(info.filename):
                run = runs.setdefault(m.group(1), {"training": [], "test": [], "labels": None})
                try:
                    run["labels"] = z.read(info.filename).decode()
                except _CORRUPT as e:
                    raise DataError(
                        f"corrupt archive {path}: cannot read {info.filename} ({e})"
                    ) from e
        if not runs:
            raise DataError(f"no one-shot runs in {path}: expected {expected}")
        train, test, labels = [], [], []
        for name in sorted(runs):
            run = runs[name]
            train_names, test_names = sorted(run["training"]), sorted(run["test"])
            if run["labels"] is None or not train_names or len(train_names) != len(test_names):
                raise DataError(
                    f"incomplete run {name} in {path}: expected as many training as test PNGs "
                    "and a class_labels.txt"
                )
            train_base = [posixpath.basename(n) for n in train_names]
            try:
                match = dict(
                    map(posixpath.basename, line.split())
                    for line in run["labels"].splitlines()
                    if line.strip()
                )
                labels.append([train_base.index(match[posixpath.basename(t)]) for t in test_names])
            except (KeyError, ValueError) as e:
                raise DataError(
                    f"{name}/class_labels.txt in {path} does not map every test PNG to a "
                    f"training PNG of the run ({e})"
                ) from e
            train.append(_decode_members(z, path, train_names, image_size))
            test.append(_decode_members(z, path, test_names, image_size))
    if len({t.shape for t in train + test}) != 1:
        raise DataError(f"runs in {path} differ in size: expected 20 training and 20 test PNGs")
    return {
        "names": np.array(sorted(runs)),
        "train_images": np.stack(train),
        "test_images": np.stack(test),
        "test_labels": np.array(labels, dtype=np.int64),
    }


def load_one_shot_runs(image_size: int = 28, download: bool = True) -> list[OneShotRun]:
    """The 20 official 20-way one-shot runs (Lake et al., 2015), decoded like the splits."""
    _check_size(image_size)
    path = _archive("all_runs", _RUNS_URL, _RUNS_MD5, download)
    cache = cache_file(f"omniglot-runs-{image_size}", file_key(path), image_size, _CACHE_VERSION)
    arrays = load_cached(cache)
    if arrays is None:
        arrays = _decode_runs(path, image_size)
        save_cached(cache, arrays)
    return [
        OneShotRun(str(name), tr, te, lab)
        for name, tr, te, lab in zip(
            arrays["names"], arrays["train_images"], arrays["test_images"], arrays["test_labels"]
        )
    ]


class EpisodeSampler:
    """Samples N-way K-shot episodes; the class -> image-indices table is built once here."""

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor):
        self.images = torch.as_tensor(np.asarray(images))
        labels = np.asarray(labels, dtype=np.int64)
        if len(labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(labels)} labels")
        order = np.argsort(labels, kind="stable")
        ids, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
        self._by_class = {
            int(c): torch.from_numpy(order[s : s + n]) for c, s, n in zip(ids, starts, counts)
        }

    def _as_input(self, idx: torch.Tensor) -> torch.Tensor:
        return self.images[idx].unsqueeze(1).to(torch.float32).div_(255.0)

    def sample(
        self,
        classes: Sequence[int] | np.ndarray | torch.Tensor,
        n_way: int,
        k_shot: int,
        n_query: int | None,
        generator: torch.Generator,
    ) -> Episode:
        """Draw ``n_way`` classes from ``classes``, then ``k_shot`` support and ``n_query`` query
        images of each (``None``: all the rest); all randomness comes from ``generator``."""
        pool = torch.as_tensor(np.asarray(classes), dtype=torch.int64).flatten()
        if not 1 <= n_way <= len(pool):
            raise ValueError(f"n_way={n_way} needs 1..{len(pool)} classes in the pool")
        if k_shot < 1 or (n_query is not None and n_query < 0):
            raise ValueError(f"need k_shot >= 1 and n_query >= 0 or None, got {k_shot}, {n_query}")
        chosen = pool[torch.randperm(len(pool), generator=generator)[:n_way]]
        support, query, query_y = [], [], []
        for way, c in enumerate(chosen.tolist()):
            idx = self._by_class.get(c)
            need = k_shot + (1 if n_query is None else n_query)
            if idx is None or len(idx) < need:
                have = 0 if idx is None else len(idx)
                raise ValueError(f"class {c} has {have} images, episode needs at least {need}")
            idx = idx[torch.randperm(len(idx), generator=generator)]
            support.append(idx[:k_shot])
            q = idx[k_shot:] if n_query is None else idx[k_shot : k_shot + n_query]
            query.append(q)
            query_y.append(torch.full((len(q),), way, dtype=torch.int64))
        return Episode(
            support_x=self._as_input(torch.cat(support)),
            support_y=torch.arange(n_way).repeat_interleave(k_shot),
            query_x=self._as_input(torch.cat(query)),
            query_y=torch.cat(query_y),
            classes=chosen,
        )


class ClassShards:
    """Which characters each of ``num_shards`` clients holds, worked out per shard when asked.

    ``by="alphabet"``: whole alphabets (non-IID clients: unseen scripts), permuted with ``seed``
    and dealt round-robin, so at most as many shards as alphabets. ``by="character"``: a seeded
    permutation of the characters cut into ``num_shards`` disjoint runs whose sizes differ by at
    most one; when that would leave a shard fewer than ``min_classes`` characters (an episode
    needs ``n_way``; Omniglot's 964 background characters give 5-way episodes to at most 192
    disjoint shards), shard s holds instead the ``min_classes`` characters from position
    ``s * num_classes // num_shards`` of the permutation on (cyclically), so shards overlap and
    each character is held by about ``num_shards * min_classes / num_classes`` clients (about 5
    for 1,000 clients of 5-way episodes). Memory is one permutation, whatever ``num_shards``;
    each shard's class ids come sorted.
    """

    def __init__(self, alphabet_of_class: np.ndarray, num_shards: int, seed: int, by: str = "character",
                 min_classes: int = 1):
        self.alphabet_of_class = np.asarray(alphabet_of_class, dtype=np.int64)
        self.num_shards, self.by = num_shards, by
        num_classes = len(self.alphabet_of_class)
        if num_shards < 1:
            raise ValueError(f"num_shards must be >= 1, got {num_shards}")
        rng = np.random.default_rng(seed)
        if by == "alphabet":
            alphabets = np.unique(self.alphabet_of_class)
            if num_shards > len(alphabets):
                raise DataError(
                    f"cannot give {num_shards} shards whole alphabets: the split has only "
                    f"{len(alphabets)} alphabets (use at most that many shards, or shard by character)"
                )
            self.order = rng.permutation(alphabets)
        elif by == "character":
            if not 1 <= min_classes <= num_classes:
                raise ValueError(f"min_classes must be in 1..{num_classes}, got {min_classes}")
            self.order = rng.permutation(num_classes)
            self.overlapping = num_classes // num_shards < min_classes
            self.min_classes = min_classes
        else:
            raise ValueError(f"by must be 'alphabet' or 'character', got {by!r}")

    def __len__(self) -> int:
        return self.num_shards

    def __getitem__(self, shard: int) -> np.ndarray:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} outside 0..{self.num_shards - 1}")
        if self.by == "alphabet":
            return np.flatnonzero(np.isin(self.alphabet_of_class, self.order[shard::self.num_shards]))
        num_classes = len(self.order)
        if self.overlapping:
            start = shard * num_classes // self.num_shards
            return np.sort(self.order[(start + np.arange(self.min_classes)) % num_classes])
        size, extra = divmod(num_classes, self.num_shards)  # np.array_split: the first `extra` get one more
        start = shard * size + min(shard, extra)
        return np.sort(self.order[start:start + size + (shard < extra)])


def hold_out_alphabets(alphabet_of_class: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training, validation) class ids: ``count`` whole alphabets, chosen with ``seed``, validate.

    Whole alphabets, like the test split: validation measures what the test measures, few-shot
    learning of unseen scripts, and no validation character is ever in a client's shard.
    """
    alphabet_of_class = np.asarray(alphabet_of_class, dtype=np.int64)
    alphabets = np.unique(alphabet_of_class)
    if not 1 <= count < len(alphabets):
        raise DataError(f"cannot hold out {count} of the split's {len(alphabets)} alphabets as validation")
    held = np.random.default_rng([seed, 1]).choice(alphabets, size=count, replace=False)
    validation = np.isin(alphabet_of_class, held)
    return np.flatnonzero(~validation), np.flatnonzero(validation)


def shard_classes_by_alphabet(
    alphabet_of_class: np.ndarray, num_shards: int, seed: int
) -> list[np.ndarray]:
    """Every shard of whole alphabets (:class:`ClassShards` with ``by="alphabet"``)."""
    shards = ClassShards(alphabet_of_class, num_shards, seed, by="alphabet")
    return [shards[s] for s in range(num_shards)]


def shard_classes(num_classes: int, num_shards: int, seed: int) -> list[np.ndarray]:
    """Class ids 0..num_classes-1 in ``num_shards`` disjoint seeded shards whose sizes differ by at
    most one (every class in exactly one shard; :class:`ClassShards` with ``by="character"``)."""
    if not 1 <= num_shards <= num_classes:
        raise ValueError(f"num_shards must be in 1..{num_classes}, got {num_shards}")
    shards = ClassShards(np.zeros(num_classes, dtype=np.int64), num_shards, seed, by="character")
    return [shards[s] for s in range(num_shards)]
