"""Tensors in and out of Flower's ``ArrayRecord``, without Flower's per-array ``np.save``/``np.load``.

An :class:`~flwr.app.Array` of stype ``numpy.ndarray`` holds an ``.npy`` file: a header (magic,
dtype, order, shape) and the raw bytes. Flower writes and reads each one through a ``BytesIO``
with ``np.save``/``np.load``, which for the many small tensors of a submodel costs more than the
bytes. Here the header is built once per dtype and shape and the bytes are joined to it, which
gives the same ``.npy`` bytes (any Flower peer reads them with ``Array.numpy()``); reading
checks the header against the one this dtype and shape must have and copies the bytes after
it, and falls back to ``Array.numpy()`` for anything else (another version, Fortran order).
"""

from __future__ import annotations

import io
from functools import lru_cache
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY


@lru_cache(maxsize=4096)
def npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header ``np.save`` writes for a C-ordered array of this dtype and shape."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def to_array(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower ``Array`` (the bytes ``Array(tensor)`` would hold)."""
    values = tensor.detach().cpu().contiguous().numpy()
    shape = tuple(values.shape)
    return Array(dtype=str(values.dtype), shape=shape, stype=NUMPY_STYPE,
                 data=b"".join((npy_header(values.dtype.str, shape), values.reshape(-1).view(np.uint8))))


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors as an ``ArrayRecord``."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        record[name] = to_array(tensor)
    return record


def from_array(array: Array) -> torch.Tensor:
    """A Flower ``Array`` as a tensor that owns its memory."""
    if array.stype == NUMPY_STYPE:
        try:
            dtype, shape = np.dtype(array.dtype), tuple(array.shape)
        except TypeError:
            dtype = None
        if dtype is not None and dtype.kind in "biuf":
            header = npy_header(dtype.str, shape)
            if array.data.startswith(header) and len(array.data) == len(header) + dtype.itemsize * int(np.prod(shape)):
                return torch.from_numpy(np.frombuffer(array.data, dtype, offset=len(header)).reshape(shape).copy())
    return torch.from_numpy(array.numpy())


def from_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """An ``ArrayRecord`` as named tensors."""
    return {name: from_array(array) for name, array in record.items()}
