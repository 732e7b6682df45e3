"""Prediction intervals of a forecasting bundle: conformal bands around the point forecasts.

Training stores, per level and horizon step, a quantile of the backtest errors divided
by each series' scale, and every series' scale (:func:`series_scale`); the runtime adds
``lo_<level>`` and ``hi_<level>`` = forecast ∓ quantile × scale as one step after the
point forecasts, so every serving path gets the same bands from the same numbers. Like
the rest of ``runtime`` this imports only numpy.

Non-negative series (sales: no value below zero in their training history, see
:func:`is_nonnegative`) get forecasts and lower bounds clipped at zero
(:func:`floor_at_zero`, :meth:`Bands.apply`), on every path alike.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SCALE_SEASONS", "Bands", "band_names", "floor_at_zero", "interval_scale",
           "is_nonnegative", "length_bucket", "nonnegative_rows", "recent_periods",
           "series_scale", "thin_scale"]

#: Seasons of seasonal differences (one period each without a season) a series' interval
#: scale is taken over: its recent changes, not its whole history's.
SCALE_SEASONS = 3


def is_nonnegative(y: np.ndarray) -> bool:
    """Whether a history holds no value below zero (its forecasts are then clipped at 0)."""
    y = np.asarray(y, dtype=np.float64)
    return bool(np.all(y[np.isfinite(y)] >= 0))


def nonnegative_rows(stored: np.ndarray, rows: Sequence[int], keys: Sequence[tuple[str, ...]],
                     below: Collection[tuple[str, ...]]) -> np.ndarray:
    """Which forecast rows to clip at 0: a stored series (``rows[r] >= 0``) by its training
    history (``stored``), a new one by the history it was sent with, and neither when the
    history sent with the call has a value below zero (``below``: those series' keys).
    Reconciled levels clip before they are added up, so they still add up."""
    out = np.asarray([bool(stored[r]) if r >= 0 else True for r in rows], dtype=bool)
    if below:
        out &= np.asarray([key not in below for key in keys], dtype=bool)
    return out


def floor_at_zero(values: np.ndarray, nonnegative: np.ndarray) -> np.ndarray:
    """Forecasts (series, steps) with the rows of non-negative series clipped at 0."""
    if not nonnegative.any():
        return values
    return np.where(nonnegative[:, None], np.maximum(values, 0.0), values)


def series_scale(y: np.ndarray, season_length: int) -> float:
    """A series' error scale: its mean absolute seasonal difference (lag 1 when it has
    too few periods or its seasons repeat exactly), 0 for a constant series."""
    return _scale_of_finite(_finite(y), season_length)


def interval_scale(y: np.ndarray, season_length: int) -> float:
    """The unit of a series' interval widths: :func:`series_scale` of its last
    ``SCALE_SEASONS + 1`` seasons (periods without a season), so that a series whose
    changes grew or shrank over its history gets bands of its present size; chosen over
    the whole history on the tuning panels (``benchmarks/forecast_intervals.py``)."""
    return _scale_of_finite(recent_periods(_finite(y), season_length), season_length)


def recent_periods(y: np.ndarray, season_length: int) -> np.ndarray:
    """The last ``SCALE_SEASONS + 1`` seasons of ``y`` (periods without a season): what
    :func:`interval_scale` measures a series' changes over."""
    return y[-(SCALE_SEASONS + 1) * max(int(season_length), 1):]


def thin_scale(y: np.ndarray, scale: float, ratio: float | None) -> float:
    """``scale``, or for a series of one or two equal periods (no change to measure, and
    too few periods to call it constant) ``ratio`` (the panel's median scale over mean
    absolute value) times its mean absolute value: zero-wide bands would claim a
    certainty one period cannot give."""
    y = _finite(y)
    if scale == 0 and ratio and 0 < len(y) < 3 and np.any(y != 0):
        return float(ratio) * float(np.mean(np.abs(y)))
    return scale


def length_bucket(lengths: np.ndarray, periods: np.ndarray) -> np.ndarray:
    """Index of the largest of the ascending ``lengths`` at most each of ``periods``
    (-1 below the first)."""
    return np.searchsorted(np.asarray(lengths), np.asarray(periods), side="right") - 1


def _finite(y: np.ndarray) -> np.ndarray:
    """A series' values without the gaps (a stored tail is padded on the left)."""
    y = np.asarray(y, dtype=np.float64)
    finite = np.isfinite(y)
    return y if finite.all() else y[finite]


def _scale_of_finite(y: np.ndarray, season_length: int) -> float:
    for lag in (season_length, 1):
        if lag >= 1 and len(y) > lag:
            diffs = np.abs(y[lag:] - y[:-lag])
            # np.mean's bits without its Python wrapper: one call per series and window
            value = float(np.add.reduce(diffs) / diffs.size)
            if value > 0:
                return value
    return 0.0


def band_names(levels: Sequence[int]) -> list[str]:
    """The interval columns, in output order: ``lo_80, hi_80, lo_95, hi_95``."""
    return [name for level in levels for name in (f"lo_{level}", f"hi_{level}")]


@dataclass(frozen=True)
class Bands:
    """Calibrated interval half-widths: a quantile per level and step, a scale per series."""

    levels: tuple[int, ...]
    quantiles: np.ndarray  # (levels, calibrated steps), in units of a series' scale
    scales: np.ndarray  # (series,), the bundle's series in manifest order
    season_length: int
    #: Quantiles of the series too short for a backtest window (``short``), if any.
    short_quantiles: np.ndarray | None = None
    short: np.ndarray | None = None  # (series,) bool
    #: Quantiles of a new series sent with history (``new``), by how many periods it sent:
    #: (lengths, levels, steps) for the ascending ``new_lengths``.
    new_lengths: np.ndarray | None = None
    new_quantiles: np.ndarray | None = None
    #: The panel's median scale over mean absolute value (:func:`thin_scale`).
    level_ratio: float | None = None

    @classmethod
    def from_section(cls, section: Mapping[str, Any], season_length: int) -> Bands | None:
        """The bands of a manifest's ``forecast`` section (``None`` without intervals)."""
        raw = section.get("intervals")
        series = section.get("series", {})
        scales = series.get("interval_scale")
        if not isinstance(raw, Mapping) or scales is None or not raw.get("levels"):
            return None
        levels = tuple(int(v) for v in raw["levels"])
        quantiles = np.asarray([raw["quantiles"][str(v)] for v in levels], dtype=np.float64)
        group, flags = raw.get("short"), series.get("interval_short")
        short_quantiles = short = None
        if isinstance(group, Mapping) and flags is not None:  # a retrain's kept series: None
            short_quantiles = np.asarray([group["quantiles"][str(v)] for v in levels],
                                         dtype=np.float64)
            short = np.asarray([bool(f) for f in flags], dtype=bool)
        new, new_lengths, new_quantiles, ratio = raw.get("new"), None, None, None
        if isinstance(new, Mapping):  # bundles trained before it: the panel's quantiles
            new_lengths = np.asarray(new["lengths"], dtype=np.int64)
            new_quantiles = np.asarray([new["quantiles"][str(v)] for v in levels],
                                       dtype=np.float64).transpose(1, 0, 2)
            ratio = new.get("level_ratio")
        return cls(levels, quantiles, np.asarray(scales, dtype=np.float64), season_length,
                   short_quantiles, short, new_lengths, new_quantiles, ratio)

    @property
    def names(self) -> list[str]:
        return band_names(self.levels)

    def half_widths(self, h: int, quantiles: np.ndarray | None = None) -> np.ndarray:
        """(levels, h) quantiles (the panel's unless others are given); steps past the
        calibrated horizon grow with the square root of the step, as a random walk's
        errors do."""
        q = self.quantiles if quantiles is None else quantiles
        calibrated = q.shape[1]
        if h <= calibrated:
            return q[:, :h]
        steps = np.arange(calibrated + 1, h + 1, dtype=np.float64)
        grown = q[:, -1:] * np.sqrt(steps / calibrated)[None, :]
        return np.concatenate([q, grown], axis=1)

    def short_rows(self, rows: Sequence[int]) -> np.ndarray | None:
        """Which forecast rows are stored series that take the ``short`` quantiles (``None``
        when none do); a new series sent with history takes the ``new`` ones
        (:meth:`new_rows`)."""
        if self.short is None or self.short_quantiles is None:
            return None
        index = np.asarray(rows, dtype=np.int64)
        out = np.zeros(index.size, dtype=bool)
        stored = index >= 0
        out[stored] = self.short[index[stored]]
        return out if out.any() else None

    def new_rows(self, rows: Sequence[int], tails: np.ndarray,
                 sent: Mapping[int, np.ndarray] | None = None) -> np.ndarray | None:
        """Per forecast row, which of the ``new`` quantiles a new series takes (by the
        periods it was ``sent``, by row; else those of its tail), -1 for a stored series;
        ``None`` when no row takes them."""
        if self.new_lengths is None or self.new_quantiles is None:
            return None
        index = np.asarray(rows, dtype=np.int64)
        fresh = np.flatnonzero(index < 0)
        if not fresh.size:
            return None
        sent = sent or {}
        periods = np.asarray([len(sent[r]) if r in sent else int(np.isfinite(tails[r]).sum())
                              for r in fresh.tolist()], dtype=np.int64)
        out = np.full(index.size, -1, dtype=np.int64)
        out[fresh] = np.maximum(length_bucket(self.new_lengths, periods), 0)
        return out

    def scales_of(self, rows: Sequence[int], tails: np.ndarray,
                  sent: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
        """Scales of the forecast rows: stored for known series (``rows[r] >= 0``), from
        the history a new series was ``sent`` with (by row; else its tail) otherwise, as
        a stored series' from its training periods."""
        out = np.empty(len(rows))
        sent = sent or {}
        for r, row in enumerate(rows):
            if row >= 0:
                out[r] = self.scales[row]
                continue
            y = sent.get(r, tails[r])
            out[r] = thin_scale(y, interval_scale(y, self.season_length), self.level_ratio)
        return np.where(np.isfinite(out) & (out > 0), out, 0.0)

    def apply(self, values: np.ndarray, scales: np.ndarray,
              nonnegative: np.ndarray | None = None, short: np.ndarray | None = None,
              new: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``lo_<level>``/``hi_<level>`` arrays shaped like ``values`` (series, steps);
        lower bounds of ``nonnegative`` series stop at 0 where their forecast is not below
        it (a reconciled forecast may be, and its bounds must still hold it); ``short``
        rows (:meth:`short_rows`) take the ``short`` quantiles, ``new`` rows
        (:meth:`new_rows`) the ``new`` quantiles of their length."""
        h = values.shape[1]
        widths = self.half_widths(h)[:, None, :]  # levels, rows, steps
        if short is not None and self.short_quantiles is not None:
            widths = np.where(short[None, :, None],
                              self.half_widths(h, self.short_quantiles)[:, None, :], widths)
        if new is not None and self.new_quantiles is not None:
            by_length = np.stack([self.half_widths(h, q) for q in self.new_quantiles])
            picked = by_length[np.maximum(new, 0)].transpose(1, 0, 2)  # levels, rows, steps
            widths = np.where((new >= 0)[None, :, None], picked, widths)
        floor = None
        if nonnegative is not None and nonnegative.any():
            floor = nonnegative[:, None] & (values >= 0)
        out: dict[str, np.ndarray] = {}
        for j, level in enumerate(self.levels):
            half = scales[:, None] * widths[j]
            lo = values - half
            out[f"lo_{level}"] = lo if floor is None else np.where(floor, np.maximum(lo, 0.0), lo)
            out[f"hi_{level}"] = values + half
        return out
