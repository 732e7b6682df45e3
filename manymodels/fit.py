"""Fit, select and export one model: the unit of work every worker runs.

A :class:`FitJob` is one model to produce: a segment's own model, a pooled model of a
coarser level, or the global model. The worker fits every candidate on the training
rows of each validation fold (:mod:`validation`), scores it on the fold's holdout rows,
picks the winner by the selection rule (:mod:`selection`), refits it on all rows and
exports it to ONNX (falling back to the next candidate that converts and passes the
parity check).
It returns the ONNX bytes rather than writing into the run directory, so it runs the
same on a local process pool and on a remote Dask worker, and only the parent writes.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.candidates import (
    Candidate,
    boosting_prefixes,
    build_estimator,
    build_prep,
    higher_is_better,
    predict_with,
    score_metric,
)
from manymodels.errors import ExportError, TrainingError
from manymodels.monitor.drift import numeric_bins
from manymodels.results import FitResult
from manymodels.runtime.manifest import ACCEPTS_MISSING_BY_DEFAULT
from manymodels.segment import FeatureSet, fingerprint
from manymodels.selection import SIMPLICITY, FoldScores, pick
from manymodels.specs import TrainerSpec
from manymodels.validation import fold_masks

__all__ = ["FitContext", "FitJob", "FitResult", "feature_stats", "run_chunk", "run_job",
           "warm_worker"]


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
    #: Validation fold of each row (-1: never held out; see :mod:`validation`); None
    #: means one fold, the ``holdout`` rows.
    block: np.ndarray | None = None
    #: Folds expand in time: fold j trains only on blocks < j (else on every other block).
    expanding: bool = False

    @property
    def cost(self) -> int:
        return len(self.frame)

    @property
    def fold_block(self) -> np.ndarray:
        if self.block is not None:
            return self.block
        return np.where(self.holdout, 0, -1).astype(np.int16)


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


class NothingToLearn(TrainingError):
    """A classification segment whose rows hold one class: a fact of the data, not a
    failure; its fallback serves it (status ``constant``, outside the failure budget)."""


def _check_learnable(y: np.ndarray, task: str) -> None:
    first = y[0].item() if isinstance(y[0], np.generic) else y[0]  # 3.0, not np.float64(3.0)
    if task == "regression":
        if np.nanstd(y.astype(float)) == 0:
            raise TrainingError(f"target is constant ({first!r} in all {len(y)} training "
                                "rows): nothing to learn; the fallback model serves this "
                                "segment")
    elif len(pd.unique(y)) < 2:
        raise NothingToLearn(f"only one class ({first!r}) in {len(y)} training rows; "
                             "the fallback model serves this segment")


def _folds(job: FitJob, trainer: TrainerSpec, y: np.ndarray
           ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The job's validation folds; for classification only folds that train on 2+ classes."""
    folds = fold_masks(job.fold_block, job.expanding)
    if trainer.task == "classification":
        folds = [f for f in folds if len(pd.unique(y[f[1]])) >= 2]
    if not folds:
        raise TrainingError(f"no validation fold fits in {len(y)} rows; the fallback model "
                            f"serves this segment")
    return folds


@dataclass
class _Scored:
    candidate: Candidate
    scores: FoldScores
    prediction: np.ndarray  # out-of-fold, one per held-out row (in row order)
    proba: np.ndarray | None
    classes: np.ndarray | None

    @property
    def metric(self) -> float:
        return self.scores.mean


def _eligible(ctx: FitContext, rows: int, result: FitResult) -> list[Candidate]:
    """Candidates whose ``min_rows`` the job meets; the others are recorded as skipped."""
    out = []
    for candidate in ctx.candidates:
        if rows < candidate.min_rows:
            reason = f"{rows} rows < min_rows={candidate.min_rows}"
            result.candidate_folds[candidate.label] = {"skipped": reason}
        else:
            out.append(candidate)
    if not out:
        raise TrainingError(f"every candidate needs more than {rows} rows (min_rows); the "
                            f"fallback model serves this segment")
    return out


def _score_candidates(job: FitJob, ctx: FitContext, result: FitResult,
                      started: float, among: set[str] | None = None) -> list[_Scored]:
    """Fit every candidate on the training rows of each fold and score the held-out rows.

    The preprocessing is fitted once per fold and its output shared by all candidates:
    it is the same for every candidate, and refitting it per candidate was most of the
    per-segment cost on small segments. Each held-out row is predicted by the models of
    its fold only (out-of-fold predictions), which the level gate compares later.
    ``among`` limits the candidates to those labels.
    """
    trainer = ctx.trainer
    x = job.frame[job.features.columns]
    y = job.frame[trainer.target].to_numpy()
    candidates = _eligible(ctx, len(y), result)
    if among is not None:
        candidates = [c for c in candidates if c.label in among]
        if not candidates:
            return []
    folds = _folds(job, trainer, y)
    tested = job.fold_block >= 0
    position = np.cumsum(tested) - 1  # row -> its index among the held-out rows
    classification = trainer.task == "classification"
    classes = np.unique(y) if classification else None
    values: dict[str, list[float]] = {c.label: [] for c in candidates}
    fold_ids: dict[str, list[int]] = {c.label: [] for c in candidates}  # to pair options
    oof: dict[str, np.ndarray] = {}
    oof_proba: dict[str, np.ndarray] = {}
    prefixes = boosting_prefixes(candidates)
    by_label = {c.label: c for c in candidates}
    for fold, train, test in folds:
        fitted: dict[str, Any] = {}  # this fold's models, by label
        prep = build_prep(job.features.numeric, job.features.categorical)
        train_x = prep.fit_transform(x[train])
        test_x = prep.transform(x[test])
        at = position[test]
        for candidate in candidates:
            if candidate.label in result.candidate_errors:
                continue
            if time.perf_counter() - started > trainer.segment_timeout_s:
                raise TrainingError(f"timeout: over {trainer.segment_timeout_s:g} s while "
                                    f"fitting '{candidate.label}'")
            try:
                model, trees = _fold_model(candidate, by_label, prefixes, fitted, train_x,
                                           y[train], trainer)
                prediction, proba, fold_classes = predict_with(model, test_x, trainer.task,
                                                               trees)
                if proba is not None and classes is not None and fold_classes is not None:
                    proba = _widen(proba, fold_classes, classes)
                values[candidate.label].append(
                    score_metric(trainer.metric, y[test], prediction, proba, classes))
                fold_ids[candidate.label].append(fold)
            except Exception as exc:  # one candidate failing must not fail the segment
                result.candidate_errors[candidate.label] = f"{type(exc).__name__}: {exc}"
                continue
            if candidate.label not in oof:
                oof[candidate.label] = (np.full(int(tested.sum()), None, dtype=object)
                                        if classification else np.full(int(tested.sum()), np.nan))
            oof[candidate.label][at] = prediction
            if proba is not None and classes is not None:
                if candidate.label not in oof_proba:
                    oof_proba[candidate.label] = np.full((int(tested.sum()), len(classes)), np.nan)
                oof_proba[candidate.label][at] = proba
    return [_Scored(c, FoldScores(tuple(values[c.label]), tuple(fold_ids[c.label])),
                    _as_labels(oof[c.label], y), oof_proba.get(c.label), classes)
            for c in candidates if c.label not in result.candidate_errors]


def _as_labels(predicted: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Out-of-fold labels in the target's own type (integer labels stay integers, so the
    gate's metrics compare like with like) once every held-out row has one."""
    if predicted.dtype == object and y.dtype != object and \
            not any(v is None for v in predicted.tolist()):
        return predicted.astype(y.dtype)
    return predicted


def _fold_model(candidate: Candidate, by_label: dict[str, Candidate],
                prefixes: dict[str, tuple[str, int]], fitted: dict[str, Any], x: Any,
                y: np.ndarray, trainer: TrainerSpec) -> tuple[Any, int | None]:
    """The fitted model that scores ``candidate`` on one fold, and how many boosting
    rounds of it to use (None: all): a LightGBM candidate that is a prefix of a longer
    one shares that one's fit (:func:`~manymodels.candidates.boosting_prefixes`)."""
    host_label, trees = prefixes.get(candidate.label, (candidate.label, None))
    if host_label not in fitted:
        model = build_estimator(by_label[host_label], trainer.task, trainer.seed)
        fitted[host_label] = model.fit(x, y)
    return fitted[host_label], trees


def _widen(proba: np.ndarray, fold_classes: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Probabilities over ``fold_classes`` as columns over all of the job's ``classes``
    (a fold may lack a class the whole segment has)."""
    if len(fold_classes) == len(classes) and (np.asarray(fold_classes) == classes).all():
        return proba
    out = np.zeros((len(proba), len(classes)))
    index = np.searchsorted(classes, fold_classes)
    out[:, index] = proba
    return out


def _rank(scored: list[_Scored], metric: str, rule: str = "best") -> tuple[list[_Scored], dict[str, Any]]:
    """Candidates in export order: the winner by ``rule``, then the rest best first.

    The one-SE rule sees the candidates simplest first (by algorithm, then as declared).
    """
    simplest_first = sorted(scored, key=lambda s: SIMPLICITY.get(s.candidate.algorithm, 5))
    choice = pick([s.scores for s in simplest_first], metric, rule)
    sign = -1.0 if higher_is_better(metric) else 1.0

    def key(s: _Scored) -> tuple[int, float]:
        bad = s.metric is None or math.isnan(s.metric)
        return (1 if bad else 0, 0.0 if bad else sign * s.metric)

    by_metric = sorted(scored, key=key)
    if choice.index is None:
        return by_metric, {"rule": rule}
    winner = simplest_first[choice.index]
    assert choice.best is not None
    info = {"rule": rule, "best": simplest_first[choice.best].candidate.label,
            "margin_se": choice.margin_se}
    return [winner, *(s for s in by_metric if s is not winner)], info


def _export_best(ranked: list[_Scored], job: FitJob, ctx: FitContext, result: FitResult,
                 filled: tuple[FitJob, dict[str, float]] | None = None) -> _Scored:
    """Refit candidates on all rows in rank order until one exports and passes parity.

    With ``filled`` (the job with its gaps filled by the training medians, and those
    medians), candidates that cannot take missing values are refitted on it, and the
    medians are recorded when one of them is exported.
    """
    # scikit-learn: imported where an estimator is built, not by every command
    from sklearn.pipeline import Pipeline

    from manymodels.export import export_model  # import here: heavy, and only workers need it

    trainer = ctx.trainer
    y = job.frame[trainer.target].to_numpy()
    prepared: dict[bool, tuple[Any, Any, Any]] = {}

    def fitted_prep(imputed: bool) -> tuple[Any, Any, Any]:
        """The preprocessing fitted on all rows, those rows transformed, holdout rows."""
        if imputed not in prepared:
            frame = filled[0].frame if imputed and filled is not None else job.frame
            x = frame[job.features.columns]
            holdout_x = x[job.holdout] if job.holdout.any() else x.head(50)
            if len(holdout_x) > 5000:  # plenty for a parity check, and cheap for the global
                holdout_x = holdout_x.iloc[-5000:]
            prep = build_prep(job.features.numeric, job.features.categorical).fit(x)
            prepared[imputed] = (prep, prep.transform(x), holdout_x)
        return prepared[imputed]

    with tempfile.TemporaryDirectory(prefix="mm-export-") as tmp:
        for scored in ranked:
            imputed = filled is not None and scored.candidate.algorithm not in TAKES_MISSING
            prep, all_x, holdout_x = fitted_prep(imputed)
            model = build_estimator(scored.candidate, trainer.task, trainer.seed).fit(all_x, y)
            pipe = Pipeline([("prep", prep), ("model", model)])
            metadata = {**ctx.metadata, **_job_metadata(job, scored, result)}
            try:
                exported = export_model(
                    pipe, name=job.name, numeric=job.features.numeric,
                    categorical=job.features.categorical, task=trainer.task,
                    check_frame=holdout_x, metadata=metadata,
                    tolerance=trainer.parity_tolerance, path=Path(tmp) / f"{job.name}.onnx",
                    sync=False)  # a temp file, read back at once
            except ExportError as exc:
                result.export_notes.append(f"{scored.candidate.label}: {exc}")
                continue
            result.onnx = exported.path.read_bytes()
            result.export = {"sha256": exported.sha256, "bytes": exported.bytes,
                             "inputs": exported.inputs, "output": exported.output,
                             "parity": exported.parity,
                             "accepts_missing": exported.accepts_missing}
            if imputed and filled is not None:
                result.impute = filled[1]
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
        _check_learnable(y, trainer.task)
        filled: tuple[FitJob, dict[str, float]] | None = None
        if trainer.missing == "native" and not _all_finite(job):
            # candidates that cannot take NaN learn from the training medians (and the
            # runtime fills them in at scoring) instead of failing on the first gap
            filled = _imputed(job)
            native = {c.label for c in ctx.candidates if c.algorithm in TAKES_MISSING}
            scored = _score_candidates(job, ctx, result, started, native) + \
                _score_candidates(filled[0], ctx, result, started,
                                  {c.label for c in ctx.candidates} - native)
        else:
            scored = _score_candidates(job, ctx, result, started)
        if not scored:
            raise TrainingError("every candidate failed: " + "; ".join(
                f"{k}: {v}" for k, v in result.candidate_errors.items()))
        ranked, result.selection = _rank(scored, trainer.metric, trainer.selection)
        result.candidates = {s.candidate.label: s.metric for s in ranked}
        result.candidate_folds.update({s.candidate.label: s.scores.as_dict() for s in ranked})
        result.fit_seconds = time.perf_counter() - started
        export_started = time.perf_counter()
        chosen = _export_best(ranked, job, ctx, result, filled)
        result.export_seconds = time.perf_counter() - export_started
        others = [s for s in ranked if s is not chosen]
        result.winner, result.algorithm = chosen.candidate.label, chosen.candidate.algorithm
        result.metric = chosen.metric
        if others:
            result.runner_up, result.runner_up_metric = others[0].candidate.label, others[0].metric
        result.holdout_prediction, result.holdout_proba = chosen.prediction, chosen.proba
        result.holdout_fold = job.fold_block[job.fold_block >= 0]
        result.classes = None if chosen.classes is None else list(chosen.classes)
        result.feature_stats = feature_stats(job.frame, job.features)
    except NothingToLearn as exc:  # served by the fallback; not against the failure budget
        result.status = "constant"
        result.reason = str(exc)
        result.fit_seconds = time.perf_counter() - started
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
    import sklearn  # here: the parent of a run need not import it (see manymodels.candidates)

    results = []
    with sklearn.config_context(skip_parameter_validation=True):
        for job in jobs:
            with sklearn.config_context(assume_finite=_all_finite(job)):
                results.append(run_job(job, ctx))
    return results


#: Algorithms fitted on missing numeric values as they are under ``missing: native``
#: (their exported graphs were measured to route NaN as the native model does); the
#: others learn from the training medians when a segment's rows have gaps.
TAKES_MISSING = ACCEPTS_MISSING_BY_DEFAULT


def _all_finite(job: FitJob) -> bool:
    """One cheap NaN/inf scan per job lets scikit-learn skip its own scan on every call."""
    if not job.features.numeric:
        return True
    values = job.frame[job.features.numeric].to_numpy(dtype=np.float64)
    return bool(np.isfinite(values).all())


def warm_worker() -> int:
    """Import the training stack in a worker so its first real chunk starts at once."""
    import manymodels.export  # noqa: F401  heavy (onnx, skl2onnx); registers the converters

    return os.getpid()
