"""A forecast before it is a table: the rows every forecasting path answers with.

:class:`ForecastTable` holds one forecast per series and step as arrays; ``Bundle.forecast``
makes a DataFrame of it and the server's ``/forecast`` JSON rows, without building the
DataFrame first. Like the rest of ``runtime`` this imports only numpy and pandas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["ForecastTable"]


@dataclass
class ForecastTable:
    """A forecast, one row per series and step, before it becomes a table or JSON rows."""

    key_columns: list[str]
    time_column: str
    keys: list[tuple[str, ...]]
    times: list[np.ndarray]  # each series' h future periods
    values: np.ndarray  # (series, h)
    methods: list[str]
    bands: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (series, h)

    def first(self, n: int) -> ForecastTable:
        """The first ``n`` series (the ones asked for, before the inputs of aggregates)."""
        if n == len(self.keys):
            return self
        return ForecastTable(self.key_columns, self.time_column, self.keys[:n],
                             self.times[:n], self.values[:n], self.methods[:n],
                             {k: v[:n] for k, v in self.bands.items()})

    def frame(self) -> pd.DataFrame:
        """Key columns, the time column, ``forecast``, the interval bounds and ``method``."""
        n, h = self.values.shape
        columns: dict[str, Any] = {}
        for j, c in enumerate(self.key_columns):
            columns[c] = np.repeat(np.asarray([k[j] for k in self.keys], dtype=object), h)
        columns[self.time_column] = (np.concatenate(self.times) if n else np.asarray([]))
        columns["forecast"] = self.values.reshape(-1)
        for name, band in self.bands.items():
            columns[name] = band.reshape(-1)
        columns["method"] = np.repeat(np.asarray(self.methods, dtype=object), h)
        # every column is a fresh array (repeat, concatenate, reshape of this table's own
        # values): no copy needed, which halves the cost of a one-series table
        return pd.DataFrame(columns, copy=False)

    def records(self) -> list[dict[str, Any]]:
        """JSON-safe rows (dates as ISO 8601 text, NaN as null) of :meth:`frame`, built
        without it."""
        n, h = self.values.shape
        texts: dict[int, list[Any]] = {}
        columns = [self.values.tolist(), *(b.tolist() for b in self.bands.values())]
        out: list[dict[str, Any]] = []
        names = [*self.key_columns, self.time_column, "forecast", *self.bands, "method"]
        for r in range(n):
            times = self.times[r]
            shown = texts.get(id(times))
            if shown is None:
                shown = texts[id(times)] = (
                    [t.isoformat() for t in pd.DatetimeIndex(times)]
                    if times.dtype.kind == "M" else times.tolist())
            key, method = self.keys[r], self.methods[r]
            for k in range(h):
                numbers = [_finite(c[r][k]) for c in columns]
                out.append(dict(zip(names, (*key, shown[k], *numbers, method), strict=True)))
        return out

    def method_counts(self) -> dict[str, int]:
        """Rows per method (each series gives ``h``)."""
        h = self.values.shape[1]
        counts: dict[str, int] = {}
        for m in self.methods:
            counts[m] = counts.get(m, 0) + h
        return counts


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None

