"""``manymodels update``: move a forecasting bundle's origin to its newest periods.

New rows extend each series' stored tail; no model is refitted, so a nightly job can
refresh the forecast origin in seconds and leave refits to a weekly retrain. The result
is a new bundle version (its content digest covers the tails).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.bundle import PackResult, package_run
from manymodels.data import read_table
from manymodels.errors import BundleError, DataError
from manymodels.forecast.panel import parse_times
from manymodels.runtime.forecast import FeatureSpec, future_times
from manymodels.runtime.intervals import is_nonnegative
from manymodels.runtime.manifest import normalise_key_value, parse_manifest, read_manifest

__all__ = ["MovedOrigins", "move_origins", "update_bundle"]


def update_bundle(bundle: str | os.PathLike[str], data: str | os.PathLike[str] | pd.DataFrame,
                  out: str | os.PathLike[str] | None = None, name: str | None = None
                  ) -> PackResult:
    """Append ``data`` (rows after each series' last period) to the bundle's tails.

    Rows at or before a series' last stored period are ignored (a nightly extract may
    overlap); a gap between the stored tail and the first new row is refused, as are
    rows of series the bundle does not know (a refit adds series). The new bundle goes to
    ``out`` (default: replace ``bundle``).
    """
    root = Path(bundle)
    manifest = read_manifest(root)
    raw: dict[str, Any] = dict(manifest.raw)
    section = raw.get("forecast")
    if not isinstance(section, dict):
        raise BundleError(f"{root} is not a forecasting bundle (trained without task: forecast)")
    moved = move_origins(section, read_table(data), list(manifest.segment_columns),
                         manifest.target)
    if moved.unknown:
        raise DataError(f"series {moved.unknown[0]} is not in the bundle; retrain to add "
                        f"new series")
    if not moved.moved:
        raise DataError("no new periods after the bundle's last ones: nothing to update")
    raw["forecast"] = {**section, "series": moved.series}
    target_dir = Path(out) if out is not None else root
    return package_run(root, target_dir, name=name or manifest.name,
                       overwrite=out is None or target_dir.exists(),
                       manifest=parse_manifest(root, raw))


@dataclass
class MovedOrigins:
    """The forecast section's ``series`` with each known series' newer periods appended."""

    series: dict[str, Any]
    moved: list[int]  # positions of the series that got new periods
    unknown: list[str]  # series of the rows that the section does not know, by name


def move_origins(section: dict[str, Any], frame: pd.DataFrame, key_columns: list[str],
                 target: str) -> MovedOrigins:
    """Append ``frame``'s rows after each series' last period to its tail: the update of
    ``manymodels update`` and of the series a ``manymodels retrain`` does not refit.

    Rows at or before a series' last period are ignored; a gap or a repeat right after
    it, and missing values, are refused naming the series. The section is not changed.
    """
    time_col, freq = section["time_column"], str(section["freq"])
    missing = [c for c in [*key_columns, time_col, target] if c not in frame.columns]
    if missing:
        raise DataError(f"the new rows lack column(s) {', '.join(missing)}")
    frame = frame.assign(**{time_col: parse_times(frame[str(time_col)], str(time_col))})
    spec = FeatureSpec.from_dict(section["features"])
    series = {k: list(v) if isinstance(v, list) else v for k, v in section["series"].items()}
    index = {tuple(normalise_key_value(v) for v in key): i for i, key in enumerate(series["keys"])}
    tails = [list(t) for t in series["tail"]]
    last = list(series["last"])
    nonnegative = list(series["nonnegative"]) if "nonnegative" in series else None
    levels = section.get("hierarchy")
    aggregate = {i for i, m in enumerate(levels["members"]) if i not in set(levels["bottom"])
                 } if levels else set()
    added: dict[int, np.ndarray] = {}
    out = MovedOrigins(series, [], [])
    for key, part in frame.groupby(key_columns, sort=False, dropna=False):
        key_t = tuple(normalise_key_value(v) for v in (key if isinstance(key, tuple) else (key,)))
        i = index.get(key_t)
        if i is None:
            out.unknown.append(_name(key_columns, key_t))
            continue
        if i in aggregate:
            raise DataError(f"series {_name(key_columns, key_t)} is an aggregate: send the "
                            f"rows of its segments, the update sums them")
        part = part.sort_values(time_col)
        stored = pd.Timestamp(last[i]) if freq != "int" else int(last[i])
        times = part[time_col].to_numpy()
        newer = np.asarray([_after(t, stored, freq) for t in times], dtype=bool)
        if not newer.any():
            continue
        values = part[target].to_numpy(dtype=np.float64)[newer]
        times = times[newer]
        expected = future_times(stored, freq, len(times))
        if not (pd.Index(times) == pd.Index(expected)).all():
            raise DataError(f"series {_name(key_columns, key_t)}: the new rows must continue "
                            f"right after its last period {last[i]} with no gap or repeat "
                            f"(got {times[0]} ...)")
        if not np.isfinite(values).all():
            raise DataError(f"series {_name(key_columns, key_t)}: new {target} values are "
                            f"missing or not finite")
        tails[i] = (tails[i] + values.tolist())[-max(spec.tail_length, len(tails[i])):]
        if nonnegative is not None:
            nonnegative[i] = bool(nonnegative[i]) and is_nonnegative(values)
        last[i] = int(times[-1]) if freq == "int" else pd.Timestamp(times[-1]).isoformat()
        added[i] = values
        out.moved.append(i)
    if levels and added:
        _update_aggregates(levels, aggregate, added, tails, last, spec.tail_length,
                           [tuple(k) for k in series["keys"]], key_columns, nonnegative)
    series.update(tail=tails, last=last)
    if nonnegative is not None:
        series["nonnegative"] = nonnegative
    return out


def _update_aggregates(levels: dict[str, Any], aggregate: set[int], added: dict[int, np.ndarray],
                       tails: list[list[float]], last: list[Any], length: int,
                       keys: list[tuple[Any, ...]], columns: list[str],
                       nonnegative: list[bool] | None) -> None:
    """Extend each aggregate series by the sums of its segments' new values: levels add up
    only while every segment ends on the same period."""
    bottom = [int(i) for i in levels["bottom"]]
    behind = [i for i in bottom if last[i] != last[bottom[0]]]
    if behind:
        raise DataError(f"series {_name(columns, keys[behind[0]])} ends at {last[behind[0]]} "
                        f"and {_name(columns, keys[bottom[0]])} at {last[bottom[0]]}: a "
                        f"bundle with levels needs the new periods of every segment")
    for i in sorted(aggregate):
        members = [bottom[int(b)] for b in levels["members"][i]]
        values = np.sum([added[m] for m in members], axis=0)
        tails[i] = (tails[i] + values.tolist())[-max(length, len(tails[i])):]
        if nonnegative is not None:
            nonnegative[i] = bool(nonnegative[i]) and is_nonnegative(values)
        last[i] = last[members[0]]


def _after(value: Any, stored: Any, freq: str) -> bool:
    if freq == "int":
        return int(value) > int(stored)
    return pd.Timestamp(value) > pd.Timestamp(stored)


def _name(columns: list[str], key: tuple[str, ...]) -> str:
    return ", ".join(f"{c}={v}" for c, v in zip(columns, key, strict=True))
