"""Population stability index (PSI) per model and feature, on bins stored at training.

Why not a drift library: evidently, frouros and nannyml need the raw reference data (a
bundle keeps none, and thousands of small models would need thousands of copies) or
pull in dozens of packages; alibi-detect is BSL-licensed, whylogs' vendor stopped. PSI on
a few bins per feature needs numpy alone and a few hundred bytes per model in the
manifest, which training writes anyway (:func:`numeric_bins`).

Bins: numeric features get up to ten bins cut at the training deciles (ties merged, so a
0/1 feature gets two), with the share of training rows in each; categorical features
use the stored category frequencies plus one bin for every other category.

The threshold accounts for sample size. Under "no drift", PSI is approximately
``(1/n + 1/m) · χ²(k − 1)`` for ``n`` live rows, ``m`` training rows and ``k`` bins
(Yurdakul & Naranjo, 2020), so small segments see large PSI from noise alone: a fixed
0.2 cut flags most of them. A feature drifts when its PSI exceeds both the conventional
``floor`` (0.2: "significant") and the χ² critical value at ``alpha``; below
``min_rows`` live rows no verdict is given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["BIN_QUANTILES", "Bins", "DriftVerdict", "bins_of", "categorical_counts",
           "chi2_quantile", "drift_threshold", "judge", "numeric_bins", "numeric_counts",
           "psi"]

#: Training deciles where numeric bins are cut.
BIN_QUANTILES = tuple(q / 10 for q in range(1, 10))
#: Nominal mass between the stored quantile points (manifests written before bins).
_LEGACY_POINTS = (0.05, 0.25, 0.5, 0.75, 0.95)
OTHER = "__other__"


def numeric_bins(values: np.ndarray) -> dict[str, list[float]] | None:
    """Bins of a numeric training column: interior edges and the share of rows per bin.

    Bin ``i`` holds values in ``[edges[i-1], edges[i])`` (the first from −∞, the last to
    +∞), so values beyond the training range land in the outer bins. Values are binned
    as the float32 the models take (:func:`_as_model_input`), so a training value and
    the same value sent as JSON text fall in the same bin.
    """
    finite = _as_model_input(values)
    if not len(finite):
        return None
    edges = np.unique(np.quantile(finite, BIN_QUANTILES))
    counts = np.bincount(np.searchsorted(edges, finite, side="right"),
                         minlength=len(edges) + 1)
    return {"edges": edges.tolist(), "fractions": (counts / len(finite)).tolist()}


def _as_model_input(values: Any) -> np.ndarray:
    """Finite values as the float32 a model is fed, widened back to float64."""
    with np.errstate(over="ignore", invalid="ignore"):
        as32 = np.asarray(values, dtype=float).astype(np.float32).astype(float)
    return as32[np.isfinite(as32)]


@dataclass(frozen=True)
class Bins:
    """The reference distribution of one feature."""

    kind: str  # "numeric" or "categorical"
    fractions: np.ndarray
    edges: np.ndarray | None = None
    categories: tuple[str, ...] = ()


def bins_of(stats: Mapping[str, Any]) -> Bins | None:
    """The reference bins of one feature's manifest statistics (``None``: none stored)."""
    if "bins" in stats and stats["bins"]:
        b = stats["bins"]
        return Bins("numeric", np.asarray(b["fractions"], dtype=float),
                    np.asarray(b["edges"], dtype=float))
    if stats.get("quantiles"):  # older manifests: quantile points with their nominal mass
        q = stats["quantiles"]
        points = [float(q[str(p)]) for p in _LEGACY_POINTS if str(p) in q]
        if len(points) != len(_LEGACY_POINTS):
            return None
        masses = np.diff([0.0, *_LEGACY_POINTS, 1.0])
        edges: list[float] = []
        fractions = [float(masses[0])]
        for point, mass in zip(points, masses[1:], strict=True):
            if edges and point == edges[-1]:
                fractions[-1] += float(mass)  # tied quantiles: one bin
            else:
                edges.append(point)
                fractions.append(float(mass))
        return Bins("numeric", np.asarray(fractions), np.asarray(edges))
    if "frequencies" in stats:
        freq = {str(k): float(v) for k, v in stats["frequencies"].items()}
        rest = max(0.0, 1.0 - sum(freq.values()))
        return Bins("categorical", np.asarray([*freq.values(), rest]),
                    categories=tuple(freq))
    return None


def numeric_counts(bins: Bins, values: np.ndarray) -> np.ndarray:
    """Live rows per bin (nulls and non-finite values are left out)."""
    assert bins.edges is not None
    finite = _as_model_input(values)
    return np.bincount(np.searchsorted(bins.edges, finite, side="right"),
                       minlength=len(bins.edges) + 1)


def categorical_counts(bins: Bins, values: Sequence[Any]) -> np.ndarray:
    """Live rows per category bin; unseen categories count in the last ("other") bin."""
    index = {c: i for i, c in enumerate(bins.categories)}
    counts = np.zeros(len(bins.categories) + 1, dtype=np.int64)
    for v in values:
        if v is not None:
            counts[index.get(str(v), len(bins.categories))] += 1
    return counts


def psi(expected: np.ndarray, observed: np.ndarray, reference_rows: int) -> float:
    """PSI between reference shares ``expected`` (from ``reference_rows`` rows) and live
    counts ``observed``; half a row is added to every bin of both, so an empty bin
    gives a finite, small-sample-consistent value instead of infinity."""
    n = float(observed.sum())
    k = len(expected)
    p = (expected * reference_rows + 0.5) / (reference_rows + 0.5 * k)
    q = (observed + 0.5) / (n + 0.5 * k)
    return float(np.sum((q - p) * np.log(q / p)))


def chi2_quantile(p: float, df: int) -> float:
    """Quantile ``p`` of χ²(df), Wilson–Hilferty (within 1% for df ≥ 2 at p ≤ 0.999)."""
    if df <= 0:
        return 0.0
    z = NormalDist().inv_cdf(p)
    h = 2.0 / (9.0 * df)
    return float(df * max(0.0, 1.0 - h + z * math.sqrt(h)) ** 3)


def drift_threshold(live_rows: int, reference_rows: int, bins: int, alpha: float = 0.01,
                    floor: float = 0.2) -> float:
    """The PSI above which a feature drifts, for these sample sizes."""
    noise = (1.0 / max(live_rows, 1) + 1.0 / max(reference_rows, 1)) \
        * chi2_quantile(1.0 - alpha, bins - 1)
    return max(floor, noise)


@dataclass(frozen=True)
class DriftVerdict:
    """Drift of one feature of one model."""

    model: str
    feature: str
    rows: int
    psi: float | None
    threshold: float | None
    verdict: str  # "drift", "ok", "too few rows", "no reference"

    @property
    def alarm(self) -> bool:
        return self.verdict == "drift"


def judge(model: str, feature: str, stats: Mapping[str, Any] | None, values: Any,
          reference_rows: int, min_rows: int = 30, alpha: float = 0.01,
          floor: float = 0.2) -> DriftVerdict:
    """The drift verdict of one feature's live ``values`` against its manifest ``stats``."""
    bins = bins_of(stats) if stats else None
    if bins is None or reference_rows <= 0:
        return DriftVerdict(model, feature, len(values), None, None, "no reference")
    if bins.kind == "numeric":
        counts = numeric_counts(bins, values)
    else:
        counts = categorical_counts(bins, values)
    rows = int(counts.sum())
    used = int(np.count_nonzero((bins.fractions > 0) | (counts > 0)))
    threshold = drift_threshold(rows, reference_rows, max(used, 2), alpha, floor)
    if rows < min_rows:
        return DriftVerdict(model, feature, rows, None, threshold, "too few rows")
    value = psi(bins.fractions, counts, reference_rows)
    return DriftVerdict(model, feature, rows, value, threshold,
                        "drift" if value > threshold else "ok")
