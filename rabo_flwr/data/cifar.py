"""CIFAR-10 as uint8 arrays, plus the long-tailed subset and per-client train/val splits.

Sources, in order: torchvision's binary ``cifar-10-batches-py`` in the data dir; the JPEG
export ``cifar10/cifar10-jpg.tar.gz`` (streamed, never extracted, since the data dir may be
read-only); an extracted ``cifar10/<split>/<class>/*.jpg`` folder; else a torchvision download
when allowed. JPEG sources are decoded once and cached per split in the cache dir.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from .paths import DataError, cache_file, data_dir, downloads_allowed, file_key, load_cached, missing_data, save_cached

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_BINARY_DIR = "cifar-10-batches-py"
_ARCHIVE = Path("cifar10") / "cifar10-jpg.tar.gz"
_CACHE_VERSION = 1
_IMAGE_RE = r"([^/]+)/([^/]+\.(?:jpe?g|png))"


def CIFAR10(root: str, train: bool, download: bool):  # noqa: N802 - stands for torchvision's class
    """torchvision's CIFAR10 data set, imported when used (importing torchvision takes seconds)."""
    from torchvision.datasets import CIFAR10 as dataset

    return dataset(root, train=train, download=download)


def _from_binary(root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, list[str]]:
    try:
        ds = CIFAR10(str(root), train=train, download=False)
    except RuntimeError as e:
        raise DataError(
            f"corrupt CIFAR-10 batches in {root / _BINARY_DIR}: expected torchvision's "
            f"cifar-10-python layout with matching md5 ({e})"
        ) from e
    return ds.data, np.asarray(ds.targets, dtype=np.int64), list(ds.classes)


def _download_binary(root: Path) -> None:
    """torchvision download into a temp dir in ``root``, moved into place only when complete."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".cifar10-download-", dir=root))
    try:
        CIFAR10(str(tmp), train=True, download=True)
        os.replace(tmp / _BINARY_DIR, root / _BINARY_DIR)
    except Exception as e:
        raise DataError(f"could not download CIFAR-10 into {root / _BINARY_DIR}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _decode_items(items: list[tuple[int, str, bytes]], source: Path) -> dict[str, np.ndarray]:
    """(class, name, encoded bytes) -> images uint8 [N,32,32,3], labels; sorted by class, name."""
    if not items:
        raise DataError(f"no images in {source}: expected <split>/<class>/*.jpg")
    items.sort(key=lambda t: (t[0], t[1]))
    images = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
    for i, (_, name, data) in enumerate(items):
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.asarray(im.convert("RGB"))
        except (OSError, ValueError) as e:
            raise DataError(f"corrupt image {name} in {source} ({e})") from e
        if arr.shape != (32, 32, 3):
            raise DataError(f"image {name} in {source} is {arr.shape}, expected 32x32 RGB")
        images[i] = arr
    return {"images": images, "labels": np.array([c for c, _, _ in items], dtype=np.int64)}


def _class_index(name: str, member: str, source: Path) -> int:
    try:
        return CIFAR10_CLASSES.index(name)
    except ValueError:
        raise DataError(
            f"unknown class folder {name!r} ({member}) in {source}: "
            f"expected one of {', '.join(CIFAR10_CLASSES)}"
        ) from None


def _read_tar(archive: Path, split: str) -> list[tuple[int, str, bytes]]:
    pattern = re.compile(rf"^(?:\./)?{split}/{_IMAGE_RE}$", re.IGNORECASE)
    items = []
    try:
        with tarfile.open(archive, "r:*") as tf:
            for member in tf:
                if member.isfile() and (m := pattern.match(member.name)):
                    cls = _class_index(m.group(1), member.name, archive)
                    items.append((cls, member.name, tf.extractfile(member).read()))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(
            f"corrupt archive {archive}: expected a tar.gz holding {split}/<class>/*.jpg ({e})"
        ) from e
    return items


def _folder_files(folder: Path) -> list[Path]:
    pattern = re.compile(_IMAGE_RE, re.IGNORECASE)
    return sorted(
        p
        for p in folder.glob("*/*")
        if p.is_file() and pattern.fullmatch(f"{p.parent.name}/{p.name}")
    )


def _folder_key(files: list[Path]) -> str:
    """Digest of every file's path, size and mtime: any added, removed or edited image counts."""
    h = hashlib.sha256()
    for p in files:
        h.update(repr(file_key(p)).encode())
    return h.hexdigest()


def _read_folder(folder: Path, files: list[Path]) -> list[tuple[int, str, bytes]]:
    return [(_class_index(p.parent.name, str(p), folder), str(p), p.read_bytes()) for p in files]


def load_cifar10(train: bool, download: bool = True) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Images uint8 [N,32,32,3], labels int64 [N], class names in the standard CIFAR-10 order."""
    root = data_dir()
    split = "train" if train else "test"
    if (root / _BINARY_DIR).is_dir():
        return _from_binary(root, train)
    archive, folder = root / _ARCHIVE, root / "cifar10" / split
    if archive.is_file():
        key, read = file_key(archive), lambda: _read_tar(archive, split)
        source = archive
    elif folder.is_dir():
        files = _folder_files(folder)
        key, read = _folder_key(files), lambda: _read_folder(folder, files)
        source = folder
    else:
        expected = [f"{_BINARY_DIR}/", str(_ARCHIVE), "cifar10/<split>/<class>/*.jpg"]
        if not downloads_allowed(download):
            raise missing_data("CIFAR-10", expected, "downloads are off: RABO_OFFLINE=1 or task.download=false", one_of=True)
        try:
            _download_binary(root)
        except DataError as err:
            raise missing_data("CIFAR-10", expected, str(err), one_of=True) from err
        return _from_binary(root, train)
    cache = cache_file(f"cifar10-{split}", key, _CACHE_VERSION)
    arrays = load_cached(cache)
    if arrays is None:
        arrays = _decode_items(read(), source)
        save_cached(cache, arrays)
    return arrays["images"], arrays["labels"], list(CIFAR10_CLASSES)


def long_tail_indices(
    labels: np.ndarray, imbalance_ratio: float = 100, num_classes: int = 10, seed: int = 0
) -> np.ndarray:
    """Seeded long-tailed subset (Cao et al., 2019): class c keeps n_c = floor(n_0 * mu**c),
    mu = (1/imbalance_ratio)**(1/(C-1)), n_0 = the largest class count.

    Rounding: floor of the float64 product plus 1e-6, so that values that are integers in
    exact arithmetic (n_0/imbalance_ratio for the last class, e.g. 5000/100 = 50) are not
    lost to rounding error. Returns the sorted selected indices (int64).
    """
    labels = np.asarray(labels)
    if imbalance_ratio < 1 or num_classes < 2:
        raise ValueError("need imbalance_ratio >= 1 and num_classes >= 2")
    counts = np.bincount(labels, minlength=num_classes)[:num_classes]
    mu = (1.0 / imbalance_ratio) ** (1.0 / (num_classes - 1))
    n0 = int(counts.max())
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        n_c = int(np.floor(n0 * mu**c + 1e-6))
        pool = np.flatnonzero(labels == c)
        if len(pool) < n_c:
            raise ValueError(f"class {c} has {len(pool)} samples, the long tail needs {n_c}")
        chosen.append(rng.choice(pool, size=n_c, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def subsample_per_class(indices: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded fraction of each class's indices, at least one per class; sorted."""
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(len(CIFAR10_CLASSES)):
        members = indices[labels[indices] == c]
        count = max(1, int(round(fraction * len(members))))
        keep.append(np.sort(rng.choice(members, size=count, replace=False)))
    return np.sort(np.concatenate(keep))


def load_test_subset(fraction: float, seed: int, download: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The test set's images and labels, a seeded per-class ``fraction`` of them, shuffled: the archive
    is ordered by class, and shuffled, every evaluation batch's (BatchNorm) statistics span the classes."""
    images, labels, _ = load_cifar10(train=False, download=download)
    keep = np.arange(len(labels))
    if fraction < 1.0:
        keep = subsample_per_class(keep, labels, fraction, seed)
    keep = np.random.default_rng(seed).permutation(keep)
    return images[keep], labels[keep]


def split_clients(
    indices: np.ndarray, labels: np.ndarray, num_clients: int, seed: int, val_fraction: float = 0.2
) -> list[tuple[np.ndarray, np.ndarray]]:
    """IID seeded shards of ``indices`` (sizes differ by at most one), each split into
    (train_idx, val_idx) for the lower and upper level.

    The split is stratified by label within each client: of a client's n images of a class,
    floor(val_fraction * n + 0.5) go to validation, so validation mirrors the client's own
    long-tailed label distribution. Returned index arrays are sorted.
    """
    indices, labels = np.asarray(indices, dtype=np.int64), np.asarray(labels)
    if not 1 <= num_clients <= len(indices):
        raise ValueError(f"num_clients must be in 1..{len(indices)}, got {num_clients}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    out = []
    for shard in np.array_split(rng.permutation(indices), num_clients):
        shard_labels = labels[shard]
        val = np.concatenate(
            [
                members[: int(np.floor(val_fraction * len(members) + 0.5))]
                for members in (shard[shard_labels == c] for c in np.unique(shard_labels))
            ]
        )
        out.append((np.setdiff1d(shard, val), np.sort(val)))
    return out
