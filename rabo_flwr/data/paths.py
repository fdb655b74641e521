"""Where data sets are read from and where their decoded arrays are cached.

The data dir may be shared and read-only (CI points it at a common folder), so anything
this package derives from it (decoded arrays) goes to a separate, per-user cache dir.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np

from ..files import atomic_write


class DataError(Exception):
    """A data set is missing, corrupt or unusable; the message says what was expected and where."""


def downloads_allowed(download: bool) -> bool:
    """``task.download`` unless ``RABO_OFFLINE=1`` (the offline switch) says otherwise."""
    return download and os.environ.get("RABO_OFFLINE", "").lower() not in ("1", "true", "yes")


def missing_data(dataset: str, expected: list[str], reason: str, one_of: bool = False) -> DataError:
    """The one message for data that is not there: where we looked, what we expected, what to type."""
    root = data_dir()
    return DataError(
        f"{dataset} not found in the data directory {root} ({reason}). Expected{' one of' if one_of else ''}: "
        f"{', '.join(str(root / e) for e in expected)}. If you have these files elsewhere, point the run at "
        f"the folder that holds them, e.g. `RABO_DATA_DIR=/path/to/data flwr run . --stream` "
        f"(set it before Flower's local SuperLink starts: stop a running one first). With network access and "
        f"RABO_OFFLINE unset, missing files are downloaded into {root}."
    )


def _user_cache_root() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "rabo_flwr"


def data_dir() -> Path:
    """Root of the raw archives: ``$RABO_DATA_DIR``, else ``$XDG_CACHE_HOME/rabo_flwr/data``."""
    env = os.environ.get("RABO_DATA_DIR")
    return Path(env).expanduser() if env else _user_cache_root() / "data"


def cache_dir() -> Path:
    """Root for decoded arrays: ``$RABO_CACHE_DIR``, else ``$XDG_CACHE_HOME/rabo_flwr/cache``."""
    env = os.environ.get("RABO_CACHE_DIR")
    return Path(env).expanduser() if env else _user_cache_root() / "cache"


def cache_file(name: str, *key_parts: object) -> Path:
    """Cache path for ``name`` whose file name changes whenever any key part changes.

    Callers put the source's identity (path, size, mtime) and the decoding parameters in
    the key, so an edited archive or another image size never reads a stale cache.
    """
    digest = hashlib.sha256(repr(key_parts).encode()).hexdigest()[:16]
    return cache_dir() / f"{name}-{digest}.npz"


def file_key(path: Path) -> tuple[str, int, int]:
    """Cheap identity of a file for cache keys: resolved path, size and mtime (ns)."""
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def load_cached(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays cached at ``path``, or None when absent or unreadable (then re-decode)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def save_cached(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz``, atomically.

    Uncompressed keeps the reload well under a second; atomic so that concurrent clients
    or an interrupted run never leave a half-written cache behind.
    """
    atomic_write(path, lambda f: np.savez(f, **arrays))
