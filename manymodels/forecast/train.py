"""``task: forecast`` end to end: panel, backtests, per-series choice, export, run directory.

The run directory has the same shape as a regression run (``models/*.onnx``,
``manifest.json``, ``report.parquet``, ``specs/``), so ``package``, ``validate``,
``register`` and ``serve`` take it as they are; its manifest adds a ``forecast`` section:
features, each series' route (methods and weights) and tail.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels._version import __version__
from manymodels.candidates import Candidate, build_candidates
from manymodels.data import read_table
from manymodels.engine import background, default_jobs, frozen_heap
from manymodels.errors import DataError, ExportError, ManyModelsError, SpecError
from manymodels.forecast.backtest import cutoffs
from manymodels.forecast.choice import Choice, choose, chosen_forecasts, metric_summary
from manymodels.forecast.evidence import (
    BACKTESTS_FILE,
    HISTORY_FILE,
    backtest_table,
    history_periods,
    history_table,
)
from manymodels.forecast.hierarchy import (
    Levels,
    add_aggregates,
    check_map_size,
    fit_map,
    hierarchy_levels,
    level_accuracy,
    reconcile_backtests,
    series_errors,
)
from manymodels.forecast.intervals import calibrate
from manymodels.forecast.learners import (
    LagMethod,
)
from manymodels.forecast.methods import (
    Backtests,
    MethodSet,
    fit_final_stats,
    lag_methods,
    run_backtests,
)
from manymodels.forecast.panel import Panel, build_panel, feature_spec
from manymodels.forecast.stats import FittedStat
from manymodels.forecast.summary import run_report, run_summary
from manymodels.forecast.writer import ModelWriter, Unexportable, model_name
from manymodels.io import finish_run_dir
from manymodels.results import TrainResult
from manymodels.runtime.forecast import BUILTINS, FeatureSpec
from manymodels.runtime.intervals import is_nonnegative
from manymodels.runtime.manifest import SCHEMA_VERSION
from manymodels.specs import (
    CandidateSpec,
    SegmenterSpec,
    TrainerSpec,
    load_segmenter,
    load_trainer,
)

__all__ = ["DEFAULT_CANDIDATES", "TRACKED_METRICS", "ForecastResult", "train_forecast"]

#: Lag models when the trainer names none: LightGBM's defaults and a ridge.
DEFAULT_CANDIDATES = (
    CandidateSpec(algorithm="lightgbm",
                  params={"n_estimators": 100, "num_leaves": 31, "min_child_samples": 20}),
    CandidateSpec(algorithm="ridge", params={"alpha": 1.0}),
)

#: Backtest metrics every run summarises per method (besides the trainer's own): the
#: scaled error the choice is usually made on and the percentage error people read.
TRACKED_METRICS = ("mase", "smape")


@dataclass
class ForecastResult(TrainResult):
    """Where the run went, and each series' choice (a run like any other to the tracker)."""


def _static_columns(frame: pd.DataFrame, segmenter: SegmenterSpec, trainer: TrainerSpec
                    ) -> list[str]:
    if not trainer.forecast.static_keys:
        return []
    limit = segmenter.pooled_key_max_categories
    return [c for c in segmenter.columns if frame[c].nunique(dropna=False) <= limit]


def _method_set(trainer: TrainerSpec, segmenter: SegmenterSpec, candidates: list[Candidate],
                season_length: int) -> MethodSet:
    methods = trainer.forecast.methods_for(season_length)
    builtins = [m for m in methods if m in BUILTINS]
    if season_length <= 1 and "naive" in builtins and "seasonal_naive" in builtins:
        builtins.remove("seasonal_naive")  # without a season it is the naive method again
    stats = [m for m in methods if m not in BUILTINS]
    levels = [list(lv) for lv in segmenter.resolved_levels]
    lag = lag_methods(candidates, levels, trainer.forecast.own_models)
    return MethodSet(builtins, stats, lag)


@frozen_heap()
def train_forecast(data: str | os.PathLike[str] | pd.DataFrame,
                   segmenter: str | os.PathLike[str] | dict[str, Any] | SegmenterSpec,
                   trainer: str | os.PathLike[str] | dict[str, Any] | TrainerSpec, *,
                   out: str | os.PathLike[str] = "runs", run_id: str | None = None,
                   overwrite: bool = False, environment: dict[str, Any] | None = None,
                   jobs: int | None = None) -> ForecastResult:
    """Backtest every method on every series, choose per series, export, write the run
    (with the heap it found frozen: :func:`~manymodels.engine.frozen_heap`)."""
    started = time.perf_counter()
    seg_spec, tr_spec = load_segmenter(segmenter), load_trainer(trainer)
    if tr_spec.task != "forecast":
        raise SpecError(f"trainer '{tr_spec.name}' has task {tr_spec.task!r}, not forecast")
    fc_spec = tr_spec.forecast
    if fc_spec.strategy == "direct" and (fc_spec.max_horizon or 0) > int(tr_spec.horizon or 1):
        raise SpecError(f"forecast.max_horizon={fc_spec.max_horizon} is over the horizon "
                        f"({tr_spec.horizon}): a direct model forecasts only the steps it was "
                        f"trained for; raise horizon or use strategy: recursive")
    frame = read_table(data)
    panel = build_panel(frame, list(seg_spec.columns), tr_spec)
    if not len(panel):
        raise DataError("the table holds no series to forecast")
    levels: Levels | None = None
    wanted_levels = hierarchy_levels(tr_spec, seg_spec)
    if wanted_levels is not None:  # coarser levels are series too: sums of their segments
        panel, levels = add_aggregates(panel, wanted_levels)
        check_map_size(levels, tr_spec.forecast.reconcile)
    spec = feature_spec(tr_spec, panel, _static_columns(frame, seg_spec, tr_spec))
    candidates = build_candidates(tr_spec) if tr_spec.candidates else [
        Candidate(c.algorithm, c.algorithm, dict(c.params), c.resolved_min_rows)
        for c in DEFAULT_CANDIDATES]
    methods = _method_set(tr_spec, seg_spec, candidates, panel.season_length)
    h = int(tr_spec.horizon or 1)
    fc = tr_spec.forecast
    lengths = np.asarray([len(y) for y in panel.y])
    cuts = cutoffs(lengths, h, fc.n_windows, fc.step_size or h,
                   spec.window + spec.differences + 2)
    stage = time.perf_counter()
    backtests = run_backtests(panel, spec, methods, cuts, h, tr_spec.seed,
                              jobs=jobs or default_jobs(), ets_search=fc.ets_search,
                              stat_windows=fc.stat_windows)
    backtest_seconds = time.perf_counter() - stage
    simplest = methods.builtins[0] if methods.builtins else methods.labels[0]
    run_id = run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    run_dir = Path(out) / run_id
    if run_dir.exists() and not overwrite:
        raise SpecError(f"run directory {run_dir} already exists; choose another run id or "
                        f"pass overwrite (--overwrite)")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = run_dir.parent / f".{run_dir.name}.{uuid.uuid4().hex[:6]}.tmp"
    (staging / "models").mkdir(parents=True)
    try:
        final = _Final(panel, spec, tr_spec, seg_spec, staging, run_id, jobs or default_jobs())
        final.stat_fits.update(backtests.final)
        excluded: dict[tuple[str, int | None], str] = {}
        stage = time.perf_counter()
        while True:  # a method that does not export is dropped and its series choose again
            choices, errors = choose(backtests, tr_spec.metric, fc.blend, simplest, excluded,
                                     fc.panel_margin)
            try:
                routes, fallback = final.export(choices, methods, backtests, errors, excluded)
                break
            except Unexportable as exc:
                again = {(exc.label, i): why for i, why in exc.reasons.items()}
                if excluded.keys() & again.keys():
                    raise ExportError(str(exc)) from exc
                excluded.update(again)
        report = run_report(panel, choices, backtests.labels, errors)
        summary = run_summary(choices, backtests.labels, errors, tr_spec, panel, h,
                           time.perf_counter() - started)
        # where the time went: each method's backtests, the exported statistical fits,
        # the lag models' final fits with their ONNX export and parity checks, and of
        # those the final fits alone (their rows and fits)
        summary["stage_seconds"] = {
            "backtests": round(backtest_seconds, 2),
            **{f"backtest.{k}": round(v, 2) for k, v in backtests.seconds.items()},
            "final_stat_fits": round(final.stat_seconds, 2),
            "lag_refit_export_parity": round(final.export_seconds, 2),
            "lag_refits": round(final.writer.fit_seconds, 2)}
        hierarchy, reconcile = None, None
        if levels is not None:
            hierarchy, reconcile = _reconcile(levels, tr_spec, backtests, choices, report,
                                              summary)
        summary["backtest_metrics"] = metric_summary(
            backtests, choices, list(dict.fromkeys([tr_spec.metric, *TRACKED_METRICS])))
        summary["not_exported"] = {f"{label}" + ("" if i is None else f" ({panel.key_texts[i]})"):
                                   reason for (label, i), reason in excluded.items()}
        intervals = (calibrate(panel, backtests, errors, cuts, choices, fc.blend, fc.levels,
                               excluded, reconcile, (final.serving, spec))
                     if fc.levels else None)
        if intervals is not None:
            summary["interval_coverage"] = intervals[0]["backtest_coverage"]
        manifest = final.manifest(routes, fallback, summary, environment or {}, intervals)
        if hierarchy is not None:
            manifest["forecast"]["hierarchy"] = hierarchy
        # what the report and notebooks plot: each series' windows and recent history
        backtest_table(panel, backtests, choices, cuts).to_parquet(staging / BACKTESTS_FILE,
                                                                    index=False)
        history_table(panel, history_periods(h, fc.n_windows, fc.step_size or h,
                                             panel.season_length)
                      ).to_parquet(staging / HISTORY_FILE, index=False)
        finish_run_dir(staging, run_dir, manifest, report,
                       {"segmenter": seg_spec, "trainer": tr_spec}, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return ForecastResult(run_id, run_dir, report, summary)


class _Final:
    """Exports each series' chosen methods (their files by :class:`ModelWriter`) into
    routes, and writes the run's manifest."""

    def __init__(self, panel: Panel, spec: FeatureSpec, trainer: TrainerSpec,
                 segmenter: SegmenterSpec, staging: Path, run_id: str, jobs: int = 1) -> None:
        self.panel, self.spec, self.trainer, self.segmenter = panel, spec, trainer, segmenter
        self.run_id = run_id
        self.writer = ModelWriter(panel, spec, trainer, segmenter, staging, run_id)
        #: Exported statistical models by (method, series), fitted once when first chosen.
        self.stat_fits: dict[tuple[str, int], FittedStat | None] = {}
        self.jobs = jobs
        #: Seconds of the exported statistical fits (in workers, beside the lag exports),
        #: and of this process's refits, ONNX exports and parity checks.
        self.stat_seconds = 0.0
        self.export_seconds = 0.0
        #: The method that forecasts a new series sent with history (the fallback's
        #: global lag method, or its builtin), set by :meth:`export`.
        self.serving = ""

    def export(self, choices: list[Choice], methods: MethodSet, backtests: Backtests,
               errors: np.ndarray, excluded: Mapping[tuple[str, int | None], str]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        labels = backtests.labels
        by_label = {m.label: m for m in methods.lag}
        users: dict[str, list[int]] = {}
        for i, choice in enumerate(choices):
            for member in choice.members:
                users.setdefault(member, []).append(i)
        fallback_label = self._fallback_label(methods, labels, errors, excluded)
        if fallback_label in by_label:
            users.setdefault(fallback_label, [])
        files: dict[tuple[str, int], str] = {}
        fallback_model: str | None = None
        wanted = [(label, i) for label in methods.stats for i in users.get(label, [])
                  if (label, i) not in self.stat_fits]
        # the chosen statistical models are fitted in the worker processes meanwhile
        fitting = background(self._fit_stats, wanted, run=self.jobs > 1 and bool(wanted))
        threads = 1 if wanted else self.jobs  # the cores, unless statistical fits run
        started = time.perf_counter()
        try:
            for label, series in users.items():
                method = by_label.get(label)
                if method is None:
                    continue
                try:
                    placed = self.writer.lag(method, series, threads)
                except ExportError as exc:
                    raise Unexportable(label, {None: str(exc)}) from exc
                files.update({(label, i): name for i, name in placed.items()})
                if label == fallback_label:
                    fallback_model = self._global_name(method)
        finally:
            self.export_seconds += time.perf_counter() - started
            self.stat_fits.update(fitting.result())
        started = time.perf_counter()
        for label in methods.stats:
            failed: dict[int | None, str] = {}
            for i in users.get(label, []):
                try:
                    files[(label, i)] = self.writer.stat(label, i, self.stat_fits[(label, i)])
                except ManyModelsError as exc:
                    failed[i] = str(exc)
            if failed:
                raise Unexportable(label, failed)
        self.export_seconds += time.perf_counter() - started
        routes = []
        for i, choice in enumerate(choices):
            members = []
            for label, weight in zip(choice.members, choice.weights, strict=True):
                if label in BUILTINS:
                    members.append({"builtin": label, "weight": weight, "kind": "builtin"})
                elif label in by_label:
                    members.append({"model": files[(label, i)], "weight": weight, "kind": "lag"})
                else:
                    members.append({"model": files[(label, i)], "weight": weight, "kind": "stat",
                                    "origin": _plain_time(self.panel.times[i][-1])})
            routes.append({"key": list(self.panel.key_texts[i]), "members": members,
                           "method": choice.label})
        builtin = "seasonal_naive" if self.panel.season_length > 1 else "naive"
        self.serving = fallback_label if fallback_model else builtin
        fallback = ([{"model": fallback_model, "weight": 1.0, "kind": "lag"}] if fallback_model
                    else [{"builtin": builtin, "weight": 1.0, "kind": "builtin"}])
        return routes, fallback

    def _fit_stats(self, wanted: list[tuple[str, int]]
                   ) -> dict[tuple[str, int], FittedStat | None]:
        started = time.perf_counter()
        fits = fit_final_stats(self.panel, wanted, self.jobs)
        self.stat_seconds += time.perf_counter() - started
        return fits

    def _fallback_label(self, methods: MethodSet, labels: list[str], errors: np.ndarray,
                        excluded: Mapping[tuple[str, int | None], str]) -> str:
        """The global lag method with the lowest mean backtest error: serves new series."""
        best, label = np.inf, ""
        for m in methods.lag:
            if m.columns or (m.label, None) in excluded:
                continue
            values = errors[:, labels.index(m.label)]
            mean = float(np.nanmean(np.where(np.isfinite(values), values, np.nan))) \
                if np.isfinite(values).any() else np.inf
            if mean < best:
                best, label = mean, m.label
        return label

    def _global_name(self, method: LagMethod) -> str:
        return model_name(self.trainer.target, method, (), self.panel.key_columns)

    def manifest(self, routes: list[dict[str, Any]], fallback: list[dict[str, Any]],
                 summary: dict[str, Any], environment: dict[str, Any],
                 intervals: tuple[dict[str, Any], list[float], list[bool] | None] | None = None
                 ) -> dict[str, Any]:
        panel, spec = self.panel, self.spec
        length = spec.tail_length
        used = {m["model"] for r in [*routes, {"members": fallback}] for m in r["members"]
                if m.get("model")}
        h = int(self.trainer.horizon or 1)
        series = {
            "keys": [list(k) for k in panel.key_texts],
            "last": [_plain_time(t[-1]) for t in panel.times],
            # the period each series' route was fitted up to (update moves "last" only):
            # retrain's max_age counts from here
            "fitted": [_plain_time(t[-1]) for t in panel.times],
            "loc": self.writer.scales.loc.tolist(), "scale": self.writer.scales.scale.tolist(),
            "tail": [y[-length:].tolist() for y in panel.y],
            # no value below zero: the runtime clips forecasts and lower bounds at 0
            "nonnegative": [is_nonnegative(y) for y in panel.y],
        }
        if intervals is not None:
            series["interval_scale"] = intervals[1]
            if intervals[2] is not None:
                series["interval_short"] = intervals[2]
        times = pd.Index(np.concatenate([np.asarray(t) for t in panel.times]))
        return {
            "schema_version": SCHEMA_VERSION, "kind": "run", "name": None, "version": None,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "run_id": self.run_id, "target": self.trainer.target, "task": "forecast",
            "segment_columns": list(panel.key_columns),
            "levels": [list(lv) for lv in self.segmenter.resolved_levels],
            "routes": [], "models": {k: v for k, v in self.writer.models.items() if k in used},
            "failed": [],
            "data_window": {"column": panel.time_column, "min": _plain_time(times.min()),
                            "max": _plain_time(times.max())},
            "metric": self.trainer.metric, "summary": summary,
            "specs": {"segmenter": self.segmenter.model_dump(mode="json"),
                      "trainer": self.trainer.model_dump(mode="json")},
            "manymodels_version": __version__, "environment": environment,
            "forecast": {
                "time_column": panel.time_column, "freq": panel.freq, "horizon": h,
                "max_horizon": self.trainer.forecast.max_horizon or (
                    h if spec.direct else 10 * h),
                "strategy": self.trainer.forecast.strategy, "features": spec.to_dict(),
                "series": series, "routes": routes, "fallback": fallback,
                **({"intervals": intervals[0]} if intervals is not None else {}),
            },
        }


def _reconcile(levels: Levels, trainer: TrainerSpec, backtests: Backtests,
               choices: list[Choice], report: pd.DataFrame, summary: dict[str, Any]
               ) -> tuple[dict[str, Any], Callable[[np.ndarray], np.ndarray] | None]:
    """Fit the reconciliation map, score each level before and after on the backtests
    (into ``report`` and ``summary``); the manifest's hierarchy section, and the map as a
    function of backtest forecasts (series, windows, h) for the intervals."""
    method = trainer.forecast.reconcile
    base = chosen_forecasts(backtests, choices)
    P = None if method == "none" else fit_map(levels, method, backtests.actual, base)
    reconciled = base if P is None else reconcile_backtests(levels, P, base)
    names = ["+".join(level) or "total" for level in levels.levels]
    report["level"] = [names[d] for d in levels.level_of]
    report["reconciled_error"] = series_errors(trainer.metric, backtests, reconciled)
    summary["levels"] = {"reconcile": method,
                         "accuracy": level_accuracy(levels, trainer.metric, backtests, base,
                                                    reconciled)}
    section = {"levels": levels.levels, "reconcile": method,
               "bottom": levels.bottom.tolist(), "members": [m.tolist() for m in levels.members],
               # bottom-up keeps the segments' forecasts: no map to store
               "P": P.tolist() if P is not None and method != "bottom_up" else None}
    if P is None:
        return section, None
    fitted = P
    return section, lambda forecasts: reconcile_backtests(levels, fitted, forecasts)


def _plain_time(value: Any) -> Any:
    if isinstance(value, (np.integer, int)):
        return int(value)
    return pd.Timestamp(value).isoformat()
