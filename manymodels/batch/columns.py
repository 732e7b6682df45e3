"""Arrow columns as the runtime's inputs, without a Python object per row, and the
rows a chunk rejects (each with the input contract's stable code).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from manymodels.runtime import contract

from .arrow import array_of, numpy_of, string_array, valid_mask

__all__ = ["Columns", "Rejections", "float_input", "plain_column", "prediction_array",
           "segment_codes"]


class Rejections:
    """Per-row rejections (0 = fine, else an index into :attr:`reasons`); the first
    reason found for a row wins. Each reason has the input contract's stable code."""

    def __init__(self, n: int) -> None:
        self.code = np.zeros(n, dtype=np.int32)
        self.reasons: list[str] = [""]
        self.codes: list[str] = [""]

    def add(self, rows: np.ndarray, reason: str, code: str) -> None:
        """Reject ``rows`` (bool mask or positions) unless they already are."""
        if isinstance(rows, np.ndarray) and rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if len(rows) == 0:
            return
        fresh = rows[self.code[rows] == 0]
        if len(fresh):
            self.reasons.append(reason)
            self.codes.append(code)
            self.code[fresh] = len(self.reasons) - 1

    def add_refusals(self, refusals: Iterable[contract.Refusal]) -> None:
        for refusal in refusals:
            self.add(refusal.rows, refusal.message, refusal.code)

    def reject_all(self, reason: str, code: str) -> None:
        self.add(np.arange(len(self.code)), reason, code)


def plain_column(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def segment_codes(column: pa.ChunkedArray, n: int) -> tuple[np.ndarray, list[Any]]:
    """One integer code per row (``-1`` = null) and the value of each code.

    What the router needs, straight from Arrow without Python objects per row: the
    indices of a dictionary column (strings are read as dictionaries), ``value - min``
    for integers of a small range, else Arrow's hash-based dictionary encoding.
    """
    kind = column.type
    if pa.types.is_integer(kind) and column.null_count == 0 and n:
        values = numpy_of(column)
        low, high = int(values.min()), int(values.max())
        if high - low < max(4 * n, 1 << 16):
            return values - low, list(range(low, high + 1))
    if not pa.types.is_dictionary(kind):
        column = column.dictionary_encode()
    return _dictionary_codes(column, n)


def _dictionary_codes(column: pa.ChunkedArray, n: int) -> tuple[np.ndarray, list[Any]]:
    """Codes into one merged dictionary for a chunked dictionary column (each row group
    brings its own dictionary); null indices become ``-1``."""
    merged: dict[Any, int] = {}
    uniques: list[Any] = []
    codes = np.empty(n, dtype=np.int64)
    at = 0
    for chunk in column.chunks:
        local = chunk.dictionary.to_pylist()
        remap = np.empty(len(local) + 1, dtype=np.int64)
        for i, value in enumerate(local):
            if value not in merged:
                merged[value] = len(uniques)
                uniques.append(value)
            remap[i] = merged[value]
        remap[-1] = -1
        indices = numpy_of(chunk.indices)
        present = valid_mask(chunk.indices)
        if present is not None:
            indices = np.where(present, indices, len(local))
        codes[at:at + len(chunk)] = remap[indices]
        at += len(chunk)
    return codes, uniques


#: Arrow types converted to numpy straight from their buffers.
_NUMPY_SOURCES = frozenset([
    pa.float64(), pa.float32(), pa.int64(), pa.int32(), pa.int16(), pa.int8(),
    pa.uint64(), pa.uint32(), pa.uint16(), pa.uint8(), pa.bool_()])


def float_input(column: pa.ChunkedArray) -> contract.FloatColumn:
    """A model input column checked by the input contract (nulls, text, overflow...).

    Numbers go through their buffers; text (CSV reads inputs as text) is cast by Arrow
    and, where that fails, each distinct value goes through the contract's own rule.
    """
    if column.type in _NUMPY_SOURCES:  # no Arrow kernel, no pyarrow.compute import
        return _numeric_input(column)
    column = plain_column(column)
    kind = column.type
    if pa.types.is_null(kind):
        return contract.float_column(np.zeros(len(column)), np.ones(len(column), dtype=bool))
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return _numeric_input(column.cast(pa.float64()))
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        try:
            return _numeric_input(column.cast(pa.float64()))
        except pa.ArrowInvalid:  # some text is not a number: the contract names it
            return _text_input(column)
    return contract.refused_column(len(column), str(kind))  # dates, lists...: not numbers


def _numeric_input(column: pa.ChunkedArray) -> contract.FloatColumn:
    if column.null_count == len(column):
        return contract.float_column(np.zeros(len(column)), np.ones(len(column), dtype=bool))
    values = numpy_of(column)
    present = valid_mask(column)
    return contract.float_column(values, None if present is None else ~present)


def _text_input(column: pa.ChunkedArray) -> contract.FloatColumn:
    """Text through the contract's per-value rule, once per distinct value."""
    codes, uniques = _dictionary_codes(column.dictionary_encode(), len(column))
    parsed = contract.float_column(list(uniques) + [None])
    lookup = codes.copy()
    lookup[lookup < 0] = len(uniques)  # null -> the appended None
    values = parsed.values[lookup]
    row_codes = None if parsed.codes is None else parsed.codes[lookup]
    return contract.FloatColumn(values, row_codes, parsed.examples)


def prediction_array(prediction: np.ndarray) -> pa.Array:
    """Predictions as Arrow: floats through their buffer, class labels as strings."""
    if prediction.dtype != object:
        return array_of(prediction if prediction.dtype == np.float32
                        else np.asarray(prediction, dtype=np.float64))
    labels = prediction.tolist()
    if all(isinstance(v, str) for v in labels):
        return string_array(labels)
    return pa.array(labels)


def _as_objects(column: pa.ChunkedArray, rows: np.ndarray | None,
                key_codes: tuple[np.ndarray, list[Any]] | None = None) -> np.ndarray:
    """A column as numpy for the runtime: integers as they are, the rest as objects.

    With ``rows``, only those rows are converted (the others stay ``None``): a column
    that only the fallback model reads is needed for a few rows, not for the chunk.
    ``key_codes`` are the codes routing computed for a segment column (reused).
    """
    if pa.types.is_integer(column.type) and column.null_count == 0:
        return numpy_of(column)
    dictionary = pa.types.is_dictionary(column.type)
    if rows is not None and not dictionary and key_codes is None:  # a few rows of plain text
        out = np.empty(len(column), dtype=object)
        out[rows] = np.array(column.take(array_of(rows)).to_pylist() + [None],
                             dtype=object)[:-1]
        return out
    codes, uniques = key_codes or segment_codes(column, len(column))  # values looked up by code
    values = np.array([*uniques, None], dtype=object)  # code -1 (null) -> None
    if rows is None:
        return np.asarray(values[codes])
    out = np.empty(len(column), dtype=object)
    out[rows] = values[codes[rows]]
    return out


class Columns(Mapping[str, Any]):
    """Model inputs of one chunk, converted on first use (string inputs are rarely needed)."""

    def __init__(self, table: pa.Table, floats: Mapping[str, Any],
                 rows_needing: dict[str, np.ndarray],
                 key_codes: dict[str, tuple[np.ndarray, list[Any]]] | None = None) -> None:
        self._table = table
        self._values: dict[str, Any] = dict(floats)
        self._names = set(table.column_names) | set(floats)
        self._rows_needing = rows_needing
        self._key_codes = key_codes or {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            if name not in self._names:
                raise KeyError(name)
            rows = self._rows_needing.get(name)
            few = rows is not None and len(rows) * 4 < self._table.num_rows
            self._values[name] = _as_objects(self._table[name], rows if few else None,
                                             self._key_codes.get(name))
        return self._values[name]

    def convert_needed(self) -> None:
        """Convert now the text inputs some groups need (on the thread that prepares)."""
        for name in self._rows_needing:
            if name in self._names:
                self[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names
