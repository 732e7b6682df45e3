"""Lag models: one pipeline per pool of series (pooled, global) or per series (own).

The pipelines are the trainer's ordinary candidates (scaling, one-hot, ridge or
LightGBM), so they export to ONNX like every other model; only the rows differ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from manymodels.candidates import Candidate, build_pipeline
from manymodels.engine import free_threads
from manymodels.forecast.features import SeriesScale, TrainingRows, tails_at, training_rows
from manymodels.forecast.panel import Panel
from manymodels.runtime.forecast import (
    FeatureSpec,
    OnnxSteps,
    Predict,
    calendar_rows,
    forecast_steps,
)

__all__ = ["LagMethod", "OwnLinear", "fit_own_linear", "fit_pipeline", "forecast_with",
           "native_predict", "own_linear_predict", "solve_own_linear"]


@dataclass(frozen=True)
class LagMethod:
    """A lag learner at one level: ``own:ridge``, ``brand:lightgbm``, ``global:ridge``."""

    label: str
    level: int
    candidate: Candidate
    columns: tuple[str, ...]  # the level's key columns (empty: global)

    @property
    def own(self) -> bool:
        return self.level == 0

    def features(self, spec: FeatureSpec) -> FeatureSpec:
        """The panel's feature spec as this method sees it: an own model sees no segment
        columns (they are constant within a series)."""
        return replace(spec, static=()) if self.own else spec


def fit_pipeline(rows: TrainingRows, candidate: Candidate, spec: FeatureSpec, seed: int,
                 threads: int = 1) -> Any:
    """A fitted pipeline on ``rows`` (numeric features scaled, static keys one-hot).

    A LightGBM whose candidate does not set ``n_jobs`` gets up to ``threads`` threads
    (the caller's cores when no worker process runs beside it), as many as are free
    when the fit starts (:func:`~manymodels.engine.free_threads`): on busy cores, threads
    waiting for each other slow a fit by orders of magnitude. The number of threads moves
    a fit's histogram sums by rounding only (docs/design/performance.md).
    """
    numeric = spec.numeric_names()
    categorical = [c for c in rows.frame.columns if c not in numeric]
    pipeline = build_pipeline(candidate, numeric, categorical, "regression", seed)
    if candidate.algorithm == "lightgbm":
        # trees need no scaling, and a scaler computed in float32 by ONNX moves lag values
        # across split thresholds, compounding over the horizon: keep the values as they are
        from sklearn.preprocessing import StandardScaler

        pipeline.set_params(prep__num=StandardScaler(with_mean=False, with_std=False))
        if threads > 1 and "n_jobs" not in candidate.params:
            pipeline.set_params(model__n_jobs=free_threads(threads))
    pipeline.fit(rows.frame[numeric + categorical], rows.target)
    return pipeline


def native_predict(pipeline: Any) -> Predict:
    """A batched :data:`Predict` over a fitted pipeline (one DataFrame per step).

    A pipeline whose preprocessing is one ``StandardScaler`` on numeric columns (an own
    series' model) is scored on a plain array through the scaler's fitted ``mean_`` and
    ``scale_`` and the estimator's own ``predict``: the same arithmetic as
    ``ColumnTransformer.transform``, without its per-call DataFrame handling, which
    dominates a recursion that calls it once per step and series.
    """
    prep = pipeline.named_steps["prep"]
    model = pipeline.named_steps["model"]
    columns = [c for _, _, cols in prep.transformers_ for c in (cols if isinstance(cols, list) else [])]
    scaler = _only_scaler(prep)
    if scaler is not None:
        mean, scale = getattr(scaler, "mean_", None), getattr(scaler, "scale_", None)

        def predict_array(feed: Mapping[str, np.ndarray]) -> np.ndarray:
            x = np.column_stack([_as_fed(feed[c]) for c in columns]).astype(np.float64)
            if mean is not None:
                x -= mean
            if scale is not None:
                x /= scale
            return np.asarray(model.predict(x), dtype=np.float64).ravel()

        return predict_array

    def predict(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        # the values the ONNX model is fed: float32 numbers (see training_rows)
        frame = pd.DataFrame({c: _as_fed(feed[c]) for c in columns})
        return np.asarray(model.predict(prep.transform(frame)), dtype=np.float64).ravel()

    return predict


def _only_scaler(prep: Any) -> Any:
    """The ``StandardScaler`` when it is the only transformer that outputs anything."""
    from sklearn.preprocessing import StandardScaler  # fitted pipelines imported it already

    live = [(t, cols) for name, t, cols in prep.transformers_
            if t != "drop" and not (name == "remainder" and not len(cols))]
    if len(live) == 1 and type(live[0][0]) is StandardScaler:
        return live[0][0]
    return None


@dataclass(frozen=True)
class OwnLinear:
    """An own series' ``StandardScaler`` + ``Ridge``, solved: the scaler's ``mean`` and
    ``scale`` (population, 1 where a feature is constant) and the ridge's ``coef`` on the
    scaled features with its ``intercept``."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float

    def folded(self) -> tuple[np.ndarray, float]:
        """The same map on raw features: weights and bias."""
        return self.coef / self.scale, self.intercept - float(np.sum(self.coef * self.mean
                                                                       / self.scale))


def solve_own_linear(rows: TrainingRows, candidate: Candidate, spec: FeatureSpec) -> OwnLinear:
    """The closed form of exactly the exported pipeline (population scale, centred ridge
    with an unpenalised intercept), solved directly.

    A backtest fits one per series and window, and the final fit one per series, where
    scikit-learn's per-call validation costs more than the solve; the tests check it
    against scikit-learn's pipeline.
    """
    x = rows.numeric(spec.numeric_names())
    y = rows.target
    alpha = float(candidate.params.get("alpha", 1.0))
    mean = x.mean(axis=0)
    sd = x.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    xs = (x - mean) / sd
    y_mean = float(y.mean())
    gram = xs.T @ xs + alpha * np.eye(x.shape[1])
    beta = np.linalg.solve(gram, xs.T @ (y - y_mean))
    return OwnLinear(mean, sd, beta, y_mean)


def fit_own_linear(rows: TrainingRows, candidate: Candidate, spec: FeatureSpec
                   ) -> tuple[np.ndarray, float]:
    """:func:`solve_own_linear` as one linear map on raw features (weights, bias)."""
    return solve_own_linear(rows, candidate, spec).folded()


def _as_fed(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values)
    return arr.astype(np.float32).astype(np.float64) if arr.dtype.kind == "f" else arr


def own_linear_predict(fits: Sequence[tuple[np.ndarray, float]], spec: FeatureSpec) -> Predict:
    """One :data:`Predict` for many own linear models, row r scored by model r.

    A scaler followed by ridge is one linear map per series, so the batch of series is
    scored with one multiply instead of a pipeline call per series and step. A direct
    forecast sends ``h`` consecutive rows per series (series-major).
    """
    names = spec.numeric_names()
    weights = np.stack([w for w, _ in fits]) if fits else np.zeros((0, len(names)))
    bias = np.asarray([b for _, b in fits], dtype=np.float64)

    def predict(feed: Mapping[str, np.ndarray]) -> np.ndarray:
        x = np.column_stack([np.asarray(feed[n], dtype=np.float64) for n in names])
        per = x.shape[0] // max(len(bias), 1)  # a direct forecast: h rows per series
        if per == 1:
            return np.einsum("ij,ij->i", x, weights) + bias
        return np.einsum("ij,ij->i", x, np.repeat(weights, per, axis=0)) + np.repeat(bias, per)

    return predict


def forecast_with(predict: Predict | OnnxSteps, panel: Panel, spec: FeatureSpec, members: Sequence[int],
                  cutoffs: np.ndarray, scales: SeriesScale, h: int) -> np.ndarray:
    """``h``-step forecasts of ``members`` from their cutoffs, (n, h), by the spec's
    strategy (recursive or direct)."""
    members = list(members)
    tails = tails_at(panel, members, cutoffs, spec.tail_length)
    calendar = calendar_rows([panel.times[i][int(cutoffs[i]) - 1] for i in members],
                             panel.freq, h, spec.calendar, spec.season_length)
    future = {name: np.stack([_ahead(panel.covariates[name][i], int(cutoffs[i]), h)
                              for i in members]) for name in spec.known_future}
    static = {c: np.asarray([panel.key_texts[i][j] for i in members], dtype=object)
              for j, c in enumerate(panel.key_columns) if c in spec.static}
    idx = np.asarray(members, dtype=np.int64)
    return forecast_steps(predict, tails, scales.loc[idx], scales.scale[idx], spec, h,
                              calendar, future, static)


def _ahead(values: np.ndarray, cutoff: int, h: int) -> np.ndarray:
    out = np.full(h, np.nan)
    part = values[cutoff: cutoff + h]
    out[: len(part)] = part
    return out


def rows_for(panel: Panel, spec: FeatureSpec, members: Sequence[int], cutoffs: np.ndarray,
             scales: SeriesScale) -> TrainingRows:
    return training_rows(panel, spec, members, cutoffs, scales)
