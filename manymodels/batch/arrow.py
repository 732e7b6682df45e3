"""Arrow <-> numpy conversions that never import pandas.

``pa.array(...)`` and ``Array.to_numpy()`` ask pyarrow's pandas shim whether their
argument is a pandas object, and that imports pandas (0.18 s here) on first use: in a
batch run that is more than scoring a million rows. Fixed-width columns are moved
through their buffers instead, which is also zero-copy for the common single chunk.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

__all__ = ["array_of", "dictionary_of", "numpy_of", "string_array", "valid_mask"]

_NUMPY_TYPES: dict[pa.DataType, np.dtype] = {
    pa.int8(): np.dtype(np.int8), pa.int16(): np.dtype(np.int16),
    pa.int32(): np.dtype(np.int32), pa.int64(): np.dtype(np.int64),
    pa.uint8(): np.dtype(np.uint8), pa.uint16(): np.dtype(np.uint16),
    pa.uint32(): np.dtype(np.uint32), pa.uint64(): np.dtype(np.uint64),
    pa.float32(): np.dtype(np.float32), pa.float64(): np.dtype(np.float64),
}
_ARROW_TYPES: dict[np.dtype, pa.DataType] = {v: k for k, v in _NUMPY_TYPES.items()}


def _chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.Array]:
    return list(column.chunks) if isinstance(column, pa.ChunkedArray) else [column]


def _bits(buffer: pa.Buffer, offset: int, length: int) -> np.ndarray:
    raw = np.frombuffer(buffer, dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[offset:offset + length].astype(bool)


def _chunk_numpy(chunk: pa.Array) -> np.ndarray:
    """Values of one fixed-width chunk; null slots hold whatever the buffer holds."""
    kind = chunk.type
    if pa.types.is_boolean(kind):
        return _bits(chunk.buffers()[1], chunk.offset, len(chunk))
    dtype = _NUMPY_TYPES.get(kind)
    if dtype is None:
        raise TypeError(f"no buffer conversion for Arrow type {kind}")
    if len(chunk) == 0:
        return np.empty(0, dtype=dtype)
    return np.frombuffer(chunk.buffers()[1], dtype=dtype, count=len(chunk),
                         offset=chunk.offset * dtype.itemsize)


def valid_mask(column: pa.Array | pa.ChunkedArray) -> np.ndarray | None:
    """True where a value is present; ``None`` when nothing is null."""
    if column.null_count == 0:
        return None
    parts = []
    for chunk in _chunks(column):
        if chunk.null_count == 0:
            parts.append(np.ones(len(chunk), dtype=bool))
        elif pa.types.is_null(chunk.type):
            parts.append(np.zeros(len(chunk), dtype=bool))
        else:
            parts.append(_bits(chunk.buffers()[0], chunk.offset, len(chunk)))
    return np.concatenate(parts)


def numpy_of(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A fixed-width (integer, float, bool) column as one numpy array.

    Zero-copy (read-only) for a single chunk; null slots are unspecified, see
    :func:`valid_mask`.
    """
    parts = [_chunk_numpy(c) for c in _chunks(column)]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        dtype = _NUMPY_TYPES.get(column.type, np.dtype(np.float64))
        return np.empty(0, dtype=dtype)
    return np.concatenate(parts)


def array_of(values: np.ndarray) -> pa.Array:
    """A 1-D numeric or bool numpy array as an Arrow array without nulls (zero-copy)."""
    values = np.ascontiguousarray(values)
    if values.dtype == bool:
        packed = np.packbits(values, bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(packed)])
    kind = _ARROW_TYPES.get(values.dtype)
    if kind is None:
        raise TypeError(f"no buffer conversion for numpy dtype {values.dtype}")
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def string_array(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow string array (a few values: dictionaries, names)."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.Array.from_buffers(pa.string(), len(encoded),
                                 [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))])


def dictionary_of(codes: np.ndarray, values: Sequence[str]) -> pa.DictionaryArray:
    """A string column given as int32 codes into ``values`` (no string per row)."""
    return pa.DictionaryArray.from_arrays(array_of(np.asarray(codes, dtype=np.int32)),
                                          string_array(values))
