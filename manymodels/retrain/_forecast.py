"""Retraining a forecasting bundle: refit the series the refit policy names, move the
other series' origin.

Every series of a forecasting bundle gets new periods every week, so new data alone does
not make a series "changed". A series is refitted when it is new, when its route was
fitted more than ``retrain.max_age`` periods before its newest period, when the specs
changed, or when the champion's error on its newest periods (forecast from the last
origin before them, at most a horizon back, against the actual values) exceeds its
backtest error by more than ``retrain.error_growth``. Every other series keeps its
models, and its new periods only extend its tail (:func:`manymodels.forecast.update.
move_origins`, what ``manymodels update`` does). A refitted series' new route faces the
champion on those same periods (never seen by the champion; the new route's last
backtest window never saw them either) and replaces it only when no worse.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.errors import SpecError
from manymodels.forecast.backtest import score, seasonal_scale
from manymodels.forecast.evidence import BACKTESTS_FILE, HISTORY_FILE, segment_names
from manymodels.forecast.panel import Panel, build_panel
from manymodels.forecast.update import move_origins
from manymodels.runtime import MANIFEST_FILE, Bundle
from manymodels.runtime.forecast import FeatureSpec
from manymodels.runtime.intervals import interval_scale, thin_scale
from manymodels.specs import SegmenterSpec, TrainerSpec

from ._merge import is_worse, relative_gain
from ._plan import Plan, SegmentChange, spec_changes
from ._result import BundleComparison

__all__ = ["ForecastPlan", "SeriesPlan", "merge_forecast", "plan_forecast"]


@dataclass
class SeriesPlan:
    """What a retrain does with one series of the new data, and why."""

    index: int  # position in the panel
    segment: str
    key: dict[str, str]
    champion: int | None  # position in the champion's series (None: a new series)
    action: str  # "retrain", "update" (origin moved) or "keep"
    reason: str
    periods: int
    new_periods: int  # after the champion's last period of this series
    #: Panel position of the last period before the compared ones (None: no period the
    #: champion's route has not seen)
    origin: int | None = None
    backtest: float | None = None  # the champion's backtest error of this series
    recent: float | None = None  # the champion's error on the compared periods
    #: the champion's forecast of the compared periods
    recent_forecast: np.ndarray | None = field(default=None, repr=False)


@dataclass
class ForecastPlan:
    """Every series' plan, and what the whole retrain works with."""

    series: list[SeriesPlan]
    gone: list[str]  # champion series missing from the data: kept as they are
    differences: list[str]
    panel: Panel
    frame: pd.DataFrame
    segmenter: SegmenterSpec
    trainer: TrainerSpec

    @property
    def refit(self) -> list[SeriesPlan]:
        return [s for s in self.series if s.action == "retrain"]

    @property
    def nothing_to_do(self) -> bool:
        return all(s.action == "keep" for s in self.series)

    def as_plan(self, identity: str) -> Plan:
        """The plan in the shape every retrain reports (segments, reasons, counts)."""
        changes = [SegmentChange(s.segment, s.key, s.action == "retrain", s.reason, s.periods,
                                 s.action != "keep", True) for s in self.series]
        changes += [SegmentChange(name, {}, False, "not in the new data: kept as it is", 0,
                                  False, False) for name in self.gone]
        return Plan(changes, {}, self.differences, identity,
                    moved=sum(s.action == "update" for s in self.series))

    def frame_of_plan(self) -> pd.DataFrame:
        """One row per series: the action, the reason and the refit policy's evidence."""
        metric = self.trainer.metric
        return pd.DataFrame([{
            **{f"key.{c}": s.key.get(c) for c in self.panel.key_columns},
            "segment": s.segment, "action": s.action, "reason": s.reason,
            "periods": s.periods, "new_periods": s.new_periods,
            f"backtest_{metric}": s.backtest, f"recent_{metric}": s.recent}
            for s in self.series])


def _time(value: Any, freq: str) -> Any:
    return int(value) if freq == "int" else pd.Timestamp(value)


def _backtest_errors(root: Path) -> dict[str, float]:
    """Each series' backtest error from the champion's ``report.parquet`` (by segment)."""
    path = root / "report.parquet"
    if not path.is_file():
        return {}
    report = pd.read_parquet(path, columns=None)
    if "segment" not in report or "backtest_error" not in report:
        return {}
    return {str(s): float(e) for s, e in zip(report["segment"], report["backtest_error"],
                                             strict=True) if e is not None and np.isfinite(e)}


def plan_forecast(champion: Bundle, data: pd.DataFrame, segmenter: SegmenterSpec,
                  trainer: TrainerSpec, retrain_all: bool = False) -> ForecastPlan:
    """Decide per series of ``data`` (the whole table) whether it is refitted, only moved
    to its newest periods, or left as it is."""
    raw = champion.manifest.raw
    section = raw["forecast"]
    if section.get("hierarchy") or trainer.forecast.hierarchy \
            or trainer.forecast.reconcile != "none":
        raise SpecError("retrain of a forecasting bundle with coherent levels "
                        "(forecast.hierarchy / reconcile) is not supported: the levels are "
                        "reconciled together; train it again with `manymodels train`")
    panel = build_panel(data, list(segmenter.columns), trainer)
    differences = spec_changes(raw, segmenter, trainer)
    forced = ("--all" if retrain_all else
              f"spec changed: {'; '.join(differences)}" if differences else None)
    series = section["series"]
    freq = str(section["freq"])
    if panel.freq != freq and forced is None:
        forced = f"the data's period changed ({freq} -> {panel.freq})"
    index = {tuple(str(v) for v in key): i for i, key in enumerate(series["keys"])}
    fitted = series.get("fitted") or _fitted_fallback(series["last"], raw, freq)
    errors = _backtest_errors(champion.root)
    policy = trainer.retrain
    h = int(trainer.horizon or 1)
    names = segment_names(panel)
    plans: list[SeriesPlan] = []
    for i, key in enumerate(panel.key_texts):
        j = index.get(tuple(key))
        times = panel.times[i]
        periods = len(times)
        seg = SeriesPlan(i, names[i], dict(zip(panel.key_columns, key, strict=True)), j,
                         "keep", "no new periods", periods, periods)
        plans.append(seg)
        if j is None:
            seg.action, seg.reason = "retrain", "new series"
            continue
        seg.new_periods = periods - int(times.searchsorted(_time(series["last"][j], freq),
                                                           side="right"))
        seen = int(times.searchsorted(_time(fitted[j], freq), side="right"))
        age = periods - seen
        if age > 0 and seen > 0:
            seg.origin = max(seen, periods - h) - 1
        seg.backtest = errors.get(seg.segment)
        if forced is not None:
            seg.action, seg.reason = "retrain", forced
        elif policy.max_age is not None and age > policy.max_age:
            seg.action, seg.reason = "retrain", (f"age: fitted {age} periods before its "
                                                 f"newest, over max_age {policy.max_age}")
        elif seg.new_periods > 0:
            seg.action, seg.reason = "update", f"origin moved ({seg.new_periods} new periods)"
    _recent_errors(champion, panel, plans, trainer, data)
    if policy.error_growth is not None and forced is None:
        for seg in plans:
            if seg.action == "retrain" or seg.recent is None or seg.backtest is None:
                continue
            limit = seg.backtest * (1 + policy.error_growth)
            if seg.recent > limit:
                steps = seg.periods - 1 - (seg.origin or 0)
                seg.action, seg.reason = "retrain", (
                    f"error grew: {trainer.metric} {seg.recent:.3g} on its last {steps} "
                    f"period(s) vs {seg.backtest:.3g} in backtests (+"
                    f"{seg.recent / max(seg.backtest, 1e-12) - 1:.0%} > error_growth "
                    f"{policy.error_growth:.0%})")
    present = {tuple(k) for k in panel.key_texts}
    columns = list(panel.key_columns)
    gone = ["__".join(f"{c}={v}" for c, v in zip(columns, key, strict=True))
            for key in series["keys"] if tuple(str(v) for v in key) not in present]
    return ForecastPlan(plans, gone, differences, panel, data, segmenter, trainer)


def _fitted_fallback(last: list[Any], raw: Mapping[str, Any], freq: str) -> list[Any]:
    """Bundles from before ``fitted`` was recorded: no series was fitted past the end of
    the training data (``update`` moves ``last``, never ``data_window``)."""
    end = (raw.get("data_window") or {}).get("max")
    if end is None:
        return list(last)
    return [min(_time(v, freq), _time(end, freq)) for v in last]


def _recent_errors(champion: Bundle, panel: Panel, plans: list[SeriesPlan], trainer: TrainerSpec,
                   data: pd.DataFrame) -> None:
    """The champion's forecasts of each series' periods after its compared origin (the
    periods it never saw) and their error, in one forecast call per step count."""
    metric = trainer.metric
    by_steps: dict[int, list[SeriesPlan]] = {}
    for seg in plans:
        if seg.origin is not None:
            by_steps.setdefault(seg.periods - 1 - seg.origin, []).append(seg)
    known = list(FeatureSpec.from_dict(champion.manifest.raw["forecast"]["features"]
                                       ).known_future)
    for steps, group in by_steps.items():
        history = pd.concat([_series_rows(panel, seg.index, (seg.origin or 0) + 1)
                             for seg in group], ignore_index=True)
        future = None
        if known:
            future = pd.concat([_future_rows(data, panel, seg, known) for seg in group],
                               ignore_index=True)
        table = champion.forecast(steps, keys=[seg.key for seg in group], future=future,
                                  history=history)
        values = table["forecast"].to_numpy(dtype=np.float64).reshape(len(group), steps)
        for seg, forecast in zip(group, values, strict=True):
            assert seg.origin is not None
            y = panel.y[seg.index]
            seg.recent_forecast = forecast
            seg.recent = score(metric, y[seg.origin + 1:], forecast,
                               seasonal_scale(y[:seg.origin + 1], panel.season_length))


def _series_rows(panel: Panel, i: int, end: int | None = None) -> pd.DataFrame:
    """Series ``i``'s periods (up to position ``end``) as rows: key columns, time, target."""
    key = dict(zip(panel.key_columns, panel.key_texts[i], strict=True))
    return pd.DataFrame({**key, panel.time_column: panel.times[i][:end],
                         panel.target: panel.y[i][:end]})


def _future_rows(data: pd.DataFrame, panel: Panel, seg: SeriesPlan, known: list[str]
                 ) -> pd.DataFrame:
    """The known-future covariates of a series' compared periods, from the new data."""
    assert seg.origin is not None
    times = panel.times[seg.index][seg.origin + 1:]
    values = {c: panel.covariates[c][seg.index][seg.origin + 1:] for c in known}
    return pd.DataFrame({**{c: seg.key[c] for c in panel.key_columns},
                         panel.time_column: times, **values})


@dataclass
class SeriesOutcome:
    """A refitted series' new route against the champion's on the same periods."""

    outcome: str  # "replaced", "kept current", "new"
    current: float | None
    new: float | None
    compared: int  # periods compared


def compare_series(plan: ForecastPlan, challenger_dir: Path, tolerance: float
                   ) -> dict[str, SeriesOutcome]:
    """Each refitted series' outcome: the new route's last backtest window against the
    champion's forecasts on the periods the champion never saw."""
    metric = plan.trainer.metric
    table = pd.read_parquet(challenger_dir / BACKTESTS_FILE)
    time_col = plan.panel.time_column
    out: dict[str, SeriesOutcome] = {}
    by_segment = dict(tuple(table.groupby("segment", sort=False)))
    for seg in plan.refit:
        if seg.champion is None:
            out[seg.segment] = SeriesOutcome("new", None, None, 0)
            continue
        rows = by_segment.get(seg.segment)
        if seg.origin is None or seg.recent_forecast is None or rows is None:
            # nothing the champion has not seen: the refit (a spec change, --all) stands
            out[seg.segment] = SeriesOutcome("replaced", None, None, 0)
            continue
        rows = rows[rows["window"] == rows["window"].max()]
        y = plan.panel.y[seg.index]
        periods = plan.panel.times[seg.index][seg.origin + 1:]
        new_fc = rows.set_index(time_col)["forecast"].reindex(periods).to_numpy(dtype=float)
        if not np.isfinite(new_fc).all():  # no backtest window of the new route: no evidence
            out[seg.segment] = SeriesOutcome("kept current", seg.recent, None, 0)
            continue
        scale = seasonal_scale(y[:seg.origin + 1], plan.panel.season_length)
        new = score(metric, y[seg.origin + 1:], new_fc, scale)
        worse = is_worse(new, seg.recent, metric, tolerance)
        out[seg.segment] = SeriesOutcome("kept current" if worse else "replaced", seg.recent,
                                         new, len(periods))
    return out


def retrain_report(plan: ForecastPlan, outcomes: Mapping[str, SeriesOutcome]) -> pd.DataFrame:
    """``retrain_report.parquet``: per series what was done, why, and the comparison."""
    metric = plan.trainer.metric
    rows = []
    for seg in plan.series:
        result = outcomes.get(seg.segment)
        outcome = result.outcome if result is not None else (
            "updated" if seg.action == "update" else "unchanged")
        gain = None
        if result is not None and result.new is not None and result.current is not None:
            gain = relative_gain(result.new, result.current, metric)
        rows.append({
            **{f"key.{c}": seg.key.get(c) for c in plan.panel.key_columns},
            "segment": seg.segment, "action": seg.action, "outcome": outcome,
            "reason": seg.reason, "periods": seg.periods, "new_periods": seg.new_periods,
            f"backtest_{metric}": seg.backtest, f"recent_{metric}": seg.recent,
            f"current_{metric}": None if result is None else result.current,
            f"new_{metric}": None if result is None else result.new, "gain": gain,
            "compared_periods": 0 if result is None else result.compared})
    return pd.DataFrame(rows)


def bundle_comparison(plan: ForecastPlan, outcomes: Mapping[str, SeriesOutcome]
                      ) -> BundleComparison:
    """The new bundle against the champion on the replaced series' compared periods."""
    taken = [o for o in outcomes.values()
             if o.outcome == "replaced" and o.new is not None and o.current is not None]
    tolerance = plan.trainer.retrain.tolerance
    if not taken:
        return BundleComparison(plan.trainer.metric, 0, 0, None, None, tolerance)
    new = float(np.mean([o.new for o in taken]))
    current = float(np.mean([o.current for o in taken]))
    return BundleComparison(plan.trainer.metric, sum(o.compared for o in taken), len(taken),
                            new, current, tolerance)


@dataclass
class MergedForecast:
    """The new bundle's manifest, where its model files come from, and its tables."""

    manifest: dict[str, Any]
    sources: dict[str, Path]
    report: pd.DataFrame  # the per-series training report
    tables: dict[str, pd.DataFrame]  # backtests and history, per series from its side


_SUFFIX = re.compile(r"\.[0-9a-f]{10}$")


def merge_forecast(plan: ForecastPlan, champion: Bundle, challenger_dir: Path | None,
                   outcomes: Mapping[str, SeriesOutcome], run_id: str,
                   origin: dict[str, Any]) -> MergedForecast:
    """The champion with every series' origin moved, and the series whose new route won
    (and the new series) taken from the challenger run, models and all.

    A champion model whose name the challenger reuses for other content (the global
    model, refitted) is kept under its name with its digest appended.
    """
    raw = copy.deepcopy(champion.manifest.raw)
    section = raw["forecast"]
    columns = list(champion.manifest.segment_columns)
    moved = move_origins(section, _regular_rows(plan.panel), columns, champion.manifest.target)
    series = moved.series
    series.setdefault("fitted", _fitted_fallback(series["last"], raw, str(section["freq"])))
    routes = list(section["routes"])
    fallback = list(section["fallback"])
    taken = {s for s, o in outcomes.items() if o.outcome in ("replaced", "new")}
    champion_models = {n: dict(m.raw) for n, m in champion.manifest.models.items()}
    files = {n: champion.root / m.file for n, m in champion.manifest.models.items()}
    new_models: dict[str, Any] = {}
    from_challenger: set[str] = set()
    report = _champion_table(champion.root / "report.parquet")
    tables = {name: _champion_table(champion.root / name) for name in (BACKTESTS_FILE,
                                                                      HISTORY_FILE)}
    if taken and challenger_dir is not None:
        new_raw = json.loads((challenger_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
        new_section = new_raw["forecast"]
        # parsed: a field added since reads as its default in an older champion
        if (FeatureSpec.from_dict(new_section["features"])
                != FeatureSpec.from_dict(section["features"])):
            raise SpecError("the refitted models use other features than the champion's "
                            "(a spec or data change): retrain every series (--all)")
        new_models = new_raw["models"]
        new_index = {tuple(str(v) for v in k): i
                     for i, k in enumerate(new_section["series"]["keys"])}
        by_name = {s.segment: s for s in plan.series}
        position = {seg: new_index[tuple(by_name[seg].key[c] for c in columns)]
                    for seg in sorted(taken)}
        for route in [*(new_section["routes"][k] for k in position.values()),
                      {"members": new_section["fallback"]}]:
            from_challenger.update(m["model"] for m in route["members"] if m.get("model"))
        renamed = {n: f"{_SUFFIX.sub('', n)}.{champion_models[n]['sha256'][:10]}"
                   for n in champion_models if n in from_challenger
                   and new_models[n]["sha256"] != champion_models[n]["sha256"]}
        routes = [_renamed(r, renamed) for r in routes]
        fallback = _renamed({"members": fallback}, renamed)["members"]
        champion_models = {renamed.get(n, n): m for n, m in champion_models.items()}
        files = {renamed.get(n, n): f for n, f in files.items()}
        width = len(series["keys"])
        fields = sorted({n for n, v in [*series.items(), *new_section["series"].items()]
                         if isinstance(v, list)})
        for name in fields:  # a per-series list only one side has: the other's left empty
            series[name] = list(series.get(name) or [None] * width)
        for segment, k in position.items():
            seg = by_name[segment]
            j = seg.champion
            if j is None:  # a new series joins the end of the lists
                j = len(series["keys"])
                for name in fields:
                    series[name].append(None)
                routes.append({})
            for name in fields:
                values = new_section["series"].get(name)
                series[name][j] = values[k] if values is not None else None
            routes[j] = new_section["routes"][k]
        fallback = new_section["fallback"]
        if "intervals" in new_section:  # calibrated on the newest backtests
            section = {**section, "intervals": new_section["intervals"]}
        if "intervals" in section:
            _fill_interval_scales(series, plan.panel,
                                  section["intervals"].get("new", {}).get("level_ratio"))
        report = _by_segment(report, pd.read_parquet(challenger_dir / "report.parquet"), taken)
        for name in tables:
            if (challenger_dir / name).is_file():
                tables[name] = _by_segment(tables[name], pd.read_parquet(challenger_dir / name),
                                           taken)
        raw["data_window"] = new_raw.get("data_window", raw.get("data_window"))
        raw["specs"] = new_raw.get("specs", raw.get("specs"))
    used = {m["model"] for r in [*routes, {"members": fallback}] for m in r.get("members", [])
            if m.get("model")}
    entries: dict[str, dict[str, Any]] = {}
    sources: dict[str, Path] = {}
    for name in sorted(used):
        if name in from_challenger:
            assert challenger_dir is not None
            entries[name] = new_models[name]
            sources[name] = challenger_dir / new_models[name]["file"]
        else:
            entries[name] = champion_models[name]
            sources[name] = files[name]
    section = {**section, "series": series, "routes": routes, "fallback": fallback}
    counts: dict[str, int] = {}
    for o in outcomes.values():
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    summary = dict(raw.get("summary") or {})
    summary["retrain"] = {**counts, "updated": len(moved.moved)}
    raw.update(created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               run_id=run_id, kind="run", models=entries, forecast=section, summary=summary,
               retrain={"from": origin})
    return MergedForecast(raw, sources, report, tables)


def _fill_interval_scales(series: dict[str, Any], panel: Panel, ratio: float | None) -> None:
    """Interval scales the side a series came from lacked, from its periods as training
    computes them (one or two equal periods borrow the panel's ``ratio``)."""
    scales = series.setdefault("interval_scale", [None] * len(series["keys"]))
    where = {tuple(k): i for i, k in enumerate(panel.key_texts)}
    m = panel.season_length
    for j, key in enumerate(series["keys"]):
        if scales[j] is None:
            i = where.get(tuple(str(v) for v in key))
            scales[j] = 0.0 if i is None else thin_scale(
                panel.y[i], interval_scale(panel.y[i], m), ratio)


def _regular_rows(panel: Panel) -> pd.DataFrame:
    """Every series' periods as the panel has them (gaps filled by the spec's policy)."""
    return pd.concat([_series_rows(panel, i) for i in range(len(panel))], ignore_index=True)


def _renamed(route: dict[str, Any], renamed: Mapping[str, str]) -> dict[str, Any]:
    members = [{**m, "model": renamed.get(m["model"], m["model"])} if m.get("model") else m
               for m in route.get("members", [])]
    return {**route, "members": members}


def _champion_table(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.is_file() else pd.DataFrame()


def _by_segment(old: pd.DataFrame, new: pd.DataFrame, taken: set[str]) -> pd.DataFrame:
    """``old``'s rows of the series not taken, then ``new``'s rows of those taken."""
    keep = old[~old["segment"].astype(str).isin(taken)] if "segment" in old else old.iloc[:0]
    fresh = new[new["segment"].astype(str).isin(taken)] if "segment" in new else new.iloc[:0]
    parts = [p for p in (keep, fresh) if len(p.columns)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
