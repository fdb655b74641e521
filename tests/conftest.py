"""Shared test set-up: real data from ../shared/data, decoded arrays cached once per machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("RABO_DATA_DIR", str(REPO.parent / "shared" / "data"))
os.environ.setdefault("RABO_CACHE_DIR", str(REPO / ".cache" / "arrays"))
os.environ["RABO_OFFLINE"] = "1"  # tests never reach the network; download tests fake it and lift this switch


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ["RABO_DATA_DIR"])
