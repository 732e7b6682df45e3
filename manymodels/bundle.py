"""Pack a training run into one bundle directory; inspect and validate bundles.

A *run* directory (``manymodels train``) holds every model the trainer exported. A
*bundle* is what gets deployed and registered: only the models the routing table uses,
a manifest of kind ``bundle``, an environment record, an MLflow ``MLmodel`` file whose
``python_function`` flavor loads the bundled copy of :mod:`manymodels.runtime`, and an
Azure ML ``score.py``. Every model is ONNX, so serving needs onnxruntime, numpy and
pandas and nothing the models were trained with.

Layout of a bundle::

    <out>/
      manifest.json        kind "bundle": routes, fallback chain, one entry per model
      models/<name>.onnx   only the models some route uses
      requirements.txt     exact serving requirements (onnxruntime, numpy, pandas)
      environment.json     Python version, serving and training package versions
      python_env.yaml      \\ MLflow environment files, so that ``mlflow models serve``
      conda.yaml           / can also build the environment itself
      MLmodel              python_function flavor, loader_module manymodels_runtime
      code/manymodels_runtime/   copy of manymodels.runtime (the one scoring code path)
      score.py             Azure ML online endpoint entry script (init / run)
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import statistics
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import onnxruntime as ort

from manymodels import runtime
from manymodels.errors import BundleError
from manymodels.runtime import MANIFEST_FILE, SCHEMA_VERSION, Manifest, read_manifest
from manymodels.runtime.manifest import parse_manifest
from manymodels.runtime.session import make_session_options

__all__ = [
    "BundleSummary",
    "ModelRow",
    "PackResult",
    "Problem",
    "ValidationReport",
    "environment_record",
    "inspect_bundle",
    "package_run",
    "validate_bundle",
]

#: Name under which the runtime is importable inside a bundle (``code/<this>``).
RUNTIME_MODULE = "manymodels_runtime"
#: What a bundle needs at serving time, pinned in ``requirements.txt``.
SERVING_PACKAGES = ("onnxruntime", "numpy", "pandas")
#: What produced the models; recorded, never required at serving time.
TRAINING_PACKAGES = ("scikit-learn", "lightgbm", "skl2onnx", "onnxmltools", "onnx", "manymodels")
#: Files every bundle carries besides its models (checked by :func:`validate_bundle`).
BUNDLE_FILES = ("requirements.txt", "environment.json", "MLmodel", "score.py",
                f"code/{RUNTIME_MODULE}/__init__.py")

_ONNX_TYPES = {"float32": "tensor(float)", "float64": "tensor(double)",
               "string": "tensor(string)", "int64": "tensor(int64)", "int32": "tensor(int32)",
               "bool": "tensor(bool)"}


# -- packing ------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackResult:
    """What :func:`package_run` wrote."""

    path: Path
    name: str
    version: str
    models: int
    segment_models: int
    fallback_models: int
    bytes: int
    failed: list[dict[str, Any]]
    dropped: list[str]  # models of the run that no route uses, left out of the bundle


def package_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                name: str | None = None, version: str | None = None,
                overwrite: bool = False) -> PackResult:
    """Pack the run directory ``run_dir`` into the bundle directory ``out``.

    The bundle is assembled in a temporary directory next to ``out`` and renamed into
    place, so a crash never leaves half a bundle behind. Segments that failed in training
    are listed in the manifest (the fallback chain serves them); a run where no segment
    produced a model is refused.

    Parameters
    ----------
    run_dir
        Directory written by ``manymodels train`` (``manifest.json`` + ``models/``).
    out
        Bundle directory to create.
    name
        Bundle name (default: the name of ``out``); also the registered-model name.
    version
        Bundle version (default: a digest of the routes and model checksums, so the same
        models always give the same version).
    overwrite
        Replace an existing ``out``; without it an existing non-empty ``out`` is an error.
    """
    run_root = Path(run_dir)
    run = read_manifest(run_root)
    out_path = Path(out).resolve()
    used = _routed_models(run)
    _refuse_empty_run(run, used)
    _check_target(out_path, overwrite)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        entries = _copy_models(run, used, tmp)
        bundle_name = name or out_path.name
        bundle_version = version or _content_version(run.raw.get("routes", []), entries)
        env = environment_record(run.raw)
        manifest = _bundle_manifest(run, entries, bundle_name, bundle_version, env)
        _write_json(tmp / MANIFEST_FILE, manifest)
        _write_environment(tmp, env)
        _copy_runtime(tmp)
        _copy_score_script(tmp)
        _write_mlmodel(tmp, bundle_name, bundle_version)
        _swap_into_place(tmp, out_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    levels = Counter(int(e.get("level", 0)) for e in entries.values())
    return PackResult(
        path=out_path, name=bundle_name, version=bundle_version, models=len(entries),
        segment_models=levels.get(0, 0), fallback_models=len(entries) - levels.get(0, 0),
        bytes=sum(int(e["bytes"]) for e in entries.values()),
        failed=list(run.raw.get("failed", [])),
        dropped=sorted(set(run.models) - set(used)),
    )


def _routed_models(run: Manifest) -> list[str]:
    """Model names the routing table uses, in route order, without repeats."""
    seen: dict[str, None] = {}
    for table in run.routes:
        for model in table.values():
            seen.setdefault(model, None)
    return list(seen)


def _refuse_empty_run(run: Manifest, used: list[str]) -> None:
    """A run where no segment has its own model is refused (pools alone are not a result)."""
    if any(run.models[name].level == 0 for name in used):
        return
    failed = list(run.raw.get("failed", []))
    reasons = "; ".join(f"{_format_key(f.get('key', {}))}: {f.get('reason', '?')}"
                        for f in failed[:3])
    raise BundleError(
        f"{run.root}: no segment produced a model ({len(failed)} failed"
        f"{': ' + reasons if reasons else ''}); there is nothing to package. "
        "Fix the failures (see the run's report.parquet) and train again"
    )


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BundleError(f"--out {out} exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BundleError(f"--out {out} already exists and is not empty; "
                          "pass --overwrite to replace it or choose another path")


def _copy_and_hash(src: Path, dst: Path, chunk: int = 1 << 20) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` reading it once, returning its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    with open(src, "rb") as reader, open(dst, "wb") as writer:
        while block := reader.read(chunk):
            digest.update(block)
            writer.write(block)
            size += len(block)
    return digest.hexdigest(), size


def _copy_models(run: Manifest, used: list[str], tmp: Path) -> dict[str, dict[str, Any]]:
    """Copy the routed models into ``tmp/models`` and check them against the run's checksums."""
    (tmp / "models").mkdir()
    entries: dict[str, dict[str, Any]] = {}
    taken: set[str] = set()
    for model_name in used:
        entry = run.models[model_name]
        src = run.root / entry.file
        if not src.is_file():
            raise BundleError(f"model '{model_name}': file {entry.file} is missing in {run.root}; "
                              "the run is incomplete, train again")
        file_name = Path(entry.file).name
        if file_name in taken:
            raise BundleError(f"two models of {run.root} share the file name {file_name}")
        taken.add(file_name)
        sha, size = _copy_and_hash(src, tmp / "models" / file_name)
        if entry.sha256 and sha != entry.sha256:
            raise BundleError(f"model '{model_name}': {entry.file} does not match the sha256 in "
                              f"{run.root / MANIFEST_FILE} (file changed after training); "
                              "train again or restore the file")
        raw = dict(entry.raw)
        raw.update(file=f"models/{file_name}", sha256=sha, bytes=size)
        entries[model_name] = raw
    return entries


def _content_version(routes: Iterable[Any], entries: Mapping[str, Mapping[str, Any]]) -> str:
    digest = hashlib.sha256(json.dumps(list(routes), sort_keys=True).encode())
    for model_name in sorted(entries):
        digest.update(f"{model_name}={entries[model_name]['sha256']}".encode())
    return digest.hexdigest()[:12]


def _bundle_manifest(run: Manifest, entries: dict[str, dict[str, Any]], name: str,
                     version: str, env: dict[str, Any]) -> dict[str, Any]:
    manifest = {k: v for k, v in run.raw.items() if k not in {"models", "routes", "failed"}}
    manifest.update(
        schema_version=SCHEMA_VERSION, kind="bundle", name=name, version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        run_id=run.raw.get("run_id"), segment_columns=run.segment_columns,
        levels=run.levels, routes=list(run.raw.get("routes", [])), models=entries,
        failed=list(run.raw.get("failed", [])), environment=env,
        source_run={"run_id": run.raw.get("run_id"), "path": str(run.root.resolve()),
                    "created_at": run.raw.get("created_at")},
    )
    return manifest


def _installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _recorded_training_packages(run_raw: Mapping[str, Any]) -> dict[str, str] | None:
    """Training package versions the run itself recorded, if it did."""
    recorded = run_raw.get("environment")
    if not isinstance(recorded, Mapping):
        return None
    packages = recorded.get("packages") or recorded.get("training")
    if isinstance(packages, Mapping):
        return {str(k): str(v) for k, v in packages.items()}
    flat = {str(k): str(v) for k, v in recorded.items() if isinstance(v, str) and k != "python"}
    return flat or None


def environment_record(run_raw: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Python version and the exact package versions behind a bundle.

    ``serving`` is what scoring needs (pinned in ``requirements.txt``). ``training`` is
    what produced the models: taken from the run manifest's ``environment`` when the
    trainer recorded it, otherwise the versions installed while packing.
    """
    recorded = _recorded_training_packages(run_raw or {})
    installed = {p: v for p in TRAINING_PACKAGES if (v := _installed_version(p))}
    serving = {p: v for p in SERVING_PACKAGES if (v := _installed_version(p))}
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "serving": serving,
        "training": recorded or installed,
        "training_source": "run manifest" if recorded else "installed when packing",
        "mlflow": _installed_version("mlflow"),
    }


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")


def _write_environment(tmp: Path, env: Mapping[str, Any]) -> None:
    pins = [f"{p}=={v}" for p, v in env["serving"].items()]
    (tmp / "requirements.txt").write_text(
        "# Everything a manymodels bundle needs to score: every model is ONNX.\n"
        + "\n".join(pins) + "\n", encoding="utf-8")
    _write_json(tmp / "environment.json", env)
    mlflow_pin = [f"mlflow=={env['mlflow']}"] if env.get("mlflow") else []
    python_env = {"python": env["python"], "build_dependencies": ["pip", "setuptools", "wheel"],
                  "dependencies": [*mlflow_pin, "-r requirements.txt"]}
    conda = {"name": "manymodels-bundle", "channels": ["conda-forge"],
             "dependencies": [f"python={env['python']}", "pip", {"pip": [*mlflow_pin, *pins]}]}
    import yaml  # a dependency of manymodels and of MLflow; only the packer writes YAML

    (tmp / "python_env.yaml").write_text(yaml.safe_dump(python_env, sort_keys=False))
    (tmp / "conda.yaml").write_text(yaml.safe_dump(conda, sort_keys=False))


def _copy_runtime(tmp: Path) -> None:
    source = Path(runtime.__file__).parent
    shutil.copytree(source, tmp / "code" / RUNTIME_MODULE,
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _copy_score_script(tmp: Path) -> None:
    shutil.copyfile(Path(__file__).parent / "templates" / "score.py", tmp / "score.py")


def _write_mlmodel(tmp: Path, name: str, version: str) -> None:
    """Write the ``MLmodel`` file with MLflow's own model API (not hand-written YAML)."""
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    # No input schema: each segment's model has its own inputs and the runtime checks
    # them. The optional "model" parameter scores every row with one named model.
    signature = ModelSignature(inputs=None, outputs=None,
                               params=ParamSchema([ParamSpec("model", "string", "")]))
    model = Model(signature=signature,
                  metadata={"manymodels_bundle": name, "manymodels_version": version})
    mlflow.pyfunc.add_to_model(model, loader_module=RUNTIME_MODULE, code="code",
                               conda_env="conda.yaml", python_env="python_env.yaml")
    model.save(str(tmp / "MLmodel"))


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` is moved aside first and removed after."""
    old: Path | None = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- inspect ------------------------------------------------------------------------------
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


def _format_key(key: Mapping[str, Any]) -> str:
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
        segment = _format_key(entry.key)
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
    )


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def inspect_bundle(path: str | os.PathLike[str]) -> BundleSummary:
    """Read the manifest of a bundle (or run) directory and summarise its models."""
    return summarise(read_manifest(Path(path)))


# -- validate -----------------------------------------------------------------------------
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
