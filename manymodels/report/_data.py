"""What a report shows, read from a run or bundle directory (and ``monitor`` output).

A run directory has ``report.parquet`` (one row per segment, written by
:mod:`manymodels.training`) beside ``manifest.json``; a bundle carries a copy of it when it
was packed from such a run. A bundle without one still gets a report: its segments are
rebuilt from the manifest's routing table (fewer columns: no per-level metrics, no
timings), and the report says so.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from manymodels.errors import BundleError, DataError
from manymodels.registry import resolve_bundle
from manymodels.runtime import MANIFEST_FILE

from ._forecast_data import (
    SERIES_LIMIT,
    ForecastEvidence,
    load_forecast_evidence,
    segments_from_forecast_manifest,
)

__all__ = ["REPORT_FILE", "SERIES_LIMIT", "ReportData", "load_monitor", "load_report_data",
           "monitor_records"]

#: Per-segment training report inside a run directory (and copied into bundles).
REPORT_FILE = "report.parquet"


@dataclass
class ReportData:
    """Everything one HTML report is rendered from."""

    source: Path
    manifest: dict[str, Any]
    segments: pd.DataFrame
    #: where ``segments`` came from: ``report.parquet`` or ``the manifest's routing table``
    segments_from: str
    monitor: dict[str, Any] | None = None
    monitor_from: str | None = None
    notes: list[str] = field(default_factory=list)
    #: a forecasting run's plotted series (``None`` for other runs)
    forecast: ForecastEvidence | None = None

    @property
    def is_forecast(self) -> bool:
        return self.manifest.get("task") == "forecast"

    @property
    def kind(self) -> str:
        return str(self.manifest.get("kind", "run"))

    @property
    def metric(self) -> str:
        return str(self.manifest.get("metric") or self.summary.get("metric") or "metric")

    @property
    def summary(self) -> dict[str, Any]:
        return dict(self.manifest.get("summary") or {})

    @property
    def title(self) -> str:
        if self.kind == "bundle":
            return f"bundle {self.manifest.get('name')} version {self.manifest.get('version')}"
        return f"run {self.manifest.get('run_id') or self.source.name}"


def _local_dir(source: str | os.PathLike[str]) -> Path:
    """A run/bundle directory path; ``models:/`` URIs are resolved through the registry."""
    text = os.fspath(source)
    if text.startswith("models:"):
        return resolve_bundle(text)
    path = Path(text)
    if not (path / MANIFEST_FILE).is_file():
        raise BundleError(f"{path} is not a manymodels run or bundle directory "
                          f"({MANIFEST_FILE} is missing)")
    return path


def _read_manifest_json(root: Path) -> dict[str, Any]:
    try:
        raw = json.loads((root / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BundleError(f"{root / MANIFEST_FILE} cannot be read as JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise BundleError(f"{root / MANIFEST_FILE} is not a JSON object")
    return raw


def _level_name(level: int, levels: list[Any]) -> str:
    if level == 0:
        return "own"
    return "global" if level == len(levels) - 1 else "pool"


def segments_from_manifest(manifest: dict[str, Any]) -> pd.DataFrame:
    """One row per segment rebuilt from the routing table and the failure list.

    Level-0 routes are the segments the run routed; each names the model it chose, whose
    entry gives the level and the algorithm. Failed segments come from ``failed``.
    """
    columns = [str(c) for c in manifest.get("segment_columns", [])]
    levels = list(manifest.get("levels") or [columns, []])
    models = dict(manifest.get("models") or {})
    metric = str(manifest.get("metric", ""))
    rows: list[dict[str, Any]] = []
    for route in manifest.get("routes", []):
        if int(route.get("level", 0)) != 0:
            continue
        model = str(route["model"])
        entry = dict(models.get(model, {}))
        level = int(entry.get("level", 0))
        key = dict(zip(columns, [str(v) for v in route["key"]], strict=False))
        own = level == 0
        rows.append({
            **{f"key.{c}": v for c, v in key.items()},
            "segment": model if own else "__".join(f"{c}={v}" for c, v in key.items()),
            "status": "ok", "reason": "", "rows": int(entry.get("rows", 0)) if own else None,
            "winner": str(entry.get("candidate", "")) if own else "",
            "algorithm": str(entry.get("algorithm", "")) if own else "",
            "metric_own": (entry.get("metrics") or {}).get(metric) if own else None,
            "level": "blend" if route.get("blend") else _level_name(level, levels),
            "model": model, "routed": True,
        })
    for failed in manifest.get("failed", []):
        key = {str(k): str(v) for k, v in dict(failed.get("key", {})).items()}
        rows.append({**{f"key.{c}": v for c, v in key.items()},
                     "segment": str(failed.get("segment") or key), "status": "failed",
                     "reason": str(failed.get("reason", "")), "level": "fallback",
                     "model": None, "routed": False})
    return pd.DataFrame(rows)


def _read_segments(root: Path, manifest: dict[str, Any]) -> tuple[pd.DataFrame, str]:
    candidates = [root / REPORT_FILE]
    source_run = manifest.get("source_run") or {}
    if manifest.get("kind") == "bundle" and source_run.get("path"):
        candidates.append(Path(str(source_run["path"])) / REPORT_FILE)
    for path in candidates:
        if path.is_file():
            try:
                return pd.read_parquet(path), str(path)
            except (OSError, ValueError) as exc:
                raise BundleError(f"{path} cannot be read as Parquet: {exc}") from exc
    if manifest.get("task") == "forecast":
        return segments_from_forecast_manifest(manifest), "the manifest's forecast routes"
    return segments_from_manifest(manifest), "the manifest's routing table"


def load_monitor(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``manymodels monitor`` JSON output (a JSON object; per-model results inside)."""
    file = Path(path)
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise DataError(f"monitor file {file} does not exist") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"monitor file {file} cannot be read as JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise DataError(f"monitor file {file} is not a JSON object (manymodels monitor output)")
    return raw


def monitor_records(monitor: Mapping[str, Any], flatten: bool = True) -> list[dict[str, Any]]:
    """Per-model records of monitor output (``models`` as a mapping or a list).

    With ``flatten``, nested values become one ``key=value; ...`` string, so each record
    is one table row.
    """
    models = monitor.get("models", monitor.get("results", []))
    if isinstance(models, Mapping):
        records = [{"model": name, **(dict(v) if isinstance(v, Mapping) else {"value": v})}
                   for name, v in models.items()]
    elif isinstance(models, list):
        records = [dict(v) for v in models if isinstance(v, Mapping)]
    else:
        records = []
    if not flatten:
        return records
    return [{k: v for k, v in r.items() if not isinstance(v, (Mapping, list))}
            | {k: _flat(v) for k, v in r.items() if isinstance(v, (Mapping, list))}
            for r in records]


def _flat(value: Any) -> str:
    if isinstance(value, Mapping):
        return "; ".join(f"{k}={_text(v)}" for k, v in value.items()
                         if not isinstance(v, (Mapping, list)))
    return ", ".join(_text(v) for v in value if not isinstance(v, (Mapping, list)))


def _text(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


#: File names a bundle's ``manymodels monitor`` output is looked for under, in order.
MONITOR_FILES = ("monitor.json", "monitor/latest.json")


def load_report_data(source: str | os.PathLike[str],
                     monitor: str | os.PathLike[str] | None = None,
                     series: int = SERIES_LIMIT) -> ReportData:
    """Read a run or bundle (directory or ``models:/`` URI) and optional monitor output.

    Without ``monitor``, a ``monitor.json`` inside the directory is used when present. For
    a forecasting run, the first ``series`` series are read for plotting, with their
    forecast.
    """
    root = _local_dir(source)
    manifest = _read_manifest_json(root)
    segments, segments_from = _read_segments(root, manifest)
    data = ReportData(root, manifest, segments, segments_from)
    if data.is_forecast:
        data.forecast = load_forecast_evidence(root, manifest, segments, series)
    monitor_path = Path(monitor) if monitor is not None else next(
        (root / name for name in MONITOR_FILES if (root / name).is_file()), None)
    if monitor_path is not None:
        data.monitor = load_monitor(monitor_path)
        data.monitor_from = str(monitor_path)
    return data
