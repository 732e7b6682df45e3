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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from manymodels import __version__
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
from manymodels.io import swap_directory_into_place
from manymodels.runtime.manifest import MANIFEST_FILE, SCHEMA_VERSION
from manymodels.segment import (
    FeatureSet,
    Segment,
    Segmentation,
    check_table,
    model_name,
    partition,
    prepare_frame,
    resolve_features,
)
from manymodels.selection import LevelChoice, blend_predictions, choose_level, choose_route
from manymodels.specs import SegmenterSpec, TrainerSpec, load_segmenter, load_trainer, spec_hash
from manymodels.validation import assign_folds, resolve_method

__all__ = ["TrainResult", "choose_level", "train"]


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


def _build_jobs(frame: pd.DataFrame, segmentation: Segmentation, segmenter: SegmenterSpec,
                trainer: TrainerSpec, features: FeatureSet, expanding: bool = False
                ) -> tuple[list[FitJob], dict[str, Any]]:
    """Jobs for every own model, the small-segment pool, each coarser level and the global."""
    seg_cols = segmentation.columns
    extra = [trainer.target] + ([trainer.time_column] if trainer.time_column else [])
    jobs: list[FitJob] = []
    layout: dict[str, Any] = {"pools": {}, "small_pool": None}
    own_frame = frame[list(dict.fromkeys(features.columns + extra))]  # select columns once
    for seg in segmentation.trainable:
        jobs.append(_segment_job(own_frame, seg, features, expanding))
    indexed = [(i, s) for i, s in enumerate(segmentation.segments)]
    policy = segmenter.small_segments
    cardinality = {c: int(frame[c].nunique()) for c in seg_cols}
    cap = segmenter.pooled_key_max_categories
    served = [(i, s) for i, s in indexed if not (s.small and policy == "skip")]
    small = [(i, s) for i, s in indexed if s.small]
    if small and policy == "pool":
        pool_features = features.for_level(seg_cols, [], cardinality, cap)
        cols = list(dict.fromkeys(pool_features.columns + extra))
        name = f"{model_name(trainer.target, {})[:-len('__global')]}__small_pool"
        jobs.append(_pooled_job(frame, name, 0, {}, small, pool_features, cols, expanding))
        layout["small_pool"] = name
    levels = segmenter.resolved_levels
    for level, level_cols in enumerate(levels[1:], start=1):
        level_features = features.for_level(seg_cols, level_cols, cardinality, cap)
        cols = list(dict.fromkeys(level_features.columns + extra))
        groups: dict[tuple[str, ...], list[tuple[int, Segment]]] = {}
        for i, seg in served:
            groups.setdefault(tuple(seg.key[c] for c in level_cols), []).append((i, seg))
        for values, members in groups.items():
            key = dict(zip(level_cols, values, strict=True))
            name = model_name(trainer.target, key)
            jobs.append(_pooled_job(frame, name, level, key, members, level_features, cols,
                                    expanding))
            layout["pools"][name] = (level, values)
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
        if job.segment_of_row is None or results[name].status != "ok":
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
                   layout: dict[str, Any], gate: bool) -> list[dict[str, Any]]:
    """One report row per segment, with the fold metrics at each level and the choice."""
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
    staging = final_dir.parent / f".{final_dir.name}.{uuid.uuid4().hex[:6]}.tmp"
    (staging / "models").mkdir(parents=True)
    return staging


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
    (staging / MANIFEST_FILE).write_text(json.dumps(_plain(manifest), indent=1, allow_nan=False))
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


def train(data: str | os.PathLike[str] | pd.DataFrame,
          segmenter: str | os.PathLike[str] | dict[str, Any] | SegmenterSpec = "store_brand",
          trainer: str | os.PathLike[str] | dict[str, Any] | TrainerSpec = "default", *,
          out: str | os.PathLike[str] = "runs", run_id: str | None = None,
          jobs: int | None = None, backend: str = "loky", scheduler: str | None = None,
          gate: bool | None = None, max_failed: float = 0.05, progress: bool = False,
          track: bool = True, log_segments: bool = False,
          overwrite: bool = False,
          on_progress: Callable[[int, int, int], None] | None = None) -> TrainResult:
    """Train one model per segment and write a run directory.

    Parameters
    ----------
    data
        A DataFrame or a Parquet/CSV path.
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
    """
    check_parallelism(jobs, backend, scheduler)
    seg_spec = load_segmenter(segmenter)
    tr_spec = load_trainer(trainer)
    gate = seg_spec.gate if gate is None else gate
    raw = read_table(data)
    check_table(raw, seg_spec, tr_spec)
    features = resolve_features(raw, seg_spec, tr_spec)
    candidates = build_candidates(tr_spec)
    run_id = run_id or new_run_id()
    run_dir = Path(out) / run_id
    if run_dir.exists() and not overwrite:
        raise SpecError(f"run directory {run_dir} already exists; choose another run id "
                        f"or pass overwrite (--overwrite)")
    workers = jobs or default_jobs()
    # The input is valid: start the worker processes while the rows are prepared.
    warming = start_workers(workers, backend)
    try:
        frame = prepare_frame(raw, features, seg_spec, tr_spec)
        segmentation = partition(frame, seg_spec, tr_spec)
        plan = resolve_method(tr_spec)
        for seg in segmentation.segments:
            seg.block = assign_folds(frame, seg.rows, tr_spec, seg.key, plan)
            seg.holdout = seg.block >= 0
        fit_jobs, layout = _build_jobs(frame, segmentation, seg_spec, tr_spec, features,
                                       plan.expanding)
    finally:
        if warming is not None:  # also on errors: workers must not be left half-started
            warming.join()
    context = FitContext(tr_spec, candidates, {
        "manymodels_version": __version__, "run_id": run_id, "target": tr_spec.target,
        "segmenter_hash": spec_hash(seg_spec), "trainer_hash": spec_hash(tr_spec),
        "metric": tr_spec.metric,
        "trained_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(run_dir)
    try:
        results = _run_jobs(fit_jobs, context, workers, backend, scheduler, progress,
                            on_progress, staging / "models")
        result = _conclude(results, fit_jobs, frame, segmentation, seg_spec, tr_spec, layout,
                           gate, run_id, run_dir, staging, overwrite)
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


def _conclude(results: dict[str, FitResult], fit_jobs: list[FitJob], frame: pd.DataFrame,
              segmentation: Segmentation, seg_spec: SegmenterSpec, tr_spec: TrainerSpec,
              layout: dict[str, Any], gate: bool, run_id: str, run_dir: Path, staging: Path,
              overwrite: bool) -> TrainResult:
    """Compare levels, route, summarise and write the run directory."""
    job_by_name = {j.name: j for j in fit_jobs}
    evals = _evaluate_segments(frame, segmentation, tr_spec, results, job_by_name)
    rows = _decide_routes(segmentation, seg_spec, tr_spec, results, evals, layout, gate)
    global_name = model_name(tr_spec.target, {})
    if results.get(global_name) is None or results[global_name].status != "ok":
        reason = results[global_name].reason if global_name in results else "not trained"
        raise TrainingError(f"the global model failed, so nothing can serve unknown segments: "
                            f"{reason}")
    summary = _summarise(rows, results, tr_spec, segmentation, evals, global_name, gate)
    manifest, used = _manifest(run_id, rows, results, job_by_name, layout, seg_spec, tr_spec,
                               frame, summary)
    report = pd.DataFrame(rows)
    _write_run(staging, run_dir, manifest, used, report, seg_spec, tr_spec, overwrite)
    return TrainResult(run_id, run_dir, report, summary, results)


def _run_jobs(fit_jobs: list[FitJob], context: FitContext, workers: int, backend: str,
              scheduler: str | None, progress: bool,
              on_progress: Callable[[int, int, int], None] | None,
              models_dir: Path) -> dict[str, FitResult]:
    """Run every job; each ONNX file is written to ``models_dir`` as its chunk returns."""
    chunks = chunk_jobs(fit_jobs, workers)
    total = len(fit_jobs)
    counts = {"done": 0, "failed": 0}
    bar = None
    if progress:
        from manymodels.progress import TrainProgress

        bar = TrainProgress(total)

    def on_done(done: list[FitResult]) -> None:
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
        if results[name].status == "ok":
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
