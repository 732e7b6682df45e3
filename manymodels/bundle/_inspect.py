"""Summarise a bundle or run directory: its models, the selection metric, totals."""

from __future__ import annotations

import os
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manymodels.runtime import Manifest, blend_label, read_manifest

__all__ = ["BundleSummary", "ModelRow", "SegmentRoute", "format_key", "inspect_bundle",
           "segment_routes", "selection_metric", "summarise"]


@dataclass(frozen=True)
class SegmentRoute:
    """What serves one segment: its own model, a pool, the global model or a blend."""

    segment: str  # its key, e.g. ``store=1, brand=a``
    status: str  # ok, small, constant (one class), failed, skipped
    kind: str  # own | pooled | global | blend | fallback | none
    model: str | None  # the model its rows go to (a blend's own member)
    blend_with: str | None = None
    weight: float | None = None  # the own model's weight in a blend

    @property
    def answer(self) -> str | None:
        """What a scoring answer's ``model`` field names for this segment's rows: the
        model, or a blend with its members and weights."""
        if self.kind == "blend" and self.model is not None and self.blend_with is not None:
            return blend_label(self.model, self.blend_with, self.weight or 0.0)
        return self.model

    def as_dict(self) -> dict[str, Any]:
        """The route as JSON-ready fields, with its description and answer name."""
        return {"segment": self.segment, "status": self.status, "kind": self.kind,
                "model": self.model, "blend_with": self.blend_with, "weight": self.weight,
                "route": self.describe(), "answer": self.answer}

    def describe(self) -> str:
        if self.kind == "blend":
            return (f"blend: {self.weight:g} × {self.model} + {1 - (self.weight or 0):g} × "
                    f"{self.blend_with}")
        if self.model is None:
            return "none (no model and no fallback)"
        return f"{self.kind}: {self.model}"


@dataclass(frozen=True)
class ModelRow:
    """One model of a bundle as :func:`inspect_bundle` shows it."""

    name: str
    segment: str
    level: int
    algorithm: str
    metric: float | None
    rows: int | None
    bytes: int


@dataclass(frozen=True)
class BundleSummary:
    """A bundle at a glance: its models and totals."""

    path: Path
    name: str
    version: str
    kind: str
    created_at: str
    run_id: str | None
    segment_columns: list[str]
    levels: list[list[str]]
    metric_name: str | None
    models: list[ModelRow]
    failed: list[dict[str, Any]]
    routes: int
    #: Every segment the run saw and what serves it (pooled, global and blended ones too).
    segments: list[SegmentRoute] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(m.bytes for m in self.models)

    @property
    def segment_models(self) -> int:
        return sum(1 for m in self.models if m.level == 0)

    @property
    def algorithms(self) -> dict[str, int]:
        return dict(Counter(m.algorithm for m in self.models).most_common())

    def metric_summary(self) -> dict[str, float]:
        """Median, min and max of the selection metric over the segment models."""
        values = [m.metric for m in self.models if m.level == 0 and m.metric is not None]
        if not values:
            return {}
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def format_key(key: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items()) or "(global)"


def selection_metric(manifest: Manifest) -> str | None:
    """The metric the trainer selected winners by, or the first metric models report."""
    for key in ("metric", "selection_metric"):
        if isinstance(manifest.raw.get(key), str):
            return str(manifest.raw[key])
    trainer = manifest.raw.get("trainer")
    if isinstance(trainer, Mapping) and isinstance(trainer.get("metric"), str):
        return str(trainer["metric"])
    for entry in manifest.models.values():
        metrics = entry.raw.get("metrics") or {}
        numeric = [k for k, v in metrics.items() if isinstance(v, int | float)]
        if numeric:
            return str(numeric[0])
    return None


def _metric_value(entry_raw: Mapping[str, Any], metric: str | None) -> float | None:
    value = (entry_raw.get("metrics") or {}).get(metric) if metric else None
    return float(value) if isinstance(value, int | float) else None


def summarise(manifest: Manifest) -> BundleSummary:
    """Build the :class:`BundleSummary` of an already parsed manifest."""
    metric = selection_metric(manifest)
    rows = []
    for model_name, entry in manifest.models.items():
        segment = format_key(entry.key)
        if entry.level > 0 and entry.key:
            segment = f"{segment} (pooled)"
        raw_rows = entry.raw.get("rows")
        rows.append(ModelRow(
            name=model_name, segment=segment, level=entry.level, algorithm=entry.algorithm,
            metric=_metric_value(entry.raw, metric),
            rows=int(raw_rows) if isinstance(raw_rows, int | float) else None,
            bytes=entry.bytes or _file_size(manifest.root / entry.file),
        ))
    rows.sort(key=lambda r: (r.level, r.segment))
    raw = manifest.raw
    return BundleSummary(
        path=manifest.root, name=manifest.name, version=str(raw.get("version") or "?"),
        kind=str(raw.get("kind", "?")), created_at=str(raw.get("created_at", "?")),
        run_id=raw.get("run_id"), segment_columns=manifest.segment_columns,
        levels=manifest.levels, metric_name=metric, models=rows,
        failed=list(raw.get("failed", [])), routes=sum(len(t) for t in manifest.routes),
        segments=segment_routes(manifest),
    )


def segment_routes(manifest: Manifest) -> list[SegmentRoute]:
    """One :class:`SegmentRoute` per segment the manifest records, in its order: the
    route the runtime takes for the segment's key (own, pooled, global, or a blend).

    A manifest without a segment record (written by hand or by another tool) lists the
    keys of its segment routes (level 0) instead.
    """
    columns = manifest.segment_columns
    out = []
    records = manifest.raw.get("segments") or [
        {"key": route.get("key", []), "segment": route.get("model")}
        for route in manifest.raw.get("routes") or []
        if route.get("level") == 0 and manifest.levels and len(manifest.levels[0]) == len(columns)]
    for record in records:
        values = [str(v) for v in record.get("key", [])]
        if len(values) != len(columns):
            continue
        key = dict(zip(columns, values, strict=True))
        name, fell_back = manifest.resolve(key)
        status = str(record.get("status", "ok"))
        blend = manifest.blends.get(name) if name is not None and not fell_back else None
        entry = manifest.models.get(name) if name is not None else None
        if name is None:
            kind = "none"
        elif blend is not None:
            kind = "blend"
        elif entry is not None and not entry.key:
            kind = "global"
        elif entry is not None and entry.level > 0 or name != record.get("segment"):
            kind = "pooled"
        else:
            kind = "own"
        if fell_back and status != "ok" and kind != "none":
            kind = f"fallback to {kind}"
        out.append(SegmentRoute(format_key(key), status, kind, name,
                                blend.partner if blend is not None else None,
                                blend.weight if blend is not None else None))
    return out


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def inspect_bundle(path: str | os.PathLike[str]) -> BundleSummary:
    """Read the manifest of a bundle (or run) directory and summarise its models."""
    return summarise(read_manifest(Path(path)))
