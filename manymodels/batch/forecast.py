"""Batch forecasts: a file of future rows of a forecasting bundle, one forecast per row.

A forecasting bundle's models take lag features that the runtime builds from each
series' stored tail, not columns of the input file, so its chunks do not go through the
router and the sessions of :mod:`.score`: each chunk's rows go to the runtime's
:func:`~manymodels.runtime.forecast_request.forecast_future_rows`, the function every
online path calls, and rows of a series it cannot forecast are rejected with the reason
code an online path would answer. Reading, staging and the exactly-once commit stay
those of every batch run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from manymodels.runtime import Bundle
from manymodels.runtime.forecast_request import FutureForecast, forecast_future_rows

__all__ = ["ForecastColumns", "forecast_chunk", "method_codes"]


@dataclass(frozen=True)
class ForecastColumns:
    """The input columns of a forecasting bundle's future rows."""

    keys: tuple[str, ...]
    time: str
    known_future: tuple[str, ...]

    @classmethod
    def of(cls, bundle: Bundle) -> ForecastColumns | None:
        """The columns to read, or ``None`` for a bundle that does not forecast."""
        if bundle.manifest.task != "forecast":
            return None
        forecaster = bundle.forecaster
        return cls(tuple(forecaster.key_columns), forecaster.time_column,
                   tuple(forecaster.spec.known_future))

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.keys, self.time, *self.known_future)


def _plain(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def forecast_chunk(bundle: Bundle, columns: ForecastColumns, table: pa.Table) -> FutureForecast:
    """Forecasts of one chunk's rows; rows of series that fail are refused, not raised."""
    present = [c for c in columns.all if c in table.column_names]
    frame = pa.table({c: _plain(table[c]) for c in present}).to_pandas() if present else \
        pa.table({}).to_pandas()
    if not present:
        frame = frame.reindex(range(table.num_rows))
    return forecast_future_rows(bundle.forecaster, frame, strict=False)


def method_codes(methods: Sequence[str], refused: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Per row, the position of its method in the returned names (``-1`` where refused):
    the dictionary encoding of the output's ``model`` column."""
    names: dict[str, int] = {}
    index = np.empty(len(methods), dtype=np.int32)
    for i, method in enumerate(methods):
        if refused[i]:
            index[i] = -1
            continue
        code = names.get(method)
        if code is None:
            code = names[method] = len(names)
        index[i] = code
    return index, list(names)
