"""Champion / challenger per segment, and the merged run directory of a retrain.

For each retrained segment the challenger is what the level gate chose for it in the
fitted part: its own new model, a pooled / global model, or a blend of its own model
with a coarser one. The current model is what the champion routes the segment to (its
own old model, a shared model, or its blend), scored as it would be served if kept: the
champion's own model file, shared models as they are in the new bundle (kept ones are
the champion's, refitted ones the new fit). Both are compared only on rows the champion
never saw: the segment's held-out rows later than the champion's data window, which the
challenger's fold models predicted from earlier rows, scored by the champion bundle as
it is, shared models included (:func:`_compared`). Where there are some, but fewer than
:data:`MIN_UNSEEN_ROWS`, both are compared on the new run's folds (the champion's
candidate or level refitted there, as the challenger was). Where there are none (the
data was corrected, not extended; no time column) or the champion's choice cannot be
refitted (its candidate is gone from the spec), on the *latest holdout*
(:func:`compared_rows`), which the report then says the champion saw. Every decision
records what it was compared on and how many rows. The challenger replaces the current
model unless it is worse by more than ``retrain.tolerance``; a retrain that failed keeps
the current model. Every segment not retrained keeps the champion's route (its blend
included), and its model files are copied byte for byte.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from manymodels.candidates import higher_is_better
from manymodels.errors import BundleError, ManyModelsError
from manymodels.gate import compared_metric
from manymodels.io import link_or_copy, manifest_json, swap_directory_into_place
from manymodels.prepare import PreparedData
from manymodels.results import TrainResult
from manymodels.runtime import MANIFEST_FILE, Bundle
from manymodels.runtime.scoring import blend_outputs
from manymodels.segment import Segment
from manymodels.selection import FoldScores, score_folds

from ._plan import Plan, SegmentChange

__all__ = ["Decision", "Merged", "compared_rows", "decide", "is_worse", "relative_gain",
           "training_report", "write_merged_run"]


def compared_rows(segment: Segment, expanding: bool) -> np.ndarray:
    """Rows (of the prepared frame) of the segment's latest holdout: its latest fold's
    held-out rows with time-ordered folds, else all its held-out rows."""
    rows = segment.rows[segment.holdout]
    if not expanding or segment.block is None or not len(rows):
        return rows
    block = np.asarray(segment.block)[segment.holdout]
    return rows[block == block.max()]


def relative_gain(new: float, current: float, metric: str) -> float:
    """How much better ``new`` is than ``current`` (relative; negative when worse)."""
    sign = 1.0 if higher_is_better(metric) else -1.0
    return sign * (new - current) / max(abs(current), 1e-12)


def is_worse(new: float | None, current: float | None, metric: str, tolerance: float) -> bool:
    """``new`` is worse than ``current`` by more than ``tolerance`` (unknowns never are)."""
    if new is None or current is None or not (math.isfinite(new) and math.isfinite(current)):
        return False
    return relative_gain(new, current, metric) < -tolerance


@dataclass
class Decision:
    """What one segment ends up with in the new bundle."""

    change: SegmentChange
    route: str | None  # model name routed at level 0 (None: served by the fallback chain)
    from_champion: bool  # its own model file is the champion's (copied byte for byte)
    outcome: str  # unchanged | absent | replaced | kept current | new | failed | ...
    reason: str
    status: str
    level: str
    metric_current: float | None = None
    metric_new: float | None = None
    fit_seconds: float = 0.0
    resumed: bool = False
    blend: dict[str, Any] | None = None  # the route's {"with": coarser, "weight": w}
    #: What champion and challenger were compared on: ``unseen rows`` (after the
    #: champion's data window), ``same folds`` (both refitted on the new run's folds) or
    #: ``latest holdout`` (rows the champion may have seen), and how many rows.
    compared_on: str = ""
    compared_rows: int = 0


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _current_metric(route: dict[str, Any], segment: Segment, prepared: PreparedData,
                    champion: Bundle, refitted: Bundle, fitted: set[str],
                    positions: np.ndarray | None = None) -> tuple[float | None, str]:
    """The current route's metric on the segment's latest holdout (or on ``positions``
    of its held-out rows, as one fold), scored as it would be served if kept (see the
    module docstring), and a note when it cannot be scored."""
    expanding = prepared.plan.expanding
    rows = segment.rows[segment.holdout]
    if positions is not None:
        rows = rows[positions]
    if len(rows) == 0:
        return None, "no holdout rows to compare on"
    frame = prepared.frame.iloc[rows]
    own = str(route["model"])
    blend = route.get("blend")

    def scored(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        refit = name in fitted and name != segment.name and name in refitted.manifest.models
        bundle = refitted if refit else champion
        entry = bundle.manifest.models.get(name)
        if entry is None:
            raise BundleError(f"the current model {name} is in neither bundle")
        missing = [c for c in entry.input_names if c not in frame.columns]
        if missing:
            raise BundleError(f"the current model {name} needs column(s) "
                              f"{', '.join(missing)}, gone from the data")
        out = bundle.score_model(name, frame[entry.input_names])
        return out.prediction, out.probabilities

    try:
        prediction, proba = scored(own)
        if blend is not None:
            prediction = blend_outputs(prediction, scored(str(blend["with"]))[0],
                                       float(blend["weight"]))
            proba = None
    except ManyModelsError as exc:
        return None, f"the current model cannot score the new data: {exc}"
    entry = champion.manifest.models[own]
    classes = np.asarray(entry.classes) if entry.classes is not None else None
    fold_of = (np.asarray(segment.block)[segment.holdout]
               if segment.block is not None and positions is None
               else np.zeros(len(rows), dtype=np.int16))
    truth = prepared.frame[prepared.trainer.target].to_numpy()[rows]
    folds = score_folds(prepared.trainer.metric, truth, prediction, fold_of, proba, classes)
    return _finite(compared_metric(folds, expanding)), ""


def decide(plan: Plan, prepared: PreparedData, champion: Bundle, partial: TrainResult,
           resumed: set[str], fitted: set[str]) -> list[Decision]:
    """One decision per segment of the plan (present and gone), in plan order.

    ``fitted`` names the models this retrain fitted; a current route using one of them
    (a refitted pool) is scored with the refit, as it would be served if kept.
    """
    seg_cols = prepared.segmentation.columns
    segments = {s.name: s for s in prepared.segmentation.segments}
    old_routes = {tuple(str(v) for v in r["key"]): r
                  for r in champion.manifest.raw.get("routes", []) if int(r["level"]) == 0}
    old_records = {tuple(str(v) for v in r.get("key", [])): r
                   for r in champion.manifest.raw.get("segments") or []}
    rows: dict[str, dict[str, Any]] = {str(r["segment"]): {str(k): v for k, v in r.items()}
                                       for r in partial.report.to_dict("records")}
    refitted = Bundle(partial.run_dir)
    out = []
    for change in plan.segments:
        key = tuple(change.key[c] for c in seg_cols)
        old_route = old_routes.get(key)
        old_model = str(old_route["model"]) if old_route is not None else None
        old_blend = old_route.get("blend") if old_route is not None else None
        old_record = old_records.get(key, {})
        own_old = old_model is not None and old_model == old_record.get("segment")
        if not change.retrain:
            out.append(Decision(change, old_model, own_old,
                                "unchanged" if change.present else "absent", change.reason,
                                str(old_record.get("status", "ok")),
                                str(old_record.get("level", "")),
                                metric_current=_finite(old_record.get("metric")),
                                blend=old_blend))
            continue
        out.append(_challenge(change, old_route, own_old, old_record, rows[change.segment],
                              segments[change.segment], prepared, champion,
                              change.segment in resumed, (refitted, fitted),
                              partial.holdout_routed.get(change.segment),
                              partial.holdout_options.get(change.segment)))
    return out


def _new_blend(row: dict[str, Any]) -> dict[str, Any] | None:
    """The blend the gate chose for a retrained segment (from its report row)."""
    partner = row.get("blend_with")
    if partner is None or (isinstance(partner, float) and math.isnan(partner)):
        return None
    return {"with": str(partner), "weight": float(row["blend_weight"])}


def _challenge(change: SegmentChange, old_route: dict[str, Any] | None, own_old: bool,
               old_record: dict[str, Any], row: dict[str, Any], segment: Segment,
               prepared: PreparedData, champion: Bundle, resumed: bool,
               refit: tuple[Bundle, set[str]],
               routed: tuple[np.ndarray, np.ndarray | None] | None = None,
               options: dict[str, tuple[np.ndarray, np.ndarray | None]] | None = None
               ) -> Decision:
    """Champion / challenger for one retrained segment."""
    metric, tolerance = prepared.trainer.metric, prepared.trainer.retrain.tolerance
    new_model = row["model"] if row["routed"] else None
    new_metric = _finite(row["metric_latest"]) if new_model else None
    seconds = float(row.get("fit_seconds") or 0.0) + float(row.get("export_seconds") or 0.0)
    accepted = Decision(change, new_model, False, "new" if old_route is None else "replaced",
                        change.reason, str(row["status"]), str(row["level"]),
                        metric_new=new_metric, fit_seconds=seconds, resumed=resumed,
                        blend=_new_blend(row) if new_model else None)
    if new_model is None and row["status"] == "failed":
        accepted.outcome, accepted.reason = "failed", f"{change.reason}; {row['reason']}"
    old_model = str(old_route["model"]) if old_route is not None else None
    if old_route is None or old_model not in champion.manifest.models:
        return accepted
    current, new_metric, how, count, note = _compared(
        old_route, old_record, row, segment, prepared, champion, refit,
        routed if new_model else None, options or {})
    accepted.metric_current, accepted.metric_new = current, new_metric
    accepted.compared_on, accepted.compared_rows = how, count
    kept = Decision(change, old_model, own_old, "kept current", "", "ok",
                    str(old_record.get("level", "own" if own_old else "")),
                    metric_current=current, metric_new=new_metric, fit_seconds=seconds,
                    resumed=resumed, blend=old_route.get("blend"), compared_on=how,
                    compared_rows=count)
    if new_model is None:
        kept.reason = f"retraining failed ({row['reason']}); the current model stays"
        return kept
    if is_worse(new_metric, current, metric, tolerance):
        assert new_metric is not None and current is not None
        kept.reason = (f"challenger {_served(new_model, accepted.blend)} {metric} "
                       f"{new_metric:.6g} is worse than the current "
                       f"{_served(str(old_model), kept.blend)} {current:.6g} by "
                       f"{-relative_gain(new_metric, current, metric):.2%} "
                       f"(tolerance {tolerance:.2%}) on {how} ({count} rows)")
        return kept
    if note:
        accepted.reason = f"{change.reason}; {note}"
    return accepted


#: Fewest rows after the champion's data window to compare on them; with fewer, both
#: sides are compared on the new run's folds, fitted on the same rows.
MIN_UNSEEN_ROWS = 2


def unseen_positions(segment: Segment, prepared: PreparedData,
                     window: dict[str, Any] | None) -> np.ndarray | None:
    """Positions among the segment's held-out rows of those later than the champion's
    data ``window`` (rows it never saw); None without a time column to tell."""
    column = prepared.trainer.time_column
    if not column or not window or window.get("column") != column or window.get("max") is None:
        return None
    times = prepared.frame[column].iloc[segment.rows[segment.holdout]]
    try:
        if times.dtype.kind in "iuf":
            later = times.to_numpy(dtype=float) > float(window["max"])
        else:
            later = (times > pd.Timestamp(window["max"])).to_numpy()
    except (TypeError, ValueError):  # a zoned window against naive times, or the reverse
        return None
    return np.flatnonzero(later)


def _same_folds(old_route: dict[str, Any], old_record: dict[str, Any], row: dict[str, Any],
                champion: Bundle, expanding: bool,
                blended: Callable[[str, float], FoldScores | None]) -> float | None:
    """The champion's choice refitted on the new run's folds: its own candidate's fold
    metric (own model), its level's (pool, global), or its blend's (the same partner and
    weight, mixed from both models' out-of-fold predictions)."""
    level = str(old_record.get("level", ""))
    blend = old_route.get("blend")
    if level == "blend" and blend is not None:
        scores = blended(str(blend["with"]), float(blend["weight"]))
        return compared_metric(scores, expanding) if scores is not None else None
    key: str | None = None
    folds: dict[str, Any] = {}
    try:
        if level == "own":
            entry = champion.manifest.models.get(str(old_route["model"]))
            key = str(entry.raw.get("candidate", "")) if entry is not None else None
            folds = json.loads(row.get("candidate_folds") or "{}")
        else:
            key = level
            folds = json.loads(row.get("level_folds") or "{}")
    except (TypeError, ValueError):
        return None
    scores = folds.get(key or "")
    if not isinstance(scores, dict) or not scores.get("folds"):
        return None
    return _finite(scores["folds"][-1] if expanding else scores.get("mean"))


def _compared(old_route: dict[str, Any], old_record: dict[str, Any], row: dict[str, Any],
              segment: Segment, prepared: PreparedData, champion: Bundle,
              refit: tuple[Bundle, set[str]],
              routed: tuple[np.ndarray, np.ndarray | None] | None,
              options: dict[str, tuple[np.ndarray, np.ndarray | None]]
              ) -> tuple[float | None, float | None, str, int, str]:
    """Current and new metric, on what they were compared, how many rows, and a note.

    Only rows the champion never saw are fair to it and to the challenger (whose fold
    models predicted them from earlier rows): the held-out rows after its data window,
    scored by the champion bundle as it is (a refitted shared model has seen them).
    With too few of them both are compared on the new run's folds (the champion's
    candidate or level refitted there, as the challenger was). Where the data does not
    extend past the window at all (history corrected or rewritten, or no time column),
    or the champion's choice cannot be refitted, on the latest holdout, which the
    champion was fitted on in its old values (and said so).
    """
    expanding = prepared.plan.expanding
    new_metric = _finite(row.get("metric_latest"))
    held = segment.rows[segment.holdout]
    unseen = unseen_positions(segment, prepared, champion.manifest.raw.get("data_window"))
    if unseen is not None and len(unseen) >= MIN_UNSEEN_ROWS and routed is not None:
        # the champion as it is, shared models included: a refitted pool saw these rows
        current, note = _current_metric(old_route, segment, prepared, champion, refit[0],
                                        set(), unseen)
        truth = prepared.frame[prepared.trainer.target].to_numpy()[held[unseen]]
        entry = champion.manifest.models.get(str(old_route["model"]))
        classes = (np.asarray(entry.classes)
                   if entry is not None and entry.classes is not None else None)
        proba = routed[1][unseen] if routed[1] is not None else None
        scores = score_folds(prepared.trainer.metric, truth, routed[0][unseen],
                             np.zeros(len(unseen), dtype=np.int16), proba, classes)
        return current, _finite(scores.values[0]), "unseen rows", int(len(unseen)), note
    latest = int(len(compared_rows(segment, expanding)))

    def blended(partner: str, weight: float) -> FoldScores | None:
        own, other = options.get(segment.name), options.get(partner)
        if own is None or other is None or segment.block is None:
            return None
        return score_folds(prepared.trainer.metric,
                           prepared.frame[prepared.trainer.target].to_numpy()[held],
                           blend_outputs(own[0], other[0], weight),
                           np.asarray(segment.block)[segment.holdout])

    extended = unseen is not None and len(unseen) > 0  # too few rows, but new ones
    same = _same_folds(old_route, old_record, row, champion, expanding, blended) \
        if extended else None
    if same is not None and new_metric is not None:
        return same, new_metric, "same folds", latest, ""
    current, note = _current_metric(old_route, segment, prepared, champion, *refit)
    return current, new_metric, "latest holdout (the champion saw these rows)", latest, note


def _served(model: str, blend: dict[str, Any] | None) -> str:
    """A route as a reader says it: ``model`` or ``model blended with partner (w=0.5)``."""
    if blend is None:
        return model
    return f"{model} blended with {blend['with']} (w={float(blend['weight']):g})"


@dataclass
class Merged:
    """The merged manifest of a retrain and where each of its model files comes from."""

    manifest: dict[str, Any]
    sources: dict[str, Path]  # model name -> file to copy
    decisions: list[Decision]


def _coarser_routes(champion: Bundle, partial_raw: dict[str, Any]) -> list[dict[str, Any]]:
    """Routes of the shared levels: the fitted part's, plus the champion's for pools the new
    data no longer has (or whose refit failed), so their segments keep being served."""
    routes = [r for r in partial_raw.get("routes", []) if int(r["level"]) > 0]
    covered = {(int(r["level"]), tuple(str(v) for v in r["key"])) for r in routes}
    for route in champion.manifest.raw.get("routes", []):
        level = int(route["level"])
        if level > 0 and (level, tuple(str(v) for v in route["key"])) not in covered:
            routes.append(route)
    return routes


def merge(plan: Plan, decisions: list[Decision], prepared: PreparedData, champion: Bundle,
          partial: TrainResult, fitted: set[str], run_id: str, origin: dict[str, Any]) -> Merged:
    """Routes, models and segment records of the new bundle.

    ``fitted`` names the models this retrain fitted (now or before a crash); every other
    model of the new bundle is the champion's: its manifest entry and its file.
    """
    partial_raw = json.loads((partial.run_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    partial_models: dict[str, Any] = partial_raw.get("models", {})
    champion_models = champion.manifest.models
    seg_cols = prepared.segmentation.columns
    routes: list[dict[str, Any]] = []
    sources: dict[str, Path] = {}
    entries: dict[str, dict[str, Any]] = {}

    def take(name: str, from_champion: bool) -> bool:
        if name in entries:
            return True
        if not from_champion and name in partial_models:
            entries[name] = partial_models[name]
            sources[name] = partial.run_dir / partial_models[name]["file"]
            return True
        if name in champion_models:
            entries[name] = dict(champion_models[name].raw)
            sources[name] = champion.root / champion_models[name].file
            return True
        return False

    for d in decisions:
        if d.route is None:
            continue
        new_own = d.change.retrain and not d.from_champion and d.route == d.change.segment
        from_champion = d.from_champion or (not new_own and d.route not in fitted)
        if not take(d.route, from_champion):
            continue
        route: dict[str, Any] = {"level": 0, "key": [d.change.key[c] for c in seg_cols],
                                 "model": d.route}
        if d.blend is not None:  # its partner is a shared model: kept, or refitted now
            partner = str(d.blend["with"])
            if not take(partner, partner not in fitted):
                raise BundleError(f"segment {d.change.segment} blends with {partner}, which "
                                  "neither the champion nor this retrain has")
            route["blend"] = dict(d.blend)
        routes.append(route)
    for route in _coarser_routes(champion, partial_raw):
        if take(str(route["model"]), str(route["model"]) not in fitted):
            routes.append(route)
    records = _segment_records(decisions, prepared, champion, seg_cols)
    failed = [{"key": dict(d.change.key), "reason": d.reason, "segment": d.change.segment}
              for d in decisions if d.status == "failed" and d.outcome != "kept current"]
    levels = Counter(r["level"] for r in records if r.get("level"))
    manifest = {k: v for k, v in partial_raw.items()
                if k not in {"routes", "models", "failed", "segments", "summary"}}
    manifest.update(
        created_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        run_id=run_id, routes=routes, models=entries, failed=failed, segments=records,
        summary={"segments": len(records),
                 "trained": sum(r["status"] == "ok" for r in records),
                 "failed": len(failed), "levels": dict(levels), "metric": partial_raw["metric"],
                 "retrain": dict(Counter(d.outcome for d in decisions))},
        retrain={"from": origin, "plan": plan.identity,
                 "shared": {s.name: {"action": s.action, "reason": s.reason}
                            for s in plan.shared.values()}})
    return Merged(manifest, sources, decisions)


def _segment_records(decisions: list[Decision], prepared: PreparedData, champion: Bundle,
                     seg_cols: list[str]) -> list[dict[str, Any]]:
    old = {tuple(str(v) for v in r.get("key", [])): r
           for r in champion.manifest.raw.get("segments") or []}
    out = []
    for d in decisions:
        key = tuple(d.change.key[c] for c in seg_cols)
        if not d.change.retrain:
            out.append(old[key])
            continue
        metric = d.metric_current if d.outcome == "kept current" else d.metric_new
        out.append({"segment": d.change.segment, "key": list(key),
                    "fingerprint": prepared.fingerprints[d.change.segment], "status": d.status,
                    "rows": d.change.rows, "model": d.route, "level": d.level,
                    "metric": metric})
    return out


def training_report(decisions: list[Decision], champion: Bundle, partial: TrainResult
                    ) -> pd.DataFrame:
    """The per-segment training report of the merged run (what ``manymodels report`` reads):
    the fitted part's rows for replaced and new segments, the champion's for the others
    (when the champion carries its report), in decision order."""
    fresh = {d.change.segment for d in decisions
             if d.change.retrain and d.outcome != "kept current"}
    order = {d.change.segment: i for i, d in enumerate(decisions)}
    old_path = champion.root / "report.parquet"
    sources = [(pd.read_parquet(old_path), set(order) - fresh)] if old_path.is_file() else []
    sources.append((partial.report, fresh))
    parts = [p for p in (_rows_of(r, names, order) for r, names in sources) if len(p)]
    if not parts:
        return pd.DataFrame()
    return pd.concat(parts, ignore_index=True).sort_values("_order", kind="stable") \
        .drop(columns="_order").reset_index(drop=True)


def _rows_of(report: pd.DataFrame, segments: set[str], order: dict[str, int]) -> pd.DataFrame:
    """The rows of ``report`` for ``segments`` (the last one per segment), tagged with their
    place in the decisions."""
    if "segment" not in report:
        return report.iloc[:0]
    names = report["segment"].astype(str)
    picked = report[names.isin(segments) & ~names.duplicated(keep="last")].copy()
    picked["_order"] = picked["segment"].astype(str).map(order)
    return picked


def write_merged_run(merged: Merged, run_dir: Path, report: pd.DataFrame,
                     specs: Mapping[str, Any], trained: pd.DataFrame,
                     tables: Mapping[str, pd.DataFrame] | None = None) -> None:
    """Write the merged run directory atomically (staged beside it, renamed into place):
    ``report.parquet`` is the per-segment training report, ``retrain_report.parquet``
    what the retrain did with each segment, ``specs`` the specs by kind (``segmenter``,
    ``trainer``) and ``tables`` further files (a forecasting run's backtests)."""
    if run_dir.exists():
        raise BundleError(f"run directory {run_dir} already exists; choose another run id")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = run_dir.parent / f".{run_dir.name}.{uuid.uuid4().hex[:6]}.tmp"
    (staging / "models").mkdir(parents=True)
    try:
        for name, src in merged.sources.items():
            if not src.is_file():
                raise BundleError(f"model '{name}': {src} is missing; the champion bundle or "
                                  "the retrain state is incomplete")
            link_or_copy(src, staging / "models" / f"{name}.onnx")
            merged.manifest["models"][name] = {**merged.manifest["models"][name],
                                               "file": f"models/{name}.onnx"}
        (staging / "specs").mkdir()
        for kind, spec in specs.items():
            (staging / "specs" / f"{kind}.yaml").write_text(
                yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False))
        report.to_parquet(staging / "retrain_report.parquet", index=False)
        trained.to_parquet(staging / "report.parquet", index=False)
        for name, table in (tables or {}).items():
            if len(table.columns):
                table.to_parquet(staging / name, index=False)
        (staging / MANIFEST_FILE).write_bytes(manifest_json(merged.manifest))
        swap_directory_into_place(staging, run_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
