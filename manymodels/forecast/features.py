"""Training rows for lag models, built with the runtime's own feature code.

:func:`training_rows` stacks, for a set of series and one cutoff each, every period that
has its full window of lags; the features come from :func:`runtime.forecast.lag_matrix`,
the function the served recursion calls, so training and serving cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from manymodels.forecast.panel import Panel
from manymodels.runtime.forecast import (
    FeatureSpec,
    calendar_values,
    lag_matrix,
    loc_scale,
    transform,
)

__all__ = ["RowsAtCut", "SeriesScale", "TrainingRows", "series_scales", "tails_at",
           "training_rows"]


@dataclass
class SeriesScale:
    loc: np.ndarray
    scale: np.ndarray


def series_scales(panel: Panel, spec: FeatureSpec, cutoffs: np.ndarray) -> SeriesScale:
    """Location and scale of each series from its values before its cutoff
    (:func:`~manymodels.runtime.forecast.loc_scale`: of the levels or the differences)."""
    loc = np.zeros(len(panel))
    scale = np.ones(len(panel))
    for i, y in enumerate(panel.y):
        loc[i], scale[i] = loc_scale(y[: cutoffs[i]], spec)
    return SeriesScale(loc, scale)


@dataclass
class TrainingRows:
    columns: dict[str, np.ndarray]  # feature columns (numeric, then static)
    target: np.ndarray
    series: np.ndarray  # which series each row belongs to

    @property
    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.columns)

    def numeric(self, names: Sequence[str]) -> np.ndarray:
        return np.column_stack([self.columns[n] for n in names])


def _blocks(series: np.ndarray) -> dict[int, slice]:
    """Each series' run of rows (:func:`training_rows` keeps a series' rows together)."""
    if not len(series):
        return {}
    edges = np.flatnonzero(np.diff(series)) + 1
    starts = [0, *edges.tolist()]
    ends = [*edges.tolist(), len(series)]
    return {int(series[a]): slice(a, b) for a, b in zip(starts, ends, strict=True)}


class RowsAtCut:
    """Every series' scale and training rows at one set of cutoffs, built once and handed
    out per group, so that the lag methods of a backtest window (own, pooled, global) and
    the final refits share them instead of each building the same rows."""

    def __init__(self, panel: Panel, spec: FeatureSpec, members: Sequence[int],
                 cutoffs: np.ndarray, horizon: int) -> None:
        self.panel, self.spec, self.members = panel, spec, list(members)
        self.cutoffs, self.horizon = cutoffs, horizon
        self.scales = series_scales(panel, spec, cutoffs)
        self._rows: TrainingRows | None = None
        self._blocks: dict[int, slice] = {}

    def rows(self, group: Sequence[int], spec: FeatureSpec) -> TrainingRows:
        """``training_rows(panel, spec, group, ...)`` at these cutoffs (the group's rows
        in its order); ``spec`` is this one or one with fewer segment keys (an own
        model's, without any)."""
        if self._rows is None:
            self._rows = training_rows(self.panel, self.spec, self.members, self.cutoffs,
                                       self.scales, self.horizon)
            self._blocks = _blocks(self._rows.series)
        rows, blocks = self._rows, self._blocks
        names = spec.numeric_names() + [c for c in self.panel.key_columns if c in spec.static]
        parts = [blocks[i] for i in group if i in blocks]
        if len(parts) == len(blocks) and all(
                a.stop == b.start for a, b in zip(parts, parts[1:], strict=False)):
            return TrainingRows({n: rows.columns[n] for n in names}, rows.target, rows.series)
        if len(parts) == 1:
            (one,) = parts
            return TrainingRows({n: rows.columns[n][one] for n in names}, rows.target[one],
                                rows.series[one])
        at = (np.concatenate([np.arange(p.start, p.stop) for p in parts]) if parts
              else np.empty(0, dtype=np.int64))
        return TrainingRows({n: rows.columns[n][at] for n in names}, rows.target[at],
                            rows.series[at])


def training_rows(panel: Panel, spec: FeatureSpec, members: Sequence[int], cutoffs: np.ndarray,
                  scales: SeriesScale, horizon: int = 1) -> TrainingRows:
    """Feature rows of ``members`` with target positions before each one's cutoff.

    Recursive: one row per target position, its features those of the position itself.
    Direct (``spec.direct``): for every step ``1..horizon``, one row per origin whose
    step lands before the cutoff, with the origin's lag features, the target period's
    calendar and known-future values, and the step number. Rows come series by series
    (then step, then origin).

    The members' transformed series are laid end to end and every row's features taken
    in one call of :func:`lag_matrix`: a row starts ``spec.window`` periods into its
    series, so its lags never reach into the series before it.
    """
    names = spec.numeric_names() + [c for c in panel.key_columns if c in spec.static]
    start = spec.window + spec.differences
    used = [i for i in members if int(cutoffs[i]) - start >= 1]
    if not used:
        return TrainingRows({n: np.empty(0) for n in names}, np.empty(0), np.empty(0, int))
    lengths = np.asarray([int(cutoffs[i]) for i in used], dtype=np.int64)
    z = np.concatenate([transform(panel.y[i][:c], spec, scales.loc[i], scales.scale[i])
                        for i, c in zip(used, lengths.tolist(), strict=True)])
    counts = lengths - start
    owner = np.repeat(np.arange(len(used)), counts)  # each row's series, by its place in used
    first_row = np.cumsum(counts) - counts
    local = np.arange(int(counts.sum())) - first_row[owner] + start  # position in its series
    origins = (np.cumsum(lengths) - lengths)[owner] + local  # position in z
    at_origin = lag_matrix(z, spec, origins)
    times = _joined_times(panel, used, lengths) if spec.calendar else None
    covariates = {name: np.concatenate([panel.covariates[name][i][:c] for i, c in
                                        zip(used, lengths.tolist(), strict=True)])
                  for name in spec.known_future}
    steps = range(1, horizon + 1) if spec.direct else range(1, 2)
    parts: list[dict[str, np.ndarray]] = []
    targets, owners = [], []
    for step in steps:
        lands = local + (step - 1) < lengths[owner]  # the step lands before the cutoff
        rows = origins[lands] + (step - 1)  # the target positions, in z
        cols = {k: v[lands] for k, v in at_origin.items()}
        if times is not None:
            cols.update(calendar_values(times[rows], spec.calendar, spec.season_length))
        for name in spec.known_future:
            cols[name] = covariates[name][rows]
        if spec.direct:
            cols["step"] = np.full(len(rows), float(step))
        keep = np.isfinite(z[rows])
        for values in cols.values():
            keep &= np.isfinite(values)
        # float32, as the ONNX models are fed: trees then split between values both see
        parts.append({k: v[keep].astype(np.float32).astype(np.float64) for k, v in cols.items()})
        targets.append(z[rows][keep])
        owners.append(owner[lands][keep])
    if len(parts) == 1:
        columns, target, series = parts[0], targets[0], owners[0]
    else:  # series by series, then step: a stable sort keeps each step's origins in order
        series = np.concatenate(owners)
        order = np.argsort(series, kind="stable")
        series = series[order]
        columns = {k: np.concatenate([p[k] for p in parts])[order] for k in parts[0]}
        target = np.concatenate(targets)[order]
    for j, column in enumerate(panel.key_columns):
        if column in spec.static:
            texts = np.asarray([panel.key_texts[i][j] for i in used], dtype=object)
            columns[column] = texts[series]
    return TrainingRows({n: columns[n] for n in names}, target,
                        np.asarray(used, dtype=np.int64)[series])


def _joined_times(panel: Panel, used: list[int], lengths: np.ndarray) -> pd.Index:
    """The periods of the used series before their cutoffs, laid end to end as their
    values are."""
    pieces = [panel.times[i][:c] for i, c in zip(used, lengths.tolist(), strict=True)]
    return pieces[0].append(pieces[1:]) if len(pieces) > 1 else pieces[0]


def tails_at(panel: Panel, members: Sequence[int], cutoffs: np.ndarray, length: int) -> np.ndarray:
    """The last ``length`` raw values before each member's cutoff (NaN-padded on the left)."""
    out = np.full((len(members), length), np.nan)
    for r, i in enumerate(members):
        c = int(cutoffs[i])
        tail = panel.y[i][max(c - length, 0): c]
        if len(tail):
            out[r, length - len(tail):] = tail
    return out
