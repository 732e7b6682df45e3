"""Segment keys and periods of a forecast's inputs: keys normalised as the bundle stores
them, periods read by the bundle's frequency, a history's periods checked to be regular.
Split from :mod:`.forecaster`, which calls them for every request.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from pandas.tseries.frequencies import to_offset

from .errors import InputSchemaError
from .manifest import normalise_key_value


def _periods_between(origin: Any, last: Any, freq: str) -> int:
    """Periods from ``origin`` to ``last`` (0 when the origin is unknown or the same)."""
    if origin is None or last is None or origin == last:
        return 0
    if freq == "int":
        return max(int(last) - int(origin), 0)
    return max(len(pd.date_range(pd.Timestamp(origin), pd.Timestamp(last), freq=freq)) - 1, 0)


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _positions_by_key(frame: pd.DataFrame, columns: Sequence[str]
                      ) -> dict[tuple[str, ...], np.ndarray]:
    """Row positions of each normalised segment key in ``frame`` (a dictionary pass over
    the key values: a request's history is a few series, where a pandas groupby and a
    sort per series cost more than the forecast)."""
    memo: dict[tuple[Any, ...], tuple[str, ...]] = {}
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, raw in enumerate(zip(*(frame[c].tolist() for c in columns), strict=True)):
        key = memo.get(raw)
        if key is None:
            key = memo[raw] = tuple(normalise_key_value(v) for v in raw)
        groups.setdefault(key, []).append(i)
    return {key: np.asarray(rows, dtype=np.int64) for key, rows in groups.items()}


def _key_tuples(keys: Any, columns: Sequence[str], fill: str | None = None
                ) -> list[tuple[str, ...]]:
    """Normalised key tuples; with ``fill`` (a bundle with levels) a column a key leaves
    out or null takes ``fill``, the aggregate over it."""
    if isinstance(keys, pd.DataFrame):
        missing = [c for c in columns if c not in keys.columns]
        if missing and fill is None:
            raise InputSchemaError(f"keys lack segment column(s) {', '.join(missing)}")
        if fill is None:
            return [tuple(normalise_key_value(v) for v in row)
                    for row in keys[list(columns)].astype(object).to_numpy()]
        present = [c for c in columns if c in keys.columns]
        return [_key_of(dict(zip(present, row, strict=True)), columns, fill)
                for row in keys[present].astype(object).to_numpy()]
    if isinstance(keys, Mapping):
        return [_key_of(keys, columns, fill)]
    if isinstance(keys, (str, bytes)):  # iterated, it would be one key per character
        raise InputSchemaError(f"keys is the text {keys!r}: pass a list of keys, each a "
                               f"mapping of {', '.join(columns)} to values (or a DataFrame)")
    out = []
    for key in keys:
        if isinstance(key, Mapping):
            out.append(_key_of(key, columns, fill))
        else:
            values = key if isinstance(key, (tuple, list)) else (key,)
            if len(values) != len(columns):
                raise InputSchemaError(f"key {key!r} does not name the segment column(s) "
                                       f"{', '.join(columns)}")
            out.append(tuple(normalise_key_value(v) for v in values))
    return out


def _key_of(key: Mapping[Any, Any], columns: Sequence[str], fill: str | None
            ) -> tuple[str, ...]:
    if fill is None:
        missing = [c for c in columns if c not in key]
        if missing:
            raise InputSchemaError(f"key {dict(key)!r} lacks segment column(s) "
                                   f"{', '.join(missing)}")
        return tuple(normalise_key_value(key[c]) for c in columns)
    return tuple(fill if _is_null(key.get(c)) else normalise_key_value(key[c]) for c in columns)


def _is_null(value: Any) -> bool:
    return (value is None or (isinstance(value, float) and value != value) or value is pd.NA
            or (isinstance(value, str) and value == ""))


def _key_text(columns: Sequence[str], key: Sequence[str]) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True))


def _time_value(value: Any, freq: str) -> Any:
    if freq == "int":
        return int(value)
    return pd.Timestamp(value)


def _as_timestamp(value: Any, column: str) -> pd.Timestamp:
    try:
        return pd.Timestamp(value)
    except (TypeError, ValueError):
        raise InputSchemaError(f"column '{column}' holds {value!r}, not a date") from None


def _offset(period: Any, last: Any, freq: str) -> int | None:
    """Periods from ``last`` to ``period`` (negative when ``period`` is before it),
    ``None`` when ``period`` is not on ``last``'s grid."""
    if freq == "int":
        return int(period) - int(last)
    a, b = pd.Timestamp(period), pd.Timestamp(last)
    low, high = min(a, b), max(a, b)
    grid = pd.date_range(low, high, freq=freq)
    if len(grid) == 0 or grid[0] != low or grid[-1] != high:
        return None
    return (len(grid) - 1) * (1 if a > b else -1)


def _spliced(kept: np.ndarray, off: int | None, sent: np.ndarray) -> np.ndarray | None:
    """A stored tail (``kept``, ending at offset 0) with ``sent`` values from offset
    ``off`` on written over the periods they share and after it: the periods of the
    tail before and after the sent ones kept. ``None`` when ``sent`` leaves a gap after
    the tail or before it (it then replaces the tail)."""
    k, n = len(kept), len(sent)
    if off is None or off > 1 or off + n < -(k - 1):
        return None
    before = kept[: min(max(off + k - 1, 0), k)]
    after = kept[min(max(off + n + k - 1, 0), k):]
    return np.concatenate([before, sent, after])


@functools.lru_cache(maxsize=64)
def _grid(freq: str) -> Any:
    """The pandas offset of a bundle's ``freq`` (``None`` if pandas cannot read it: the
    periods' own check below still applies)."""
    try:
        return to_offset(freq)
    except ValueError:
        return None


def _check_regular(times: np.ndarray, freq: str, key: tuple[str, ...], columns: Sequence[str]
                   ) -> None:
    """Refuse a history whose periods are off the bundle's grid (a Monday sent to a
    Saturday-weekly bundle: its lags would be days off) or not consecutive."""
    if len(times) and freq != "int":
        first = pd.Timestamp(times[0])
        grid = _grid(freq)
        if grid is not None and not grid.is_on_offset(first):
            raise InputSchemaError(
                f"history of series {_key_text(columns, key)} starts at {first}, which is "
                f"not a {freq} period (the bundle's); send periods on that grid")
    if len(times) < 2:
        return
    if freq == "int":
        steps = np.diff(np.asarray(times, dtype=np.int64))
        regular = bool((steps == 1).all())
    else:
        expected = pd.date_range(pd.Timestamp(times[0]), periods=len(times), freq=freq)
        regular = bool((pd.DatetimeIndex(times) == expected).all())
    if not regular:
        raise InputSchemaError(f"history of series {_key_text(columns, key)} has gaps or "
                               f"duplicate periods; send consecutive {freq} periods")
