"""Candidate models: scikit-learn pipelines built from a trainer spec, and their metrics.

Preprocessing is part of every candidate's pipeline (scaling for numeric columns,
one-hot for categorical ones), so the exported ONNX model takes raw columns.

scikit-learn is imported where an estimator or a classification metric is built, not
with this module: the parent process of a run (training's gate, ``manymodels retrain``
planning and comparing, reports) uses the specs and regression metrics only, and
importing scikit-learn is a large share of a command's start-up.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sklearn.base import BaseEstimator
    from sklearn.compose import ColumnTransformer
    from sklearn.pipeline import Pipeline

from manymodels.errors import SpecError
from manymodels.monitor.accuracy import higher_is_better, label_metric
from manymodels.specs import TrainerSpec

__all__ = [
    "Candidate",
    "boosting_prefixes",
    "build_candidates",
    "build_estimator",
    "build_pipeline",
    "build_prep",
    "higher_is_better",
    "predict_with",
    "score_metric",
]


@dataclass(frozen=True)
class Candidate:
    """One grid point of one candidate family: enough to build a fresh pipeline."""

    label: str
    algorithm: str
    params: dict[str, Any]
    min_rows: int = 0  # segments with fewer rows do not fit this candidate


def _estimator(algorithm: str, task: str, params: dict[str, Any], seed: int) -> BaseEstimator:
    regression = task == "regression"
    if algorithm == "lightgbm":
        # LightGBM: imported where a booster is built or converted
        import lightgbm as lgb

        base = {"n_estimators": 50, "num_leaves": 15, "learning_rate": 0.1, "min_child_samples": 5,
                "random_state": seed, "n_jobs": 1, "verbose": -1}
        cls = lgb.LGBMRegressor if regression else lgb.LGBMClassifier
        return cls(**{**base, **params})
    # scikit-learn: imported where an estimator is built, not by every command
    from sklearn.dummy import DummyClassifier, DummyRegressor
    from sklearn.ensemble import (
        HistGradientBoostingClassifier,
        HistGradientBoostingRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
    )
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

    factories: dict[str, Callable[..., BaseEstimator]] = {
        "ridge": Ridge,
        "logistic": lambda **p: LogisticRegression(**{"max_iter": 500, **p}),
        "decision_tree": lambda **p: (DecisionTreeRegressor if regression else DecisionTreeClassifier)(
            **{"random_state": seed, "max_depth": 6, **p}),
        "random_forest": lambda **p: (RandomForestRegressor if regression else RandomForestClassifier)(
            **{"random_state": seed, "n_estimators": 50, "max_depth": 8, "n_jobs": 1, **p}),
        "hist_gradient_boosting": lambda **p: (
            HistGradientBoostingRegressor if regression else HistGradientBoostingClassifier)(
            **{"random_state": seed, **p}),
        "mean": lambda **p: (DummyRegressor(strategy="mean") if regression
                             else DummyClassifier(strategy="prior")),
    }
    try:
        return factories[algorithm](**params)
    except TypeError as exc:
        raise SpecError(f"candidate '{algorithm}': bad params {params}: {exc}") from None


def build_prep(numeric: list[str], categorical: list[str]) -> ColumnTransformer:
    """Column preprocessing shared by every candidate: scale numbers, one-hot categories.

    Every candidate of a segment gets the same preprocessing, so the trainer fits it once
    per split and reuses the transformed arrays for all candidates.
    """
    # scikit-learn: imported where an estimator is built, not by every command
    from sklearn.compose import ColumnTransformer
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    transformers: list[tuple[str, Any, list[str]]] = []
    if numeric:
        transformers.append(("num", StandardScaler(), list(numeric)))
    if categorical:
        transformers.append(("cat", OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                             list(categorical)))
    return ColumnTransformer(transformers, remainder="drop")


def build_estimator(candidate: Candidate, task: str, seed: int) -> BaseEstimator:
    """A fresh, unfitted estimator for ``candidate``."""
    return _estimator(candidate.algorithm, task, candidate.params, seed)


def build_pipeline(candidate: Candidate, numeric: list[str], categorical: list[str], task: str,
                   seed: int) -> Pipeline:
    """A fresh, unfitted pipeline: column preprocessing then the estimator."""
    # scikit-learn: imported where an estimator is built, not by every command
    from sklearn.pipeline import Pipeline

    return Pipeline([("prep", build_prep(numeric, categorical)),
                     ("model", build_estimator(candidate, task, seed))])


def build_candidates(spec: TrainerSpec) -> list[Candidate]:
    """Every grid point of every candidate family in the spec, labels unique."""
    out: list[Candidate] = []
    seen: set[str] = set()
    for family in spec.candidates:
        for label, params in family.expand():
            if label in seen:
                raise SpecError(f"trainer '{spec.name}': candidate label '{label}' appears twice; "
                                f"give the candidates distinct names")
            seen.add(label)
            out.append(Candidate(label, family.algorithm, params, family.resolved_min_rows))
    return out


def score_metric(metric: str, y_true: np.ndarray, prediction: np.ndarray,
                 proba: np.ndarray | None = None, classes: np.ndarray | None = None) -> float:
    """Compute ``metric``; probabilities are needed for logloss and auc."""
    y_true = np.asarray(y_true)
    if metric in ("rmse", "mae", "wape", "mape"):
        return label_metric(metric, y_true, prediction)  # the same figure monitor computes
    # scikit-learn: imported where an estimator is built, not by every command
    from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

    if metric == "accuracy":
        return float(accuracy_score(y_true, prediction))
    if proba is None or classes is None:
        raise SpecError(f"metric '{metric}' needs class probabilities")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if metric == "logloss":
            return float(log_loss(y_true, proba, labels=list(classes)))
        if len(np.unique(y_true)) < 2:
            return float("nan")
        if proba.shape[1] == 2:
            return float(roc_auc_score(y_true == classes[1], proba[:, 1]))
        return float(roc_auc_score(y_true, proba, multi_class="ovr", labels=list(classes)))


def predict_with(pipeline: Any, frame: Any, task: str, trees: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Predictions, class probabilities (classification) and the class order.

    ``trees``: score a LightGBM model with its first ``trees`` boosting rounds only
    (see :func:`boosting_prefixes`).
    """
    extra = {} if trees is None else {"num_iteration": trees}
    prediction = pipeline.predict(frame, **extra)
    if task == "classification":
        return prediction, pipeline.predict_proba(frame, **extra), pipeline.classes_
    return prediction, None, None


#: LightGBM parameters under which the first k rounds of a longer run are not exactly a
#: k-round model (DART rescales earlier trees; early stopping ends the run itself).
_NOT_PREFIX_SAFE = ("boosting_type", "boosting", "early_stopping_round", "early_stopping_rounds",
                    "n_iter_no_change", "callbacks")


def boosting_prefixes(candidates: list[Candidate]) -> dict[str, tuple[str, int]]:
    """For LightGBM candidates that differ only in ``n_estimators``: label -> (label of
    the longest one, its own number of rounds).

    Gradient boosting adds one tree per round and never changes earlier ones, so a
    k-round model is exactly the first k rounds of the same run taken further: fitting
    the 80-round candidate once and scoring it at 40 rounds gives the 40-round
    candidate's predictions without fitting it (validation only; the winner is refitted
    on its own for export). Candidates not listed are fitted on their own.
    """
    groups: dict[str, list[tuple[int, Candidate]]] = {}
    for candidate in candidates:
        params = candidate.params
        if candidate.algorithm != "lightgbm" or any(k in params for k in _NOT_PREFIX_SAFE):
            continue
        rest = {k: v for k, v in params.items() if k != "n_estimators"}
        key = json.dumps(rest, sort_keys=True, default=str)
        groups.setdefault(key, []).append((int(params.get("n_estimators", 50)), candidate))
    out: dict[str, tuple[str, int]] = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        host = max(members, key=lambda m: m[0])[1]
        for rounds, candidate in members:
            out[candidate.label] = (host.label, rounds)
    return out
