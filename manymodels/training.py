"""``manymodels train``: segment, fit candidates in parallel, gate by level, export, report.

:func:`train` runs the stages in order: :mod:`~manymodels.prepare` (read, check,
partition, folds), :mod:`~manymodels.jobs` (the fit jobs, run by :mod:`~manymodels.engine`
on local processes or Dask, each fitting and exporting in :mod:`~manymodels.fit`),
:mod:`~manymodels.gate` (the level each segment is served at) and
:mod:`~manymodels.rundir` (manifest and run directory). Only this process writes files,
atomically.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from manymodels._version import __version__
from manymodels.candidates import build_candidates
from manymodels.engine import check_parallelism, default_jobs, start_workers
from manymodels.errors import SpecError, TrainingError
from manymodels.fit import FitContext, FitJob
from manymodels.gate import compared_metric, decide_routes, evaluate_segments, summarise_run
from manymodels.jobs import CoarserModel, build_jobs, coarser_models, run_jobs
from manymodels.prepare import PreparedData, prepare_data
from manymodels.results import FitResult, TrainResult
from manymodels.rundir import (
    model_entry,
    new_run_id,
    run_manifest,
    segment_records,
    staging_dir,
    training_environment,
    write_run,
)
from manymodels.runtime.forecast import BUILTINS
from manymodels.segment import Segmentation, model_name
from manymodels.selection import choose_level
from manymodels.specs import SegmenterSpec, TrainerSpec, load_segmenter, load_trainer, spec_hash
from manymodels.tracking import log_training_run

__all__ = ["CoarserModel", "PreparedData", "Reuse", "TrainResult", "choose_level", "coarser_models",
           "compared_metric", "model_entry", "new_run_id", "prepare_data", "train"]


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
            _start_stat_workers(tr_forecast, jobs)
            # export and statsforecast: only a forecasting run pays for them (retrain's
            # planning imports this module and must not import a training library)
            from manymodels.forecast.train import train_forecast

            forecast = train_forecast(data, segmenter, tr_forecast, out=out, run_id=run_id,
                                      overwrite=overwrite, environment=training_environment(),
                                      jobs=jobs)
            if track:
                log_training_run(forecast, load_segmenter(segmenter), tr_forecast,
                                 log_segments=log_segments)
            return forecast
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
        fit_jobs, layout = build_jobs(frame, segmentation, seg_spec, tr_spec, prepared.features,
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
    staging = staging_dir(run_dir)
    try:
        (staging / "models").mkdir(parents=True)
        results = run_jobs(to_fit, context, workers, backend, scheduler, progress,
                            on_progress, staging / "models",
                            record=None if reuse is None else reuse.record)
        if reuse is not None:
            results.update(reuse.take(taken, staging / "models"))
        result = _conclude(results, fit_jobs, prepared, layout, gate, run_id, run_dir, staging,
                           overwrite, routed=None if reuse is None else reuse.wants)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if track:
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
    evals = evaluate_segments(frame, segmentation, tr_spec, results, job_by_name)
    if routed is not None:
        chosen = [i for i, seg in enumerate(segmentation.segments) if routed(seg.name)]
        segmentation = Segmentation(segmentation.columns,
                                    [segmentation.segments[i] for i in chosen])
        evals = [evals[i] for i in chosen]
    rows = decide_routes(segmentation, seg_spec, tr_spec, results, evals, layout, gate,
                          prepared.plan.expanding)
    global_name = model_name(tr_spec.target, {})
    if results.get(global_name) is None or results[global_name].status != "ok":
        reason = results[global_name].reason if global_name in results else "not trained"
        raise TrainingError(f"the global model failed, so nothing can serve unknown segments: "
                            f"{reason}")
    summary = summarise_run(rows, results, tr_spec, segmentation, evals, global_name, gate)
    summary["duplicate_rows"] = prepared.duplicate_rows
    manifest, used = run_manifest(run_id, rows, results, job_by_name, layout, seg_spec, tr_spec,
                               frame, summary)
    manifest["segments"] = segment_records(rows, prepared.fingerprints, segmentation.columns)
    manifest["specs"] = {"segmenter": seg_spec.model_dump(mode="json"),
                         "trainer": tr_spec.model_dump(mode="json")}
    report = pd.DataFrame(rows)
    write_run(staging, run_dir, manifest, used, report, seg_spec, tr_spec, overwrite)
    pairs = list(zip(segmentation.segments, evals, strict=True))
    return TrainResult(run_id, run_dir, report, summary, results,
                       {seg.name: ev.routed for seg, ev in pairs if ev.routed is not None},
                       {seg.name: ev.predictions for seg, ev in pairs if ev.predictions})


def _start_stat_workers(trainer: TrainerSpec, jobs: int | None) -> None:
    """Start the worker processes that fit the statistical methods now, importing
    statsforecast while this process imports the forecasting stack (they are reused by
    the backtests)."""
    if not {*trainer.forecast.methods_for(1), *trainer.forecast.methods_for(2)} - set(BUILTINS):
        return
    from manymodels.forecast.stats import preload  # light: statsforecast loads in the worker

    start_workers(jobs or default_jobs(), "loky", preload)
