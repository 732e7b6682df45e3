"""Fit, select and export one model: the unit of work every worker runs.

A :class:`FitJob` is one model to produce: a segment's own model, a pooled model of a
coarser level, or the global model. The worker fits every candidate on the training
rows, scores it on the holdout rows, refits the best on all rows and exports it to ONNX
(falling back to the next-best candidate that converts and passes the parity check).
It returns the ONNX bytes rather than writing into the run directory, so it runs the
same on a local process pool and on a remote Dask worker, and only the parent writes.
"""

from __future__ import annotations

import math
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sklearn
from sklearn.pipeline import Pipeline

from manymodels.candidates import (
    Candidate,
    build_estimator,
    build_prep,
    higher_is_better,
    predict_with,
    score_metric,
)
from manymodels.errors import ExportError, TrainingError
from manymodels.monitor.drift import numeric_bins
from manymodels.segment import FeatureSet, fingerprint, kfold_assignment
from manymodels.specs import TrainerSpec

__all__ = ["FitContext", "FitJob", "FitResult", "feature_stats", "run_chunk", "run_job"]


@dataclass
class FitContext:
    """What every job of a run shares (sent once per chunk)."""

    trainer: TrainerSpec
    candidates: list[Candidate]
    metadata: dict[str, str]


@dataclass
class FitJob:
    """One model to select, fit and export."""

    name: str
    level: int
    key: dict[str, str]
    frame: pd.DataFrame
    holdout: np.ndarray
    features: FeatureSet
    segment_of_row: np.ndarray | None = None  # for pooled models: segment index per row

    @property
    def cost(self) -> int:
        return len(self.frame)


@dataclass
class FitResult:
    """What came out of one job, successful or not."""

    name: str
    level: int
    key: dict[str, str]
    status: str = "ok"
    reason: str = ""
    rows: int = 0
    train_rows: int = 0
    holdout_rows: int = 0
    candidates: dict[str, float] = field(default_factory=dict)
    candidate_errors: dict[str, str] = field(default_factory=dict)
    winner: str = ""
    algorithm: str = ""
    metric: float = float("nan")
    runner_up: str = ""
    runner_up_metric: float = float("nan")
    export_notes: list[str] = field(default_factory=list)
    holdout_prediction: np.ndarray | None = None
    holdout_proba: np.ndarray | None = None
    classes: list[Any] | None = None
    onnx: bytes | None = None
    export: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    feature_stats: dict[str, Any] = field(default_factory=dict)
    #: Training medians of the numeric features (``missing: impute``), else empty.
    impute: dict[str, float] = field(default_factory=dict)
    fit_seconds: float = 0.0
    export_seconds: float = 0.0


def feature_stats(frame: pd.DataFrame, features: FeatureSet) -> dict[str, Any]:
    """Per-feature quantiles, bins and category frequencies, for drift checks
    (``manymodels monitor`` computes PSI on the bins)."""
    stats: dict[str, Any] = {}
    qs = [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0]
    for column in features.numeric:
        values = frame[column].to_numpy(dtype=float)
        finite = values[np.isfinite(values)]
        stats[column] = {"quantiles": dict(zip(map(str, qs), np.quantile(finite, qs).tolist(),
                                               strict=True)) if len(finite) else {},
                         "null_fraction": float(1 - len(finite) / max(len(values), 1)),
                         "bins": numeric_bins(finite)}
    for column in features.categorical:
        freq = frame[column].value_counts(normalize=True).head(20)
        stats[column] = {"frequencies": {str(k): float(v) for k, v in freq.items()}}
    return stats


def _check_learnable(y: np.ndarray, task: str) -> None:
    first = y[0].item() if isinstance(y[0], np.generic) else y[0]  # 3.0, not np.float64(3.0)
    if task == "regression":
        if np.nanstd(y.astype(float)) == 0:
            raise TrainingError(f"target is constant ({first!r} in all {len(y)} training rows): "
                                "nothing to learn; the fallback model serves this segment")
    elif len(pd.unique(y)) < 2:
        raise TrainingError(f"only one class ({first!r}) in {len(y)} training rows; "
                            "the fallback model serves this segment")


def _folds(job: FitJob, trainer: TrainerSpec) -> list[np.ndarray]:
    """Holdout masks to score candidates on: one holdout, or k folds for kfold."""
    if trainer.validation.method != "kfold" or job.segment_of_row is not None:
        return [job.holdout]
    fold_of = kfold_assignment(len(job.frame), trainer.validation.folds, trainer.seed, job.key)
    return [fold_of == f for f in range(trainer.validation.folds)]


@dataclass
class _Scored:
    candidate: Candidate
    metric: float
    prediction: np.ndarray
    proba: np.ndarray | None
    classes: np.ndarray | None


def _score_candidates(job: FitJob, ctx: FitContext, masks: list[np.ndarray],
                      result: FitResult, started: float) -> list[_Scored]:
    """Fit every candidate on the training rows of each split and score the held-out rows.

    The preprocessing is fitted once per split and its output shared by all candidates:
    it is the same for every candidate, and refitting it per candidate was most of the
    per-segment cost on small segments.
    """
    trainer = ctx.trainer
    x = job.frame[job.features.columns]
    y = job.frame[trainer.target].to_numpy()
    values: dict[str, list[float]] = {c.label: [] for c in ctx.candidates}
    first: dict[str, tuple[np.ndarray, np.ndarray | None, np.ndarray | None]] = {}
    for mask in masks:
        prep = build_prep(job.features.numeric, job.features.categorical)
        train_x = prep.fit_transform(x[~mask])
        test_x = prep.transform(x[mask])
        for candidate in ctx.candidates:
            if candidate.label in result.candidate_errors:
                continue
            if time.perf_counter() - started > trainer.segment_timeout_s:
                raise TrainingError(f"timeout: over {trainer.segment_timeout_s:g} s while "
                                    f"fitting '{candidate.label}'")
            try:
                model = build_estimator(candidate, trainer.task, trainer.seed)
                model.fit(train_x, y[~mask])
                prediction, proba, classes = predict_with(model, test_x, trainer.task)
                values[candidate.label].append(
                    score_metric(trainer.metric, y[mask], prediction, proba, classes))
            except Exception as exc:  # one candidate failing must not fail the segment
                result.candidate_errors[candidate.label] = f"{type(exc).__name__}: {exc}"
                continue
            first.setdefault(candidate.label, (prediction, proba, classes))
    return [_Scored(c, float(np.mean(values[c.label])), *first[c.label])
            for c in ctx.candidates if c.label not in result.candidate_errors]


def _rank(scored: list[_Scored], metric: str) -> list[_Scored]:
    sign = -1.0 if higher_is_better(metric) else 1.0

    def key(s: _Scored) -> tuple[int, float]:
        bad = s.metric is None or math.isnan(s.metric)
        return (1 if bad else 0, 0.0 if bad else sign * s.metric)

    return sorted(scored, key=key)


def _export_best(ranked: list[_Scored], job: FitJob, ctx: FitContext, result: FitResult) -> _Scored:
    """Refit candidates on all rows in rank order until one exports and passes parity."""
    from manymodels.export import export_model  # import here: heavy, and only workers need it

    trainer = ctx.trainer
    x = job.frame[job.features.columns]
    y = job.frame[trainer.target].to_numpy()
    holdout_x = x[job.holdout] if job.holdout.any() else x.head(50)
    prep = build_prep(job.features.numeric, job.features.categorical).fit(x)
    all_x = prep.transform(x)
    with tempfile.TemporaryDirectory(prefix="mm-export-") as tmp:
        for scored in ranked:
            model = build_estimator(scored.candidate, trainer.task, trainer.seed).fit(all_x, y)
            pipe = Pipeline([("prep", prep), ("model", model)])
            metadata = {**ctx.metadata, **_job_metadata(job, scored, result)}
            try:
                exported = export_model(
                    pipe, name=job.name, numeric=job.features.numeric,
                    categorical=job.features.categorical, task=trainer.task,
                    check_frame=holdout_x, metadata=metadata,
                    tolerance=trainer.parity_tolerance, path=Path(tmp) / f"{job.name}.onnx")
            except ExportError as exc:
                result.export_notes.append(f"{scored.candidate.label}: {exc}")
                continue
            result.onnx = exported.path.read_bytes()
            result.export = {"sha256": exported.sha256, "bytes": exported.bytes,
                             "inputs": exported.inputs, "output": exported.output,
                             "parity": exported.parity,
                             "accepts_missing": exported.accepts_missing}
            return scored
    raise ExportError(f"model '{job.name}': no candidate exported and passed the parity check: "
                      + "; ".join(result.export_notes))


def _job_metadata(job: FitJob, scored: _Scored, result: FitResult) -> dict[str, str]:
    return {
        "name": job.name,
        "segment_key": ",".join(f"{k}={v}" for k, v in job.key.items()) or "(global)",
        "level": str(job.level),
        "algorithm": scored.candidate.algorithm,
        "candidate": scored.candidate.label,
        "metric_value": repr(scored.metric),
        "rows": str(result.rows),
        "fit_seconds": f"{result.fit_seconds:.4f}",
        "fingerprint": result.fingerprint,
        **{f"key.{k}": v for k, v in job.key.items()},
    }


def run_job(job: FitJob, ctx: FitContext) -> FitResult:
    """Select, refit and export one model; never raises: failures are recorded."""
    started = time.perf_counter()
    trainer = ctx.trainer
    result = FitResult(job.name, job.level, dict(job.key), rows=len(job.frame),
                       holdout_rows=int(job.holdout.sum()),
                       train_rows=int((~job.holdout).sum()))
    try:
        result.fingerprint = fingerprint(job.frame)
        if trainer.missing == "impute":
            job, result.impute = _imputed(job)
        y = job.frame[trainer.target].to_numpy()
        _check_learnable(y[~job.holdout], trainer.task)
        masks = _folds(job, trainer)
        scored = _score_candidates(job, ctx, masks, result, started)
        if not scored:
            raise TrainingError("every candidate failed: " + "; ".join(
                f"{k}: {v}" for k, v in result.candidate_errors.items()))
        ranked = _rank(scored, trainer.metric)
        result.candidates = {s.candidate.label: s.metric for s in ranked}
        result.fit_seconds = time.perf_counter() - started
        export_started = time.perf_counter()
        chosen = _export_best(ranked, job, ctx, result)
        result.export_seconds = time.perf_counter() - export_started
        others = [s for s in ranked if s is not chosen]
        result.winner, result.algorithm = chosen.candidate.label, chosen.candidate.algorithm
        result.metric = chosen.metric
        if others:
            result.runner_up, result.runner_up_metric = others[0].candidate.label, others[0].metric
        result.holdout_prediction, result.holdout_proba = chosen.prediction, chosen.proba
        result.classes = None if chosen.classes is None else list(chosen.classes)
        result.feature_stats = feature_stats(job.frame, job.features)
    except Exception as exc:
        result.status = "failed"
        result.reason = str(exc) if isinstance(exc, (TrainingError, ExportError)) else (
            f"{type(exc).__name__}: {exc} | {traceback.format_exc(limit=2).splitlines()[-1]}")
        result.fit_seconds = time.perf_counter() - started
    return result


def _imputed(job: FitJob) -> tuple[FitJob, dict[str, float]]:
    """The job with missing numeric features filled by their training medians (what the
    runtime fills at scoring time), and those medians."""
    numeric = job.features.numeric
    medians = {}
    for column in numeric:
        values = job.frame[column].to_numpy(dtype=np.float64)
        finite = values[np.isfinite(values)]
        medians[column] = float(np.median(finite)) if len(finite) else 0.0
    frame = job.frame.fillna(medians) if numeric else job.frame
    return FitJob(job.name, job.level, job.key, frame, job.holdout, job.features,
                  job.segment_of_row), medians


def run_chunk(jobs: list[FitJob], ctx: FitContext) -> list[FitResult]:
    """Run several small jobs in one task, so tiny segments don't flood the scheduler.

    scikit-learn's parameter validation is skipped inside: the parameters come from a
    validated spec, and on 100-row segments the validation costs more than the fits.
    Its finiteness scan is skipped for jobs whose features were checked once here.
    """
    results = []
    with sklearn.config_context(skip_parameter_validation=True):
        for job in jobs:
            with sklearn.config_context(assume_finite=_all_finite(job)):
                results.append(run_job(job, ctx))
    return results


def _all_finite(job: FitJob) -> bool:
    """One cheap NaN/inf scan per job lets scikit-learn skip its own scan on every call."""
    if not job.features.numeric:
        return True
    values = job.frame[job.features.numeric].to_numpy(dtype=np.float64)
    return bool(np.isfinite(values).all())
