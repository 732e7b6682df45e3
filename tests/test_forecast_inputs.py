"""A forecast's inputs: periods counted on the bundle's grid, and history written over a
stored tail."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from manymodels.runtime.errors import InputSchemaError
from manymodels.runtime.forecast_inputs import _check_regular, _offset, _spliced


def test_offset_counts_periods_on_the_grid_or_says_none() -> None:
    """Check signed period counts for integer periods and dates, and ``None`` for a date
    off the stored grid (a Monday on a Saturday-weekly grid)."""
    assert _offset(12, 10, "int") == 2 and _offset(7, 10, "int") == -3
    last = pd.Timestamp("2024-03-30")  # a Saturday
    assert _offset(pd.Timestamp("2024-04-13"), last, "W-SAT") == 2
    assert _offset(pd.Timestamp("2024-03-16"), last, "W-SAT") == -2
    assert _offset(last, last, "W-SAT") == 0
    assert _offset(pd.Timestamp("2024-04-08"), last, "W-SAT") is None
    assert _offset(pd.Timestamp("2024-01-31"), pd.Timestamp("2024-03-31"), "ME") == -2


def test_spliced_writes_history_over_the_tail_and_keeps_the_rest() -> None:
    """Check every placement of sent values against a stored tail ending at offset 0:
    after it, overlapping its end, inside it, before it touching, and with a gap."""
    kept = np.asarray([1.0, 2.0, 3.0, 4.0])  # offsets -3..0
    sent = np.asarray([10.0, 11.0])
    assert _spliced(kept, 1, sent).tolist() == [1, 2, 3, 4, 10, 11]  # continues
    assert _spliced(kept, 0, sent).tolist() == [1, 2, 3, 10, 11]  # overlaps the last
    assert _spliced(kept, -2, sent).tolist() == [1, 10, 11, 4]  # inside
    assert _spliced(kept, -5, sent).tolist() == [10, 11, 1, 2, 3, 4]  # right before
    assert _spliced(kept, -9, np.arange(12.0)).tolist() == list(np.arange(12.0))  # covers
    assert _spliced(kept, 2, sent) is None  # a gap after: replaces
    assert _spliced(kept, -6, sent) is None  # a gap before
    assert _spliced(kept, None, sent) is None  # off the grid


def test_a_history_off_the_bundles_grid_is_refused_naming_it() -> None:
    """Check that a history starting off the bundle's grid is refused as such, one row
    or several (several were called gappy; one was taken, its lags days off), while
    consecutive periods on the grid pass."""
    saturdays = pd.date_range("2024-03-02", periods=3, freq="W-SAT").to_numpy()
    _check_regular(saturdays, "W-SAT", ("1",), ["store"])
    _check_regular(saturdays[:1], "W-SAT", ("1",), ["store"])
    for times in (np.asarray([np.datetime64("2024-03-04")]), saturdays + np.timedelta64(2, "D")):
        with pytest.raises(InputSchemaError, match="not a W-SAT period"):
            _check_regular(times, "W-SAT", ("1",), ["store"])
    with pytest.raises(InputSchemaError, match="gaps or duplicate"):
        _check_regular(saturdays[[0, 2]], "W-SAT", ("1",), ["store"])
    _check_regular(np.asarray([3, 4, 5]), "int", ("1",), ["store"])
