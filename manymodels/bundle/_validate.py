"""Check a bundle: checksums, onnxruntime loading, input schemas, routes, layout."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from manymodels import runtime
from manymodels.errors import BundleError
from manymodels.runtime import MANIFEST_FILE, Manifest
from manymodels.runtime.manifest import parse_manifest
from manymodels.runtime.session import make_session_options

from ._pack import RUNTIME_MODULE

__all__ = ["BUNDLE_FILES", "Problem", "ValidationReport", "validate_bundle"]

#: Files every bundle carries besides its models (checked by :func:`validate_bundle`).
BUNDLE_FILES = ("requirements.txt", "environment.json", "MLmodel", "score.py",
                f"code/{RUNTIME_MODULE}/__init__.py")

_ONNX_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)",
               "string": "tensor(string)", "int64": "tensor(int64)", "int32": "tensor(int32)",
               "bool": "tensor(bool)"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a bundle; ``fatal=False`` marks a warning."""

    message: str
    model: str | None = None
    file: str | None = None
    fatal: bool = True

    def __str__(self) -> str:
        where = " ".join(p for p in (f"model '{self.model}'" if self.model else "",
                                     self.file or "") if p)
        return f"{where}: {self.message}" if where else self.message


@dataclass
class ValidationReport:
    """Result of :func:`validate_bundle`: every problem found, not just the first."""

    path: Path
    models_checked: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.fatal]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.fatal]

    @property
    def ok(self) -> bool:
        return not self.errors


def _load_raw(path: Path, report: ValidationReport) -> dict[str, Any] | None:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        report.problems.append(Problem(f"{MANIFEST_FILE} is missing; not a bundle", file=str(path)))
        return None
    try:
        raw = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        report.problems.append(Problem(f"cannot be read as JSON: {exc}", file=MANIFEST_FILE))
        return None
    if not isinstance(raw, dict):
        report.problems.append(Problem("is not a JSON object", file=MANIFEST_FILE))
        return None
    return raw


def _check_routes(raw: Mapping[str, Any], report: ValidationReport) -> None:
    """Every route names a known model at a known level (all problems, not the first)."""
    models = raw.get("models") or {}
    levels = raw.get("levels") or []
    for route in raw.get("routes") or []:
        model_name = str(route.get("model"))
        level = route.get("level")
        if model_name not in models:
            report.problems.append(Problem(
                f"route {route.get('key')} at level {level} names a model missing from the "
                "manifest (dangling route)", model=model_name))
        elif not isinstance(level, int) or not 0 <= level < len(levels) or \
                len(route.get("key") or []) != len(levels[level]):
            report.problems.append(Problem(
                f"route {route.get('key')} does not fit level {level} of {levels}",
                model=model_name))


def _check_inputs(model_name: str, entry: runtime.ModelEntry, session: ort.InferenceSession,
                  report: ValidationReport) -> None:
    graph = {i.name: i.type for i in session.get_inputs()}
    declared = {c.name: c.dtype for c in entry.inputs}
    for column, dtype in declared.items():
        if column not in graph:
            report.problems.append(Problem(
                f"manifest input '{column}' is not an input of the ONNX graph "
                f"({', '.join(graph)})", model=model_name, file=entry.file))
        elif _ONNX_TYPES.get(dtype) != graph[column]:
            report.problems.append(Problem(
                f"input '{column}' is {dtype} in the manifest but {graph[column]} in the graph",
                model=model_name, file=entry.file))
    for column in graph.keys() - declared.keys():
        report.problems.append(Problem(
            f"ONNX graph input '{column}' is not listed in the manifest, so it is never fed",
            model=model_name, file=entry.file))
    outputs = session.get_outputs()
    if entry.kind == "classification" and (len(outputs) < 2 or not entry.classes):
        report.problems.append(Problem(
            "classification model needs a label and a probability output and class labels "
            "in the manifest", model=model_name, file=entry.file))


def _check_model(root: Path, entry: runtime.ModelEntry, options: ort.SessionOptions,
                 report: ValidationReport) -> None:
    path = root / entry.file
    if not path.is_file():
        report.problems.append(Problem("model file is missing", model=entry.name, file=entry.file))
        return
    if not entry.sha256:
        report.problems.append(Problem("manifest has no sha256 for this file",
                                       model=entry.name, file=entry.file))
    elif runtime.sha256_file(path) != entry.sha256:
        report.problems.append(Problem("sha256 does not match the manifest (file changed or "
                                       "corrupt)", model=entry.name, file=entry.file))
    if entry.bytes and path.stat().st_size != entry.bytes:
        report.problems.append(Problem(f"size {path.stat().st_size} bytes, manifest says "
                                       f"{entry.bytes}", model=entry.name, file=entry.file))
    try:
        session = ort.InferenceSession(str(path), sess_options=options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own non-exported exception types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        report.problems.append(Problem(f"onnxruntime cannot load it: {first_line}",
                                       model=entry.name, file=entry.file))
        return
    _check_inputs(entry.name, entry, session, report)


def _check_layout(root: Path, manifest: Manifest, report: ValidationReport) -> None:
    if manifest.raw.get("kind") == "bundle":
        for rel in BUNDLE_FILES:
            if not (root / rel).is_file():
                report.problems.append(Problem("bundle file is missing", file=rel))
    listed = {Path(e.file).name for e in manifest.models.values()}
    models_dir = root / "models"
    if models_dir.is_dir():
        for extra in sorted(p.name for p in models_dir.glob("*.onnx") if p.name not in listed):
            report.problems.append(Problem("not listed in the manifest (ignored when scoring)",
                                           file=f"models/{extra}", fatal=False))
    routed = {m for table in manifest.routes for m in table.values()}
    for unused in sorted(set(manifest.models) - routed):
        report.problems.append(Problem("no route uses this model", model=unused, fatal=False))
    if manifest.routes and not manifest.routes[-1] and len(manifest.levels) > 1:
        report.problems.append(Problem("no global fallback: rows of unknown segments will be "
                                       "rejected", fatal=False))


def validate_bundle(path: str | os.PathLike[str]) -> ValidationReport:
    """Check a bundle (or run) directory and list every problem found.

    Checks: the manifest parses; every route names a model of the manifest at a valid
    level; every model file exists, matches its sha256 and size, loads in onnxruntime,
    and its ONNX graph inputs equal the manifest inputs (names and element types); a
    bundle also carries its runtime copy, ``score.py``, ``MLmodel`` and environment files.
    """
    root = Path(path)
    report = ValidationReport(root)
    raw = _load_raw(root, report)
    if raw is None:
        return report
    _check_routes(raw, report)
    if report.errors:
        return report
    try:
        manifest = parse_manifest(root, raw)
    except BundleError as exc:
        report.problems.append(Problem(str(exc), file=MANIFEST_FILE))
        return report
    _check_layout(root, manifest, report)
    options = make_session_options("basic")
    for entry in manifest.models.values():
        _check_model(root, entry, options, report)
        report.models_checked += 1
    return report
