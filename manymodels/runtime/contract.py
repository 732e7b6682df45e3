"""The input contract: one rule per kind of value, one stable reason code per refusal.

Every scoring path (``Bundle.predict`` and the MLflow flavor, the bundle's ``score.py``,
the server's ``/score``, ``/invocations`` and V2 ``infer``, and ``manymodels batch``)
checks its rows here, so the same row gets the same answer, or the same refusal, on
every path. Online paths refuse a request at its first bad row (HTTP 422 with the reason
code); batch writes each bad row to ``rejected/`` with the same code.

=========================  ==========================================================
value                      rule (reason code when refused)
=========================  ==========================================================
extra column               ignored; refused with ``strict_columns`` (``unexpected_column``)
absent input column        refused (``missing_column``)
int / float / decimal      taken as float32
numeric string ``"2.1"``   parsed as a decimal number, then as a number
boolean                    refused in a numeric column (``not_numeric``)
other text, list, object   refused (``not_numeric`` / ``not_a_string``)
``±inf``, ``"inf"``        refused (``not_finite``)
beyond float32 (``1e39``)  refused, column named (``float32_overflow``)
null, NaN, ``""``          numeric input: scored if the model accepts missing values,
                           filled with the training median if it was trained with
                           ``missing: impute``, else refused (``missing_value``); text
                           input: the missing category (as in training), never refused
null / ``""`` segment key  refused (``null_segment_key``); list/object key
                           (``bad_segment_key``); no model and no fallback
                           (``segment_not_found``)
non-finite prediction      refused for that row (``non_finite_prediction``)
=========================  ==========================================================

The checks are vectorised for arrays, and short JSON lists (the server's single-row
requests) first get a cheap pure-Python scan that proves them clean; only a value that
fails it goes through the per-value rules, which then name the row, column and model.
"""

from __future__ import annotations

import decimal
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputSchemaError
from .session import as_string_column

if TYPE_CHECKING:
    from .manifest import ModelEntry

__all__ = [
    "BAD_SEGMENT_KEY",
    "FLOAT32_MAX",
    "MISSING_COLUMN",
    "MISSING_VALUE",
    "NON_FINITE_PREDICTION",
    "NOT_A_STRING",
    "NOT_FINITE",
    "NOT_NUMERIC",
    "NULL_SEGMENT_KEY",
    "OVERFLOW",
    "REASONS",
    "SEGMENT_NOT_FOUND",
    "UNEXPECTED_COLUMN",
    "CheckedInputs",
    "FloatColumn",
    "InputRefused",
    "Refusal",
    "check_inputs",
    "check_predictions",
    "extra_columns",
    "float_column",
    "key_problem",
    "non_finite_refusal",
    "non_finite_rows",
    "number_of",
    "refused_column",
    "string_column",
]

MISSING_COLUMN = "missing_column"
UNEXPECTED_COLUMN = "unexpected_column"
NOT_NUMERIC = "not_numeric"
NOT_FINITE = "not_finite"
OVERFLOW = "float32_overflow"
MISSING_VALUE = "missing_value"
NOT_A_STRING = "not_a_string"
NULL_SEGMENT_KEY = "null_segment_key"
BAD_SEGMENT_KEY = "bad_segment_key"
SEGMENT_NOT_FOUND = "segment_not_found"
NON_FINITE_PREDICTION = "non_finite_prediction"
#: Every reason code a row can be refused with (stable: clients and tests compare them).
REASONS = (MISSING_COLUMN, UNEXPECTED_COLUMN, NOT_NUMERIC, NOT_FINITE, OVERFLOW,
           MISSING_VALUE, NOT_A_STRING, NULL_SEGMENT_KEY, BAD_SEGMENT_KEY, SEGMENT_NOT_FOUND,
           NON_FINITE_PREDICTION)

FLOAT32_MAX = float(np.finfo(np.float32).max)

#: Per-row value codes of a converted column (index into :data:`_VALUE_REASONS`).
_OK, _NULL, _NOT_NUMERIC, _NOT_FINITE, _OVERFLOW, _NOT_A_STRING = range(6)
_VALUE_REASONS = ("", MISSING_VALUE, NOT_NUMERIC, NOT_FINITE, OVERFLOW, NOT_A_STRING)
#: Lists up to this long are proven clean by a Python scan (cheaper than numpy calls).
_SCAN_MAX = 64

#: Text read as null, as pandas and pyarrow's CSV readers read it.
NULL_TEXT = frozenset(["", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan",
                       "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a",
                       "nan", "null"])
_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INFINITE = re.compile(r"[+-]?(inf|infinity)", re.IGNORECASE)


class InputRefused(InputSchemaError):
    """A row breaks the input contract; :attr:`code` is its stable reason code."""

    def __init__(self, code: str, message: str, row: int | None = None,
                 column: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.row = row
        self.column = column


@dataclass
class Refusal:
    """Rows refused for one reason (``rows``: positions in the request or chunk)."""

    code: str
    message: str
    rows: np.ndarray
    column: str | None = None

    def error(self) -> InputRefused:
        first = int(self.rows[0]) if len(self.rows) else None
        where = f"row {first}: " if first is not None else ""
        return InputRefused(self.code, where + self.message, first, self.column)


# -- one value ----------------------------------------------------------------------------
def _number_code(value: float) -> int:
    if value != value:
        return _NULL
    if value in (math.inf, -math.inf):
        return _NOT_FINITE
    if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
        return _OVERFLOW
    return _OK


def _is_missing_scalar(value: Any) -> bool:
    """pd.NA, NaT and friends, without importing pandas for plain values."""
    module = type(value).__module__
    if module.startswith("pandas"):
        # pandas only on DataFrame paths: batch scoring never imports it
        import pandas as pd

        try:
            return bool(pd.isna(value))
        except (TypeError, ValueError):
            return False
    return False


def number_of(value: Any) -> tuple[int, float]:
    """The value code and float of one value of a numeric column (the per-value rule)."""
    if value is None:
        return _NULL, math.nan
    if isinstance(value, bool | np.bool_):
        return _NOT_NUMERIC, math.nan
    if isinstance(value, int | float | np.integer | np.floating):
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float64
            return _OVERFLOW, math.nan
        code = _number_code(number)
        return code, number if code == _OK else math.nan
    if isinstance(value, str | np.str_):
        text = str(value).strip()
        if text in NULL_TEXT:
            return _NULL, math.nan
        if _INFINITE.fullmatch(text):
            return _NOT_FINITE, math.nan
        if _DECIMAL.fullmatch(text):
            return number_of(float(text))
        return _NOT_NUMERIC, math.nan
    if isinstance(value, decimal.Decimal):  # a Parquet decimal read by pandas
        if value.is_nan():
            return _NULL, math.nan
        return number_of(float(value))
    if _is_missing_scalar(value):
        return _NULL, math.nan
    return _NOT_NUMERIC, math.nan


def _string_code(value: Any) -> int:
    if value is None or (isinstance(value, float) and value != value):
        return _NULL
    if isinstance(value, str):
        return _NULL if value == "" else _OK
    if isinstance(value, dict | list | tuple | set):
        return _NOT_A_STRING
    if _is_missing_scalar(value):
        return _NULL
    return _OK


def key_problem(value: Any) -> str | None:
    """Reason code for one segment-key value, or None when it can route.

    Null, NaN and the empty string are null keys (CSV readers turn an empty cell into
    null, so JSON's ``""`` must mean the same); lists and objects cannot name a segment.
    """
    code = _string_code(value)
    if code == _NULL:
        return NULL_SEGMENT_KEY
    if code == _NOT_A_STRING:
        return BAD_SEGMENT_KEY
    return None


# -- one column ---------------------------------------------------------------------------
@dataclass
class FloatColumn:
    """A numeric input as float32 (NaN where null or refused) and per-row value codes."""

    values: np.ndarray
    #: Per-row codes (``0`` fine, else an index into the value reasons); ``None`` when
    #: every value is a finite float32 number (the usual case: nothing more to check).
    codes: np.ndarray | None = None
    examples: dict[int, Any] = field(default_factory=dict)  # code -> first offending value


def _clean_list(values: Sequence[Any]) -> bool:
    """True when every value is a plain int or float within float32 (NaN fails too)."""
    for v in values:
        t = type(v)
        if (t is not float and t is not int) or not -FLOAT32_MAX <= v <= FLOAT32_MAX:
            return False
    return True


def _codes_per_value(values: Iterable[Any], n: int) -> FloatColumn:
    out = np.empty(n, dtype=np.float32)
    codes = np.zeros(n, dtype=np.int8)
    examples: dict[int, Any] = {}
    for i, value in enumerate(values):
        code, number = number_of(value)
        out[i] = number
        if code:
            codes[i] = code
            examples.setdefault(code, value)
    return FloatColumn(out, codes if codes.any() else None, examples)


def _codes_of_floats(arr: np.ndarray, nulls: np.ndarray | None) -> FloatColumn:
    with np.errstate(over="ignore", invalid="ignore"):
        values = arr.astype(np.float32, copy=False)
    finite = np.isfinite(values)
    if nulls is None and finite.all():
        return FloatColumn(values)
    codes = np.zeros(len(values), dtype=np.int8)
    codes[np.isinf(arr)] = _NOT_FINITE
    codes[~finite & np.isfinite(arr)] = _OVERFLOW
    codes[np.isnan(arr)] = _NULL
    if nulls is not None:
        codes[nulls] = _NULL
    bad = codes != 0
    if not bad.any():
        return FloatColumn(values)
    values = np.where(bad, np.float32(np.nan), values)
    examples = {int(codes[i]): arr[i].item() for i in np.flatnonzero(bad)[::-1]}
    return FloatColumn(values, codes, examples)


def float_column(values: Any, nulls: np.ndarray | None = None) -> FloatColumn:
    """A numeric input column (list, numpy array or Series) checked by the contract.

    ``nulls`` marks null rows for sources that keep them apart from the values (Arrow).
    """
    if isinstance(values, list | tuple):
        n = len(values)
        if n <= _SCAN_MAX and _clean_list(values):
            return FloatColumn(np.array(values, dtype=np.float32))
        if n > _SCAN_MAX and set(map(type, values)) <= {float, int}:
            try:
                return _codes_of_floats(np.array(values, dtype=np.float64), None)
            except OverflowError:  # an integer beyond float64
                pass
        return _codes_per_value(values, n)
    arr = np.asarray(values)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    kind = arr.dtype.kind
    if kind == "f":
        return _codes_of_floats(arr, nulls)
    if kind in "iu":
        values32 = arr.astype(np.float32)
        if nulls is None:
            return FloatColumn(values32)
        return _codes_of_floats(values32, nulls)
    if kind == "b":
        codes = np.full(len(arr), _NOT_NUMERIC, dtype=np.int8)
        if nulls is not None:
            codes[nulls] = _NULL
        return FloatColumn(np.full(len(arr), np.nan, dtype=np.float32), codes,
                           {_NOT_NUMERIC: True})
    column = _codes_per_value(arr.tolist() if kind in "OUS" else arr, len(arr))
    if nulls is not None and nulls.any():
        column.codes = column.codes if column.codes is not None else \
            np.zeros(len(arr), dtype=np.int8)
        column.codes[nulls] = _NULL
        column.values[nulls] = np.nan
    return column


def refused_column(n: int, example: Any) -> FloatColumn:
    """A column whose every value is not numeric (e.g. dates fed to a numeric input)."""
    return FloatColumn(np.full(n, np.nan, dtype=np.float32),
                       np.full(n, _NOT_NUMERIC, dtype=np.int8), {_NOT_NUMERIC: example})


def string_column(values: Any) -> tuple[np.ndarray, np.ndarray | None]:
    """A string input column: the values as ONNX strings and per-row codes (or None).

    Numbers take their key form (``42.0`` → ``"42"``); null, NaN and ``""`` are missing.
    """
    if isinstance(values, list | tuple):
        if all(type(v) is str and v for v in values):
            return np.array(values, dtype=object), None
        codes = np.array([_string_code(v) for v in values], dtype=np.int8)
        arr = np.empty(len(values), dtype=object)
        arr[:] = [v if c == _OK else "" for v, c in zip(values, codes, strict=True)]
        return as_string_column(arr), codes if codes.any() else None
    arr = np.asarray(values)
    if arr.dtype.kind == "O":
        codes = np.fromiter((_string_code(v) for v in arr), dtype=np.int8, count=len(arr))
        if codes.any():
            arr = np.where(codes == _OK, arr, "")
            return as_string_column(arr), codes
        return as_string_column(arr), None
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        codes = np.where(np.isnan(arr), _NULL, _OK).astype(np.int8)
        return as_string_column(np.where(codes == _OK, arr, 0.0)), codes
    if arr.dtype.kind == "U":
        empty = arr == ""
        return as_string_column(arr), empty.astype(np.int8) if empty.any() else None
    return as_string_column(arr), None


def require_segment_columns(present: Iterable[str], segment_columns: Sequence[str],
                            naming: str) -> None:
    """Refuse rows that lack a segment column: without it no model can be picked for them
    (``naming`` says how the caller names a model instead)."""
    have = set(present)
    missing = [c for c in segment_columns if c not in have]
    if missing:
        raise InputRefused(
            MISSING_COLUMN,
            f"rows lack the segment column(s) {', '.join(missing)} needed to pick a model "
            f"(segment columns: {', '.join(segment_columns)}); or {naming}", 0, missing[0])


def extra_columns(present: Iterable[str], allowed: frozenset[str] | set[str]) -> list[str]:
    """Columns of a request that no model takes and that are not segment columns."""
    return [c for c in present if c not in allowed]


# -- a routed table -------------------------------------------------------------------------
@dataclass
class CheckedInputs:
    """Model inputs that passed the contract, in row order, and the refused rows.

    ``columns`` hold float32 arrays (a null is NaN where the model accepts missing values
    or fills its training median in as it runs, ``impute``) and ONNX string arrays.
    A refused row's values are undefined: it must not be scored.
    """

    columns: dict[str, np.ndarray]
    refusals: list[Refusal]

    def first_error(self) -> InputRefused:
        """The refusal of the lowest row, as the exception online paths raise."""
        first = min(self.refusals, key=lambda r: int(r.rows[0]) if len(r.rows) else -1)
        return first.error()

    def raise_first(self) -> None:
        if self.refusals:
            raise self.first_error()


def _value_refusals(codes: np.ndarray, rows: np.ndarray | None, column: str,
                    entry: ModelEntry, examples: Mapping[int, Any]) -> list[Refusal]:
    """Refusals of the non-null problems (not numeric, not finite, overflow)."""
    model = entry.name
    picked = codes if rows is None else codes[rows]
    out = []
    for code in (_NOT_NUMERIC, _NOT_FINITE, _OVERFLOW, _NOT_A_STRING):
        hit = np.flatnonzero(picked == code)
        if not len(hit):
            continue
        example = examples.get(code)
        shown = f" ({example!r})" if code in examples else ""
        problem = {_NOT_NUMERIC: f"must be numeric; it holds a non-numeric value{shown}",
                   _NOT_FINITE: f"holds a non-finite value{shown}",
                   _OVERFLOW: f"holds a value{shown} beyond float32 (±3.4e38), the "
                              f"model's input type",
                   _NOT_A_STRING: f"must hold strings; it holds a list or object{shown}"}[code]
        positions = hit if rows is None else rows[hit]
        out.append(Refusal(_VALUE_REASONS[code], f"column '{column}' {problem} "
                           f"(model '{model}', schema: {entry.schema_text()})", positions,
                           column))
    return out


def _fill_missing(values: np.ndarray, null_rows: np.ndarray, column: str, entry: ModelEntry
                  ) -> Refusal | None:
    """Apply ``entry``'s missing-value policy to ``null_rows`` of ``values`` (in place)."""
    if not len(null_rows):
        return None
    if entry.accepts_missing or column in entry.impute:
        # left NaN: a model trained with medians fills them in as it runs
        # (runtime.session.fill_gaps), so a blend's partner still sees the gap its way
        values[null_rows] = np.float32(np.nan)
        return None
    return Refusal(MISSING_VALUE, f"column {column} is null; model {entry.name} does not "
                   f"accept missing values", null_rows, column)


def _take(values: Any, rows: np.ndarray | None) -> Any:
    if rows is None:
        return values
    if isinstance(values, list | tuple):
        return [values[i] for i in rows.tolist()]
    return np.asarray(values)[rows]


def _string_refusals(values: Any, rows: np.ndarray | None, column: str, entry: ModelEntry
                     ) -> list[Refusal]:
    """Refusals of a string input on the rows of one model (only those rows are read).

    A null is not refused: it is the missing category (``MISSING_CATEGORY``), which the
    model learned where its training rows had gaps in that column.
    """
    _, codes = string_column(_take(values, rows))
    if codes is None or not (codes == _NOT_A_STRING).any():
        return []
    found = _value_refusals(codes, None, column, entry, {})
    if rows is not None:  # positions within the taken rows -> positions in the table
        for refusal in found:
            refusal.rows = rows[refusal.rows]
    return found


def check_inputs(columns: Mapping[str, Any], n: int,
                 groups: Mapping[str, np.ndarray | None], entries: Mapping[str, ModelEntry],
                 unexpected: Sequence[str] = (), checked_keys: frozenset[str] = frozenset()
                 ) -> CheckedInputs:
    """Convert and check every input the models of ``groups`` need, in row order.

    Parameters
    ----------
    columns
        Raw input columns (lists, arrays, Series, or :class:`FloatColumn` for inputs
        converted already).
    n
        Number of rows.
    groups
        Model name -> its row positions (``None``: every row).
    entries
        Manifest entries of those models.
    unexpected
        Extra columns to refuse (``strict_columns``); empty to ignore extras.
    checked_keys
        Segment columns routing already checked (no null there): taken as they are.
    """
    refusals: list[Refusal] = []
    if unexpected:
        refusals.append(Refusal(UNEXPECTED_COLUMN, f"unexpected column(s) "
                                f"{', '.join(unexpected)}: no model takes them and they are "
                                f"not segment columns (strict columns)", np.arange(n)))
    out: dict[str, np.ndarray] = {}
    converted: dict[str, FloatColumn] = {}
    for name, rows in groups.items():
        entry = entries[name]
        absent = [c.name for c in entry.inputs if c.name not in columns] \
            if not all(c.name in columns for c in entry.inputs) else None
        if absent:
            refusals.append(Refusal(MISSING_COLUMN, f"missing column(s) {', '.join(absent)} "
                                    f"for model '{name}' (schema: {entry.schema_text()})",
                                    np.arange(n) if rows is None else rows, absent[0]))
            continue
        for spec in entry.inputs:
            column = spec.name
            if spec.dtype == "string":
                out[column] = columns[column]  # converted by the model when it is fed
                if column not in checked_keys:
                    refusals += _string_refusals(columns[column], rows, column, entry)
                continue
            col = converted.get(column)
            if col is None:
                raw = columns[column]
                col = converted[column] = raw if isinstance(raw, FloatColumn) \
                    else float_column(raw)
                out[column] = col.values
            if col.codes is None:
                continue
            refusals += _value_refusals(col.codes, rows, column, entry, col.examples)
            picked = col.codes if rows is None else col.codes[rows]
            nulls = np.flatnonzero(picked == _NULL)
            if len(nulls):
                if out[column] is col.values:
                    out[column] = col.values.copy()  # fills differ per model: own copy
                refusal = _fill_missing(out[column], nulls if rows is None else rows[nulls],
                                        column, entry)
                if refusal is not None:
                    refusals.append(refusal)
    return CheckedInputs(out, refusals)


def check_predictions(labels: np.ndarray, probabilities: np.ndarray | None = None
                      ) -> np.ndarray | None:
    """Positions of rows whose prediction (or a class probability) is not finite."""
    bad = non_finite_rows(labels) if labels.dtype.kind == "f" else None
    if probabilities is not None and probabilities.size:
        worse = non_finite_rows(probabilities)
        if worse is not None:
            bad = worse if bad is None else np.union1d(bad, worse)
    return bad


def non_finite_rows(values: np.ndarray) -> np.ndarray | None:
    """Rows (first axis) of a float output holding a NaN or infinity, or None."""
    if values.size <= _SCAN_MAX:  # a Python scan of a few values beats numpy's calls
        if all(map(math.isfinite, values.ravel().tolist())):
            return None
    elif np.isfinite(values).all():
        return None
    finite = np.isfinite(values.reshape(len(values), -1)).all(axis=1)
    return np.flatnonzero(~finite)


def non_finite_refusal(rows: np.ndarray, model: str) -> Refusal:
    return Refusal(NON_FINITE_PREDICTION, f"model '{model}' returned a non-finite prediction; "
                   f"the row's values are likely far outside the training range", rows)
