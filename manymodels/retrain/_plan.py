"""Change detection: which segments and shared models a retrain refits, and why.

Every segment's rows are fingerprinted as a training job sees them (features, target,
time column; after anomaly removal) and compared with the fingerprint the champion's
manifest recorded for it. A segment is retrained when it is new, its data changed, the
specs changed (the fields that shape models: not the spec's name, not its ``retrain``
section) or it failed before; every other segment keeps its model. A shared model (the
small-segment pool, a pool of a coarser level, the global model) is refitted only from
``retrain.refit_share`` of changed rows on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from manymodels.errors import SpecError
from manymodels.jobs import coarser_models
from manymodels.prepare import PreparedData
from manymodels.segment import model_name
from manymodels.specs import (
    DEFAULT_METHODS,
    SegmenterSpec,
    TrainerSpec,
    load_segmenter,
    load_trainer,
)

__all__ = ["Plan", "SegmentChange", "SharedChange", "make_plan", "spec_changes"]


@dataclass(frozen=True)
class SegmentChange:
    """What happens to one segment, and why."""

    segment: str
    key: dict[str, str]
    retrain: bool
    reason: str
    rows: int  # in the new data (for a segment gone from it: in the champion)
    changed: bool  # its rows count as changed for the shared models it belongs to
    present: bool  # in the new data


@dataclass
class SharedChange:
    """What happens to one shared model (small pool, coarser pool, global), and why."""

    name: str
    level: int
    action: str  # "refit", "keep", or "skip" (not in the champion and not needed)
    reason: str
    rows: int
    changed_rows: int

    @property
    def share(self) -> float:
        return self.changed_rows / self.rows if self.rows else 0.0


@dataclass
class Plan:
    """The whole change detection result of one retrain."""

    segments: list[SegmentChange]
    shared: dict[str, SharedChange]
    spec_changes: list[str]
    identity: str  # same champion, data and specs -> same identity (resume key)
    #: Series whose origin moves to new periods without a refit (forecasting)
    moved: int = 0

    def __post_init__(self) -> None:
        self.retrained = {s.segment for s in self.segments if s.retrain}

    @property
    def nothing_to_do(self) -> bool:
        return not self.retrained and not self.moved \
            and not any(s.action == "refit" for s in self.shared.values())

    def counts(self) -> dict[str, int]:
        reasons: dict[str, int] = {}
        for seg in self.segments:
            label = seg.reason.split(" (")[0].split(":")[0]
            reasons[label] = reasons.get(label, 0) + 1
        return reasons

    def segments_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"segment": s.segment, "action": "retrain" if s.retrain else "keep",
                              "reason": s.reason, "rows": s.rows} for s in self.segments])

    def shared_frame(self) -> pd.DataFrame:
        return pd.DataFrame([{"model": s.name, "level": s.level, "action": s.action,
                              "reason": s.reason, "rows": s.rows, "changed_rows": s.changed_rows,
                              "changed_share": round(s.share, 4)} for s in self.shared.values()])


def _shaping_fields(kind: str, dump: Any) -> dict[str, Any] | None:
    """A spec's fields that shape models, re-validated by today's spec class (so a field
    added since, with its default, compares equal); None if it no longer validates."""
    if not isinstance(dump, dict):
        return None
    try:
        spec: SegmenterSpec | TrainerSpec = (load_segmenter(dict(dump)) if kind == "segmenter"
                                             else load_trainer(dict(dump)))
    except SpecError:
        return None
    fields = spec.model_dump(mode="json")
    fields.pop("name", None)
    fields.pop("retrain", None)
    forecast = fields.get("forecast")
    if isinstance(forecast, dict) and forecast.get("methods") == list(DEFAULT_METHODS):
        # what bundles recorded when the default did not yet depend on the season
        forecast["methods"] = None
    return fields


def spec_changes(champion: dict[str, Any], segmenter: SegmenterSpec, trainer: TrainerSpec
                 ) -> list[str]:
    """What changed between the champion's specs and these, one phrase per spec."""
    specs = champion.get("specs")
    if not isinstance(specs, dict):
        return ["the champion records no specs (it was made before manymodels retrain)"]
    out = []
    for kind, current in (("segmenter", segmenter), ("trainer", trainer)):
        old = _shaping_fields(kind, specs.get(kind))
        new = _shaping_fields(kind, current.model_dump(mode="json"))
        assert new is not None
        if old is None:
            out.append(f"the champion's {kind} spec no longer validates")
            continue
        fields = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if fields:
            out.append(f"{kind} {', '.join(fields)}")
    return out


def _segment_change(name: str, key: dict[str, str], rows: int, fingerprint: str,
                    record: dict[str, Any] | None, forced: str | None) -> SegmentChange:
    changed = record is None or record.get("fingerprint") != fingerprint or forced is not None
    if forced is not None:
        reason: str | None = forced
    elif record is None:
        reason = "new segment"
    elif record.get("fingerprint") != fingerprint:
        reason = f"data changed ({record.get('rows', '?')} -> {rows} rows)"
    elif record.get("status") == "failed":
        reason = "failed before"
    else:
        reason = None
    return SegmentChange(name, key, reason is not None, reason or "unchanged", rows, changed, True)


def _key_of(record: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(v) for v in record.get("key", []))


def _gone_rows(records: dict[tuple[str, ...], dict[str, Any]], present: set[tuple[str, ...]],
               seg_cols: list[str], segmenter: SegmenterSpec, trainer: TrainerSpec
               ) -> dict[str, int]:
    """Rows of segments gone from the data, per shared model they belonged to."""
    out: dict[str, int] = {}
    levels = segmenter.resolved_levels
    small_pool = f"{model_name(trainer.target, {})[:-len('__global')]}__small_pool"
    for key_values, record in records.items():
        if key_values in present:
            continue
        key = dict(zip(seg_cols, key_values, strict=True))
        rows = int(record.get("rows") or 0)
        if record.get("status") in ("small", "skipped"):
            if segmenter.small_segments == "pool":
                out[small_pool] = out.get(small_pool, 0) + rows
            if segmenter.small_segments == "skip":
                continue
        for level_cols in levels[1:]:
            if all(c in key for c in level_cols):
                shared = model_name(trainer.target, {c: key[c] for c in level_cols})
                out[shared] = out.get(shared, 0) + rows
    return out


def make_plan(champion: dict[str, Any], prepared: PreparedData, retrain_all: bool = False
              ) -> Plan:
    """Compare the prepared new data with the champion's manifest (its raw dict)."""
    seg_spec, tr_spec = prepared.segmenter, prepared.trainer
    segmentation = prepared.segmentation
    # matched by key, not by name: a new segment whose name collides after sanitising
    # renames an old one (a hash suffix), and must not make it look gone and new
    records = {_key_of(r): r for r in champion.get("segments") or []}
    differences = spec_changes(champion, seg_spec, tr_spec)
    forced = ("--all" if retrain_all else
              f"spec changed: {'; '.join(differences)}" if differences else None)
    seg_cols = segmentation.columns
    changes = [_segment_change(seg.name, seg.key, len(seg.rows), prepared.fingerprints[seg.name],
                               records.get(tuple(seg.key[c] for c in seg_cols)), forced)
               for seg in segmentation.segments]
    present = {tuple(seg.key[c] for c in seg_cols) for seg in segmentation.segments}
    if list(champion.get("segment_columns") or seg_cols) != seg_cols:
        records = {}  # other segment columns: no old segment is one of these (spec changed)
    for key_values, record in records.items():
        if key_values not in present:
            changes.append(SegmentChange(str(record["segment"]), dict(zip(seg_cols, key_values,
                                                                          strict=True)),
                                         False, "not in the new data: kept as it is",
                                         int(record.get("rows") or 0), True, False))
    by_name = {c.segment: c for c in changes if c.present}
    gone = _gone_rows(records, present, seg_cols, seg_spec, tr_spec)
    models = champion.get("models") or {}
    limit = tr_spec.retrain.refit_share
    shared: dict[str, SharedChange] = {}
    for model in coarser_models(segmentation, seg_spec, tr_spec):
        members = [segmentation.segments[i] for i in model.members]
        rows = sum(len(s.rows) for s in members) + gone.get(model.name, 0)
        changed = sum(len(s.rows) for s in members if by_name[s.name].changed) \
            + gone.get(model.name, 0)
        share = changed / rows if rows else 0.0
        needed = any(by_name[s.name].retrain for s in members)
        if forced is not None:
            action, reason = "refit", forced
        elif model.name not in models:
            action, reason = (("refit", "not in the champion (new, or failed before)")
                              if needed or model.level > 0 else
                              ("skip", "not in the champion and no member changed"))
        elif share >= limit:
            action, reason = "refit", f"{share:.1%} of its rows changed (refit_share {limit:.0%})"
        elif changed:
            action, reason = "keep", f"{share:.1%} of its rows changed (< refit_share {limit:.0%})"
        else:
            action, reason = "keep", "unchanged"
        shared[model.name] = SharedChange(model.name, model.level, action, reason, rows, changed)
    identity = hashlib.sha256(json.dumps({
        "champion": champion.get("version"), "run": champion.get("run_id"),
        "fingerprints": sorted(prepared.fingerprints.items()),
        "segmenter": seg_spec.model_dump(mode="json"), "trainer": tr_spec.model_dump(mode="json"),
        "all": retrain_all}, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Plan(changes, shared, differences, identity)
