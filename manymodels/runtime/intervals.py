"""Prediction intervals of a forecasting bundle: conformal bands around the point forecasts.

Training stores, per level and horizon step, a quantile of the backtest errors divided
by each series' scale, and every series' scale (:func:`series_scale`); the runtime adds
``lo_<level>`` and ``hi_<level>`` = forecast ∓ quantile × scale as one step after the
point forecasts, so every serving path gets the same bands from the same numbers. Like
the rest of ``runtime`` this imports only numpy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Bands", "band_names", "series_scale"]


def series_scale(y: np.ndarray, season_length: int) -> float:
    """A series' error scale: its mean absolute seasonal difference (lag 1 when it has
    too few periods or its seasons repeat exactly), 0 for a constant series."""
    y = np.asarray(y, dtype=np.float64)
    y = y[np.isfinite(y)]
    for lag in (season_length, 1):
        if lag >= 1 and len(y) > lag:
            value = float(np.mean(np.abs(y[lag:] - y[:-lag])))
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

    @classmethod
    def from_section(cls, section: Mapping[str, Any], season_length: int) -> Bands | None:
        """The bands of a manifest's ``forecast`` section (``None`` without intervals)."""
        raw = section.get("intervals")
        scales = section.get("series", {}).get("interval_scale")
        if not isinstance(raw, Mapping) or scales is None or not raw.get("levels"):
            return None
        levels = tuple(int(v) for v in raw["levels"])
        quantiles = np.asarray([raw["quantiles"][str(v)] for v in levels], dtype=np.float64)
        return cls(levels, quantiles, np.asarray(scales, dtype=np.float64), season_length)

    @property
    def names(self) -> list[str]:
        return band_names(self.levels)

    def half_widths(self, h: int) -> np.ndarray:
        """(levels, h) quantiles; steps past the calibrated horizon grow with the square
        root of the step, as a random walk's errors do."""
        calibrated = self.quantiles.shape[1]
        if h <= calibrated:
            return self.quantiles[:, :h]
        steps = np.arange(calibrated + 1, h + 1, dtype=np.float64)
        grown = self.quantiles[:, -1:] * np.sqrt(steps / calibrated)[None, :]
        return np.concatenate([self.quantiles, grown], axis=1)

    def scales_of(self, rows: Sequence[int], tails: np.ndarray) -> np.ndarray:
        """Scales of the forecast rows: stored for known series (``rows[r] >= 0``), from
        the tail a new series was sent with otherwise."""
        out = np.empty(len(rows))
        for r, row in enumerate(rows):
            out[r] = self.scales[row] if row >= 0 else series_scale(tails[r], self.season_length)
        return np.where(np.isfinite(out) & (out > 0), out, 0.0)

    def apply(self, values: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
        """``lo_<level>``/``hi_<level>`` arrays shaped like ``values`` (series, steps)."""
        widths = self.half_widths(values.shape[1])
        out: dict[str, np.ndarray] = {}
        for j, level in enumerate(self.levels):
            half = scales[:, None] * widths[j][None, :]
            out[f"lo_{level}"] = values - half
            out[f"hi_{level}"] = values + half
        return out
