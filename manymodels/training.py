"""``manymodels train``: segment, fit candidates in parallel, gate by level, export, report.

Orchestrates :mod:`segment` (partition), :mod:`fit` (per-model work, run by
:mod:`engine` on local processes or Dask) and :mod:`export` (ONNX), then writes the run
directory: ``models/*.onnx``, ``manifest.json`` (the schema every scorer reads),
``report.parquet`` and the specs used. Only this process writes files, atomically.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import yaml

from manymodels._version import __version__
from manymodels.candidates import build_candidates, higher_is_better, score_metric
from manymodels.data import read_table
from manymodels.engine import (
    check_parallelism,
    chunk_jobs,
    default_jobs,
    run_chunks,
    start_workers,
)
from manymodels.errors import SpecError, TrainingError
from manymodels.fit import FitContext, FitJob, FitResult, run_chunk
from manymodels.forecast.train import train_forecast
from manymodels.io import manifest_json, swap_directory_into_place
from manymodels.runtime.manifest import MANIFEST_FILE, SCHEMA_VERSION
from manymodels.segment import (
    FeatureSet,
    Segment,
    Segmentation,
    check_table,
    fingerprints,
    model_name,
    partition,
    prepare_frame,
    resolve_features,
)
from manymodels.selection import (
    FoldScores,
    LevelChoice,
    blend_predictions,
    choose_level,
    choose_route,
    option_label,
)
from manymodels.specs import SegmenterSpec, TrainerSpec, load_segmenter, load_trainer, spec_hash
from manymodels.validation import FoldPlan, assign_folds, resolve_method

__all__ = ["CoarserModel", "PreparedData", "Reuse", "TrainResult", "choose_level", "coarser_models",
           "compared_metric", "prepare_data", "train"]


@dataclass
class TrainResult:
    """Where the run went and what it found."""

    run_id: str
    run_dir: Path
    report: pd.DataFrame
    summary: dict[str, Any]
    results: dict[str, FitResult] = field(repr=False, default_factory=dict)

    @property
    def failed_fraction(self) -> float:
        return float(self.summary["failed_fraction"])


def new_run_id() -> str:
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{now}-{uuid.uuid4().hex[:6]}"


# -- building jobs ----------------------------------------------------------------------------

def _segment_job(frame: pd.DataFrame, seg: Segment, features: FeatureSet, expanding: bool
                 ) -> FitJob:
    return FitJob(seg.name, 0, seg.key, frame.take(seg.rows).reset_index(drop=True),
                  seg.holdout, features, block=seg.block, expanding=expanding)


def _pooled_job(frame: pd.DataFrame, name: str, level: int, key: dict[str, str],
                members: list[tuple[int, Segment]], features: FeatureSet, columns: list[str],
                expanding: bool) -> FitJob:
    """A model over several segments; its folds are its members' folds side by side."""
    rows = np.concatenate([seg.rows for _, seg in members])
    holdout = np.concatenate([seg.holdout for _, seg in members])
    blocks = [seg.block for _, seg in members]
    block: np.ndarray | None = None
    if all(b is not None for b in blocks):
        block = np.concatenate(blocks)  # type: ignore[arg-type]
    owner = np.concatenate([np.full(len(seg.rows), i) for i, seg in members])
    return FitJob(name, level, key, frame.iloc[rows][columns].reset_index(drop=True), holdout,
                  features, segment_of_row=owner, block=block, expanding=expanding)


@dataclass(frozen=True)
class CoarserModel:
    """A model several segments share: the small-segment pool, a pool of a coarser level
    (e.g. one per brand) or the global model (level ``len(levels) - 1``, empty key)."""

    name: str
    level: int  # 0 for the small-segment pool, which stands in for its members' own models
    key: dict[str, str]
    members: list[int]  # indices into Segmentation.segments


def coarser_models(segmentation: Segmentation, segmenter: SegmenterSpec, trainer: TrainerSpec
                   ) -> list[CoarserModel]:
    """Every shared model a run trains and the segments whose rows it is fitted on.

    One definition for training and for ``manymodels retrain``, which refits a shared
    model only when enough of its members' rows changed.
    """
    policy = segmenter.small_segments
    indexed = list(enumerate(segmentation.segments))
    served = [i for i, s in indexed if not (s.small and policy == "skip")]
    small = [i for i, s in indexed if s.small]
    out: list[CoarserModel] = []
    if small and policy == "pool":
        name = f"{model_name(trainer.target, {})[:-len('__global')]}__small_pool"
        out.append(CoarserModel(name, 0, {}, small))
    for level, level_cols in enumerate(segmenter.resolved_levels[1:], start=1):
        groups: dict[tuple[str, ...], list[int]] = {}
        for i in served:
            key = segmentation.segments[i].key
            groups.setdefault(tuple(key[c] for c in level_cols), []).append(i)
        for values, members in groups.items():
            key = dict(zip(level_cols, values, strict=True))
            out.append(CoarserModel(model_name(trainer.target, key), level, key, members))
    return out


def _own_columns(features: FeatureSet, trainer: TrainerSpec) -> list[str]:
    """Columns of a segment's own job: its features, the target and the time column."""
    extra = [trainer.target] + ([trainer.time_column] if trainer.time_column else [])
    return list(dict.fromkeys(features.columns + extra))


def _build_jobs(frame: pd.DataFrame, segmentation: Segmentation, segmenter: SegmenterSpec,
                trainer: TrainerSpec, features: FeatureSet, expanding: bool = False,
                wanted: Callable[[str], bool] | None = None
                ) -> tuple[list[FitJob], dict[str, Any]]:
    """Jobs for every own model (those ``wanted``), the small-segment pool, each coarser
    level and the global."""
    seg_cols = segmentation.columns
    extra = [trainer.target] + ([trainer.time_column] if trainer.time_column else [])
    jobs: list[FitJob] = []
    layout: dict[str, Any] = {"pools": {}, "small_pool": None}
    own_frame = frame[_own_columns(features, trainer)]  # select columns once
    for seg in segmentation.trainable:
        if wanted is None or wanted(seg.name):
            jobs.append(_segment_job(own_frame, seg, features, expanding))
    segments = segmentation.segments
    cardinality = {c: int(frame[c].nunique()) for c in seg_cols}
    cap = segmenter.pooled_key_max_categories
    levels = segmenter.resolved_levels
    for shared in coarser_models(segmentation, segmenter, trainer):
        level_cols = levels[shared.level] if shared.level else []  # the small pool: []
        level_features = features.for_level(seg_cols, level_cols, cardinality, cap)
        cols = list(dict.fromkeys(level_features.columns + extra))
        members = [(i, segments[i]) for i in shared.members]
        jobs.append(_pooled_job(frame, shared.name, shared.level, shared.key, members,
                                level_features, cols, expanding))
        if shared.level == 0:
            layout["small_pool"] = shared.name
        else:
            layout["pools"][shared.name] = (shared.level, tuple(shared.key[c] for c in level_cols))
    return jobs, layout


# -- the gate -----------------------------------------------------------------------------------

def _holdout_slices(results: dict[str, FitResult], jobs: dict[str, FitJob]
                    ) -> dict[str, dict[int, np.ndarray]]:
    """For each pooled model: segment index -> positions within its holdout predictions.

    Only the segments a model covers are visited (a brand pool covers a third of the
    stores), so the cost is the number of holdout rows, not models × segments.
    """
    out: dict[str, dict[int, np.ndarray]] = {}
    for name, job in jobs.items():
        res = results.get(name)  # a retrain skips a shared model nothing needs
        if job.segment_of_row is None or res is None or res.status != "ok":
            continue
        owners = job.segment_of_row[job.holdout]
        order = np.argsort(owners, kind="stable")
        segments, starts = np.unique(owners[order], return_index=True)
        stops = [*starts[1:].tolist(), len(order)]
        out[name] = {int(i): order[a:b] for i, a, b in zip(segments, starts, stops, strict=True)}
    return out


@dataclass
class _SegmentEval:
    """Held-out truth, fold ids and each level's out-of-fold predictions for one segment."""

    truth: np.ndarray
    fold_of: np.ndarray
    predictions: dict[str, tuple[np.ndarray, np.ndarray | None]] = field(default_factory=dict)
    #: What the routing choice predicts on the held-out rows (blends mixed).
    routed: tuple[np.ndarray, np.ndarray | None] | None = None


def _evaluate_segments(frame: pd.DataFrame, segmentation: Segmentation, trainer: TrainerSpec,
                       results: dict[str, FitResult], jobs: dict[str, FitJob]
                       ) -> list[_SegmentEval]:
    slices = _holdout_slices(results, jobs)
    target = frame[trainer.target].to_numpy()
    evals = []
    for seg in segmentation.segments:
        block = seg.block if seg.block is not None else np.where(seg.holdout, 0, -1)
        ev = _SegmentEval(target[seg.rows][seg.holdout], np.asarray(block)[seg.holdout])
        own = results.get(seg.name)
        if own is not None and own.status == "ok" and own.holdout_prediction is not None:
            ev.predictions[seg.name] = (own.holdout_prediction, own.holdout_proba)
        evals.append(ev)
    # each pooled model hands its holdout predictions to the segments it covers: one pass
    # per model over its own segments, not every model checked for every segment
    for name, by_segment in slices.items():
        res = results[name]
        assert res.holdout_prediction is not None
        for i, positions in by_segment.items():
            proba = None if res.holdout_proba is None else res.holdout_proba[positions]
            evals[i].predictions[name] = (res.holdout_prediction[positions], proba)
    return evals


def _metric_of(trainer: TrainerSpec, truth: np.ndarray, pred: tuple[np.ndarray, np.ndarray | None],
               classes: list[Any] | None) -> float:
    if len(truth) == 0:
        return float("nan")
    cls = np.asarray(classes) if classes is not None else None
    return score_metric(trainer.metric, truth, pred[0], pred[1], cls)


# -- the run ------------------------------------------------------------------------------------

def _chain_for(seg: Segment, levels: list[list[str]], target: str) -> list[str]:
    """Names of the coarser models this segment falls back to, finest first."""
    return [model_name(target, {c: seg.key[c] for c in cols}) for cols in levels[1:]]


def _level_names(levels: list[list[str]]) -> list[str]:
    return ["own"] + ["pool"] * (len(levels) - 2) + ["global"]


def compared_metric(scores: FoldScores | None, expanding: bool) -> float | None:
    """The metric champion / challenger compares a segment's models on.

    With time-ordered folds (rolling, time) it is the latest fold's: the newest rows,
    which a model fitted on the previous data has not seen (when new data extends the
    old), and which the challenger's fold model predicted from earlier rows only. With
    shuffled folds there is no latest fold, so it is the mean over folds.
    """
    if scores is None or not scores.values:
        return None
    value = scores.values[-1] if expanding else scores.mean
    return float(value) if np.isfinite(value) else None


def _route_choice(seg: Segment, ev: _SegmentEval, names: list[str | None],
                  results: dict[str, FitResult], segmenter: SegmenterSpec, trainer: TrainerSpec,
                  routed: bool, gate: bool, classes: list[Any] | None) -> LevelChoice:
    """The level (or blend) serving one segment, with every option's fold scores."""
    preds: list[tuple[np.ndarray, np.ndarray | None] | None] = []
    for name in names:
        ok = name is not None and name in results and results[name].status == "ok"
        preds.append(ev.predictions.get(name) if ok and name is not None else None)
    if seg.small and segmenter.small_segments != "pool":
        preds[0] = None
    cls = np.asarray(classes) if classes is not None else None
    blend = (segmenter.blend and trainer.task == "regression" and not seg.small and gate
             and routed)
    choice = choose_route(ev.truth, ev.fold_of, preds, trainer.metric,
                          segmenter.gate_rule if gate else "one_se", segmenter.min_gain,
                          blend, cls)
    if not routed:  # served down the fallback chain: the first coarser model that exists
        choice = LevelChoice(next((i for i, p in enumerate(preds) if i > 0 and p is not None),
                                  None), scores=choice.scores)
    elif not gate:
        choice = LevelChoice(0 if preds[0] is not None else None, scores=choice.scores)
    if choice.level is not None:
        chosen = preds[choice.level]
        if choice.blend_with is not None:
            partner = preds[choice.blend_with]
            assert chosen is not None and partner is not None
            ev.routed = (blend_predictions(chosen[0], partner[0], choice.weight), None)
        else:
            ev.routed = chosen
    return choice


def _decide_routes(segmentation: Segmentation, segmenter: SegmenterSpec, trainer: TrainerSpec,
                   results: dict[str, FitResult], evals: list[_SegmentEval],
                   layout: dict[str, Any], gate: bool, expanding: bool = False
                   ) -> list[dict[str, Any]]:
    """One report row per segment, with the fold metrics at each level and the choice.

    ``metric_latest`` is the routed choice's :func:`compared_metric` (what a later
    ``manymodels retrain`` compares a challenger with).
    """
    rows = []
    levels = segmenter.resolved_levels
    level_names = _level_names(levels)
    classes = next((r.classes for r in results.values() if r.classes is not None), None)
    for seg, ev in zip(segmentation.segments, evals, strict=True):
        own_name = layout["small_pool"] if seg.small else seg.name
        names: list[str | None] = [own_name, *_chain_for(seg, levels, trainer.target)]
        own = results.get(seg.name)
        status = "ok" if own is not None and own.status == "ok" else (
            "small" if seg.small else "failed")
        if seg.small and segmenter.small_segments == "skip":
            status = "skipped"
        routed = status == "ok" or (status == "small" and segmenter.small_segments == "pool")
        choice = _route_choice(seg, ev, names, results, segmenter, trainer, routed, gate,
                               classes)
        chosen = choice.level
        scores = choice.scores
        blended = choice.blend_with is not None
        means = {label: score.mean for label, score in scores.items()}

        rows.append({
            **{f"key.{c}": seg.key[c] for c in segmentation.columns},
            "segment": seg.name, "status": status,
            "reason": own.reason if own is not None and own.status != "ok" else (
                f"{len(seg.rows)} rows < min_rows={segmenter.min_rows}" if seg.small else ""),
            "rows": int(len(seg.rows)), "holdout_rows": int(seg.holdout.sum()),
            "folds": int(len(np.unique(ev.fold_of))),
            "anomalies_removed": seg.anomalies_removed,
            "winner": own.winner if own is not None else "",
            "algorithm": own.algorithm if own is not None else "",
            "metric_own": means.get("own"), "runner_up": own.runner_up if own is not None else "",
            "runner_up_metric": own.runner_up_metric if own is not None else None,
            "metric_pool": means.get("pool") if len(levels) > 2 else None,
            "metric_global": means.get("global"),
            "level": ("blend" if blended else level_names[chosen])
            if chosen is not None and routed else "fallback",
            "model": names[chosen] if chosen is not None else None,
            "blend_with": names[choice.blend_with] if choice.blend_with is not None else None,
            "blend_weight": choice.weight if blended else None,
            "gate_margin_se": choice.margin_se,
            "routed": routed and chosen is not None,
            "metric_latest": compared_metric(scores.get(option_label(choice, len(names)) or ""),
                                             expanding),
            "fit_seconds": own.fit_seconds if own is not None else 0.0,
            "export_seconds": own.export_seconds if own is not None else 0.0,
            "parity": own.export.get("parity") if own is not None else None,
            "export_notes": "; ".join(own.export_notes) if own is not None else "",
            "candidates": json.dumps(own.candidates) if own is not None else "{}",
            "candidate_folds": json.dumps(_plain(own.candidate_folds)) if own is not None
            else "{}",
            "selection_margin_se": own.selection.get("margin_se") if own is not None else None,
            "level_folds": json.dumps(_plain({k: v.as_dict() for k, v in scores.items()})),
        })
    return rows


def _routed_metrics(trainer: TrainerSpec, segmentation: Segmentation, evals: list[_SegmentEval],
                    report: list[dict[str, Any]], results: dict[str, FitResult],
                    global_name: str) -> dict[str, float]:
    """Metric of the routed whole against global-only and own-only, on the same held-out
    rows of the validation folds (rows every variant predicted)."""
    classes = next((r.classes for r in results.values() if r.classes is not None), None)
    parts: dict[str, list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray | None]]]] = {
        "routed": [], "global_only": [], "own_only": []}
    for seg, ev in zip(segmentation.segments, evals, strict=True):
        own_pred = ev.predictions.get(seg.name)
        glob = ev.predictions.get(global_name)
        if own_pred is None or glob is None or len(ev.truth) == 0:
            continue  # compare like with like: only segments every variant can score
        routed = ev.routed or glob
        keep = np.asarray(pd.notna(own_pred[0]) & pd.notna(glob[0]) & pd.notna(routed[0]),
                          dtype=bool)
        if not keep.any():
            continue
        for label, variant in (("routed", routed), ("global_only", glob),
                               ("own_only", own_pred)):
            parts[label].append((ev.truth[keep], (
                variant[0][keep], None if variant[1] is None else variant[1][keep])))
    out = {}
    for label, items in parts.items():
        if not items:
            continue
        truth = np.concatenate([t for t, _ in items])
        pred = np.concatenate([p[0] for _, p in items])
        probas = [p[1] for _, p in items if p[1] is not None]
        proba: np.ndarray | None = np.concatenate(probas) if len(probas) == len(items) else None
        out[label] = _metric_of(trainer, truth, (pred, proba), classes)
    return out


def _model_entry(res: FitResult, trainer: TrainerSpec, seg_cols: list[str], job: FitJob
                 ) -> dict[str, Any]:
    return {
        "file": f"models/{res.name}.onnx", "sha256": res.export["sha256"],
        "bytes": res.export["bytes"], "level": res.level, "key": res.key,
        "algorithm": res.algorithm, "candidate": res.winner,
        "inputs": res.export["inputs"], "output": res.export["output"],
        "metrics": {trainer.metric: res.metric, "parity_max_abs_diff": res.export["parity"]},
        "rows": res.rows, "fingerprint": res.fingerprint, "feature_stats": res.feature_stats,
        "accepts_missing": bool(res.export.get("accepts_missing", False)),
        "impute": res.impute,
        "tags": {"algorithm": res.algorithm, "candidate": res.winner, "level": str(res.level),
                 **{f"key.{k}": v for k, v in res.key.items()}},
        "pooled_over": [c for c in seg_cols if c not in res.key] if job.segment_of_row is not None
        else [],
    }


def _staging_dir(final_dir: Path) -> Path:
    """A hidden sibling of the run directory; private until renamed into place."""
    return final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex[:6]}.tmp"


def _write_run(staging: Path, final_dir: Path, manifest: dict[str, Any], used: set[str],
               report: pd.DataFrame, segmenter: SegmenterSpec, trainer: TrainerSpec,
               overwrite: bool) -> None:
    """Finish the staged run and rename it into place.

    The ONNX files are already in ``staging/models`` (written as results arrived, while
    the workers were still busy); models the routing does not use are removed. A crash
    leaves no half-written run directory; with ``overwrite`` the old run is moved aside
    first and deleted only once the new one is in place. Plain writes suffice here: the
    directory is private until the rename.
    """
    for path in (staging / "models").glob("*.onnx"):
        if path.stem not in used:
            path.unlink()
    (staging / "specs").mkdir(exist_ok=True)
    (staging / "specs" / "segmenter.yaml").write_text(
        yaml.safe_dump(segmenter.model_dump(mode="json"), sort_keys=False))
    (staging / "specs" / "trainer.yaml").write_text(
        yaml.safe_dump(trainer.model_dump(mode="json"), sort_keys=False))
    report.to_parquet(staging / "report.parquet", index=False)
    (staging / MANIFEST_FILE).write_bytes(manifest_json(_plain(manifest)))
    if final_dir.exists() and not overwrite:
        raise SpecError(f"run directory {final_dir} already exists; choose another "
                        f"run id or pass overwrite")
    swap_directory_into_place(staging, final_dir)


def _plain(value: Any) -> Any:
    """JSON-ready value: numpy scalars become Python ones, NaN and infinities null.

    ``json.dumps`` would write NaN as the bare token ``NaN``, which is not JSON and breaks
    readers other than Python's.
    """
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):  # dates and timestamps of a time column
        return value.isoformat()
    return value


TRAINING_PACKAGES = ("scikit-learn", "lightgbm", "skl2onnx", "onnxmltools", "onnx", "onnxruntime",
                     "numpy", "pandas", "joblib")


def training_environment() -> dict[str, Any]:
    """Python and package versions that produced the models (the bundle records them)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in TRAINING_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"python": platform.python_version(), "packages": packages}


def _data_window(frame: pd.DataFrame, trainer: TrainerSpec) -> dict[str, Any] | None:
    if not trainer.time_column:
        return None
    column = frame[trainer.time_column]
    return {"column": trainer.time_column, "min": _plain(column.min()), "max": _plain(column.max())}


@dataclass
class PreparedData:
    """A table checked, typed, partitioned and fingerprinted: what training fits on.

    :func:`train` prepares its data with :func:`prepare_data`; ``manymodels retrain``
    prepares the new data once, compares the fingerprints with the champion's and hands
    the same object to :func:`train`, so nothing is read or partitioned twice.
    """

    segmenter: SegmenterSpec
    trainer: TrainerSpec
    features: FeatureSet
    frame: pd.DataFrame
    segmentation: Segmentation
    fingerprints: dict[str, str]  # segment name -> fingerprint of its rows (as a job sees them)
    plan: FoldPlan  # how the segments' folds were assigned (``Segment.block``)
    warming: threading.Thread | None = field(default=None, repr=False)

    def join_workers(self) -> None:
        """Wait for the worker warm-up started while the data was prepared."""
        if self.warming is not None:
            self.warming.join()
            self.warming = None


def prepare_data(data: str | os.PathLike[str] | pd.DataFrame,
                 segmenter: str | os.PathLike[str] | dict[str, Any] | SegmenterSpec,
                 trainer: str | os.PathLike[str] | dict[str, Any] | TrainerSpec, *,
                 workers: int = 1, backend: str = "loky") -> PreparedData:
    """Read and check the table, partition it, assign folds and fingerprint each segment.

    With ``workers > 1`` on loky, the worker processes start (in the background) once the
    input is known to be valid, so their start-up overlaps the preparation; call
    :meth:`PreparedData.join_workers` (``train`` does) before using them.
    """
    seg_spec = load_segmenter(segmenter)
    tr_spec = load_trainer(trainer)
    raw = read_table(data)
    check_table(raw, seg_spec, tr_spec)
    features = resolve_features(raw, seg_spec, tr_spec)
    build_candidates(tr_spec)  # a bad candidate is a spec error before any work starts
    warming = start_workers(workers, backend)
    try:
        frame = prepare_frame(raw, features, seg_spec, tr_spec)
        segmentation = partition(frame, seg_spec, tr_spec)
        plan = resolve_method(tr_spec)
        times = frame[tr_spec.time_column].to_numpy() if plan.expanding else None
        for seg in segmentation.segments:
            seg.block = assign_folds(frame, seg.rows, tr_spec, seg.key, plan, times)
            seg.holdout = seg.block >= 0
        prints = fingerprints(frame[_own_columns(features, tr_spec)],
                              [seg.rows for seg in segmentation.segments])
    except BaseException:
        if warming is not None:  # workers must not be left half-started
            warming.join()
        raise
    return PreparedData(seg_spec, tr_spec, features, frame, segmentation,
                        {seg.name: fp for seg, fp in zip(segmentation.segments, prints,
                                                         strict=True)}, plan, warming)


class Reuse(Protocol):
    """What an incremental run (``manymodels retrain``) takes instead of fitting.

    :func:`train` still partitions all the data and builds the jobs of every shared
    model (their holdout rows are needed to compare levels), but builds own-model jobs
    only for the segments :meth:`wants`, fits only the jobs :meth:`split` leaves it,
    takes the results of the others from :meth:`take` (a kept model scored on its
    holdout rows, or a result saved before a crash), reports each finished result to
    :meth:`record`, and routes only the segments it :meth:`wants`.
    """

    def wants(self, segment: str) -> bool:
        """Whether this segment is retrained (and routed) in this run."""

    def split(self, jobs: list[FitJob]) -> tuple[list[FitJob], list[FitJob]]:
        """Jobs to fit and jobs whose results :meth:`take` provides."""

    def take(self, jobs: list[FitJob], models_dir: Path) -> dict[str, FitResult]:
        """Results of the jobs not fitted, their ONNX files written into ``models_dir``."""

    def record(self, done: list[FitResult]) -> None:
        """Called as results arrive, with their ONNX bytes still attached."""


def train(data: str | os.PathLike[str] | pd.DataFrame | PreparedData,
          segmenter: str | os.PathLike[str] | dict[str, Any] | SegmenterSpec = "store_brand",
          trainer: str | os.PathLike[str] | dict[str, Any] | TrainerSpec = "default", *,
          out: str | os.PathLike[str] = "runs", run_id: str | None = None,
          jobs: int | None = None, backend: str = "loky", scheduler: str | None = None,
          gate: bool | None = None, max_failed: float = 0.05, progress: bool = False,
          track: bool = True, log_segments: bool = False,
          overwrite: bool = False,
          on_progress: Callable[[int, int, int], None] | None = None,
          reuse: Reuse | None = None) -> TrainResult:
    """Train one model per segment and write a run directory.

    Parameters
    ----------
    data
        A DataFrame, a Parquet/CSV path, or :class:`PreparedData` (which carries its
        specs: ``segmenter`` and ``trainer`` are then ignored).
    segmenter, trainer
        Spec names (resolved in ``segmenters/`` and ``trainers/``), paths, dicts or specs.
    out
        Parent folder of run directories; the run goes to ``out/<run_id>``.
    jobs, backend, scheduler
        Parallelism: ``jobs`` workers (default: one per core) on ``loky`` processes, or
        ``dask`` (a cluster at ``scheduler``, or a local one).
    gate
        Override the segmenter's ``gate`` (compare own vs pooled vs global models).
    max_failed
        Fraction of segments allowed to fail before :class:`TrainingError` is raised
        (the run directory is written either way).
    progress
        Show a rich progress bar (segments done / failed / ETA).
    track, log_segments
        Log an MLflow run (and per-segment child runs).
    overwrite
        Replace an existing run directory of the same id (atomically).
    reuse
        Fit only part of the models and take the rest (see :class:`Reuse`); the run
        directory then routes only the segments ``reuse`` wants.
    """
    if not isinstance(data, PreparedData):
        tr_forecast = load_trainer(trainer)
        if tr_forecast.task == "forecast":  # its own stages: lags, backtests, per-series choice
            return train_forecast(data, segmenter, tr_forecast, out=out, run_id=run_id,  # type: ignore[return-value]
                                  overwrite=overwrite, environment=training_environment(),
                                  jobs=jobs)
    check_parallelism(jobs, backend, scheduler)
    workers = jobs or default_jobs()
    if isinstance(data, PreparedData):
        prepared = data
    else:
        prepared = prepare_data(data, segmenter, trainer, workers=workers, backend=backend)
    seg_spec, tr_spec = prepared.segmenter, prepared.trainer
    gate = seg_spec.gate if gate is None else gate
    candidates = build_candidates(tr_spec)
    run_id = run_id or new_run_id()
    run_dir = Path(out) / run_id
    try:
        if run_dir.exists() and not overwrite:
            raise SpecError(f"run directory {run_dir} already exists; choose another run id "
                            f"or pass overwrite (--overwrite)")
        frame, segmentation = prepared.frame, prepared.segmentation
        fit_jobs, layout = _build_jobs(frame, segmentation, seg_spec, tr_spec, prepared.features,
                                       prepared.plan.expanding,
                                       wanted=None if reuse is None else reuse.wants)
    finally:
        prepared.join_workers()  # also on errors: workers must not be left half-started
    to_fit, taken = (fit_jobs, []) if reuse is None else reuse.split(fit_jobs)
    context = FitContext(tr_spec, candidates, {
        "manymodels_version": __version__, "run_id": run_id, "target": tr_spec.target,
        "segmenter_hash": spec_hash(seg_spec), "trainer_hash": spec_hash(tr_spec),
        "metric": tr_spec.metric,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(run_dir)
    try:
        (staging / "models").mkdir(parents=True)
        results = _run_jobs(to_fit, context, workers, backend, scheduler, progress,
                            on_progress, staging / "models",
                            record=None if reuse is None else reuse.record)
        if reuse is not None:
            results.update(reuse.take(taken, staging / "models"))
        result = _conclude(results, fit_jobs, prepared, layout, gate, run_id, run_dir, staging,
                           overwrite, routed=None if reuse is None else reuse.wants)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if track:
        from manymodels.tracking import log_training_run

        log_training_run(result, seg_spec, tr_spec, log_segments=log_segments)
    summary = result.summary
    if summary["failed_fraction"] > max_failed:
        error = TrainingError(
            f"{summary['failed']} of {summary['segments']} segments failed "
            f"({summary['failed_fraction']:.1%} > max_failed={max_failed:.1%}); the run is in "
            f"{run_dir} and report.parquet says why each failed")
        error.result = result  # type: ignore[attr-defined]
        raise error
    return result


def _conclude(results: dict[str, FitResult], fit_jobs: list[FitJob], prepared: PreparedData,
              layout: dict[str, Any], gate: bool, run_id: str, run_dir: Path, staging: Path,
              overwrite: bool, routed: Callable[[str], bool] | None = None) -> TrainResult:
    """Compare levels, route (the segments ``routed`` accepts), summarise, write the run."""
    frame, segmentation = prepared.frame, prepared.segmentation
    seg_spec, tr_spec = prepared.segmenter, prepared.trainer
    job_by_name = {j.name: j for j in fit_jobs}
    evals = _evaluate_segments(frame, segmentation, tr_spec, results, job_by_name)
    if routed is not None:
        chosen = [i for i, seg in enumerate(segmentation.segments) if routed(seg.name)]
        segmentation = Segmentation(segmentation.columns,
                                    [segmentation.segments[i] for i in chosen])
        evals = [evals[i] for i in chosen]
    rows = _decide_routes(segmentation, seg_spec, tr_spec, results, evals, layout, gate,
                          prepared.plan.expanding)
    global_name = model_name(tr_spec.target, {})
    if results.get(global_name) is None or results[global_name].status != "ok":
        reason = results[global_name].reason if global_name in results else "not trained"
        raise TrainingError(f"the global model failed, so nothing can serve unknown segments: "
                            f"{reason}")
    summary = _summarise(rows, results, tr_spec, segmentation, evals, global_name, gate)
    manifest, used = _manifest(run_id, rows, results, job_by_name, layout, seg_spec, tr_spec,
                               frame, summary)
    manifest["segments"] = _segment_records(rows, prepared.fingerprints, segmentation.columns)
    manifest["specs"] = {"segmenter": seg_spec.model_dump(mode="json"),
                         "trainer": tr_spec.model_dump(mode="json")}
    report = pd.DataFrame(rows)
    _write_run(staging, run_dir, manifest, used, report, seg_spec, tr_spec, overwrite)
    return TrainResult(run_id, run_dir, report, summary, results)


def _segment_records(rows: list[dict[str, Any]], prints: dict[str, str], seg_cols: list[str]
                     ) -> list[dict[str, Any]]:
    """One record per segment, kept in the manifest so a later retrain can tell what changed.

    Segments served by a pooled or global model have no model entry of their own, so their
    fingerprint, status and routing decision are recorded here.
    """
    return [{"segment": r["segment"], "key": [r[f"key.{c}"] for c in seg_cols],
             "fingerprint": prints.get(r["segment"], ""), "status": r["status"],
             "rows": r["rows"], "model": r["model"] if r["routed"] else None,
             "level": r["level"], "metric": r["metric_latest"]} for r in rows]


def _run_jobs(fit_jobs: list[FitJob], context: FitContext, workers: int, backend: str,
              scheduler: str | None, progress: bool,
              on_progress: Callable[[int, int, int], None] | None,
              models_dir: Path, record: Callable[[list[FitResult]], None] | None = None
              ) -> dict[str, FitResult]:
    """Run every job; each ONNX file is written to ``models_dir`` as its chunk returns."""
    chunks = chunk_jobs(fit_jobs, workers)
    total = len(fit_jobs)
    counts = {"done": 0, "failed": 0}
    bar = None
    if progress:
        from manymodels.progress import TrainProgress

        bar = TrainProgress(total)

    def on_done(done: list[FitResult]) -> None:
        if record is not None:
            record(done)
        for res in done:
            if res.onnx is not None:
                (models_dir / f"{res.name}.onnx").write_bytes(res.onnx)
                res.onnx = None  # on disk now: the parent need not hold every model
        counts["done"] += len(done)
        counts["failed"] += sum(r.status != "ok" for r in done)
        if bar is not None:
            bar.update(counts["done"], counts["failed"])
        if on_progress is not None:
            on_progress(counts["done"], counts["failed"], total)

    try:
        done = run_chunks(run_chunk, chunks, context, workers, backend, scheduler, on_done)
    finally:
        if bar is not None:
            bar.close()
    return {r.name: r for r in done}


def _summarise(rows: list[dict[str, Any]], results: dict[str, FitResult], trainer: TrainerSpec,
               segmentation: Segmentation, evals: list[_SegmentEval], global_name: str,
               gate: bool) -> dict[str, Any]:
    levels = pd.Series([r["level"] for r in rows]).value_counts().to_dict()
    failed = sum(r["status"] == "failed" for r in rows)
    own_vs_global = [(r["metric_own"], r["metric_global"]) for r in rows
                     if r["metric_own"] is not None and r["metric_global"] is not None
                     and r["status"] == "ok"]
    sign = 1 if higher_is_better(trainer.metric) else -1
    wins = sum(sign * (o - g) > 0 for o, g in own_vs_global)
    summary = {
        "segments": len(rows), "trained": sum(r["status"] == "ok" for r in rows),
        "failed": failed, "failed_fraction": failed / max(len(rows), 1),
        "small": sum(r["status"] in ("small", "skipped") for r in rows),
        "levels": {str(k): int(v) for k, v in levels.items()}, "gate": gate,
        "metric": trainer.metric, "own_beats_global": wins,
        "compared_with_global": len(own_vs_global),
        "holdout": _routed_metrics(trainer, segmentation, evals, rows, results, global_name),
        "fit_seconds": float(sum(r.fit_seconds + r.export_seconds for r in results.values())),
    }
    summary["segmenting_pays_off"] = levels.get("global", 0) <= len(rows) / 2
    return summary


def _manifest(run_id: str, rows: list[dict[str, Any]], results: dict[str, FitResult],
              jobs: dict[str, FitJob], layout: dict[str, Any], segmenter: SegmenterSpec,
              trainer: TrainerSpec, frame: pd.DataFrame, summary: dict[str, Any]
              ) -> tuple[dict[str, Any], set[str]]:
    seg_cols = list(segmenter.columns)
    levels = segmenter.resolved_levels
    routes: list[dict[str, Any]] = []
    used: set[str] = set()
    for row in rows:
        if row["routed"]:
            route: dict[str, Any] = {"level": 0, "key": [row[f"key.{c}"] for c in seg_cols],
                                     "model": row["model"]}
            if row["blend_with"] is not None:
                route["blend"] = {"with": row["blend_with"], "weight": row["blend_weight"]}
                used.add(row["blend_with"])
            routes.append(route)
            used.add(row["model"])
    for name, (level, values) in layout["pools"].items():
        if name in results and results[name].status == "ok":
            routes.append({"level": level, "key": list(values), "model": name})
            used.add(name)
    models = {name: _model_entry(results[name], trainer, seg_cols, jobs[name]) for name in
              sorted(used)}
    failed = [{"key": {c: r[f"key.{c}"] for c in seg_cols}, "reason": r["reason"],
               "segment": r["segment"]} for r in rows if r["status"] == "failed"]
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "run", "name": None, "version": None,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "run_id": run_id, "target": trainer.target, "task": trainer.task,
        "segment_columns": seg_cols, "levels": levels, "routes": routes, "models": models,
        "failed": failed, "data_window": _data_window(frame, trainer),
        "metric": trainer.metric, "summary": summary,
        "manymodels_version": __version__, "environment": training_environment(),
    }
    return manifest, used
