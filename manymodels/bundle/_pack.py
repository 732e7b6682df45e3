"""Pack a run directory into a bundle directory (see :mod:`manymodels.bundle` for the layout)."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from manymodels import runtime
from manymodels.errors import BundleError
from manymodels.io import link_or_copy, manifest_json, swap_directory_into_place
from manymodels.runtime import (
    MANIFEST_FILE,
    SCHEMA_VERSION,
    Manifest,
    parse_manifest,
    read_manifest,
)
from manymodels.storage import filesystem, is_remote, upload_bundle

from ._inspect import format_key

__all__ = ["RUNTIME_MODULE", "SERVING_PACKAGES", "TRAINING_PACKAGES", "PackResult",
           "environment_record", "package_run"]

#: Name under which the runtime is importable inside a bundle (``code/<this>``).
RUNTIME_MODULE = "manymodels_runtime"
#: What a bundle needs at serving time, pinned in ``requirements.txt``.
SERVING_PACKAGES = ("onnxruntime", "numpy", "pandas")
#: What produced the models; recorded, never required at serving time.
#: The packages behind a bundle's models: recorded by training, and by packing for a run
#: that did not record them.
TRAINING_PACKAGES = ("scikit-learn", "lightgbm", "skl2onnx", "onnxmltools", "onnx", "onnxruntime",
                     "statsforecast", "hierarchicalforecast", "numpy", "pandas", "joblib",
                     "manymodels")


@dataclass(frozen=True)
class PackResult:
    """What :func:`package_run` wrote."""

    path: Path | str  # a URL when packed to an object store
    name: str
    version: str
    models: int
    segment_models: int
    fallback_models: int
    bytes: int
    failed: list[dict[str, Any]]
    dropped: list[str]  # models of the run that no route uses, left out of the bundle
    #: the bundle's manifest as written (a local bundle), so a caller that registers or
    #: compares it does not read and parse a 10,000-model manifest again
    manifest: Manifest | None = field(default=None, repr=False, compare=False)


def package_run(run_dir: str | os.PathLike[str], out: str | os.PathLike[str],
                name: str | None = None, version: str | None = None,
                overwrite: bool = False, manifest: Manifest | None = None) -> PackResult:
    """Pack the run directory ``run_dir`` into the bundle directory ``out``.

    The bundle is assembled in a temporary directory next to ``out`` and renamed into
    place, so a crash never leaves half a bundle behind. Segments that failed in training
    are listed in the manifest (the fallback chain serves them); a run whose segments all
    route to pooled or global models is packed with those models; a run where no
    segment was trained and routed is refused.

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
    manifest
        The run's manifest when the caller has just written it (``manymodels retrain``
        does): saves reading and parsing it again, which is most of packing a
        10,000-model run. It must be what ``run_dir/manifest.json`` holds.

    Notes
    -----
    ``out`` may be an object-store URL (``s3://bucket/bundles/oj``): the bundle is packed
    locally, then uploaded with its manifest last (:func:`manymodels.storage.upload_bundle`).
    """
    if is_remote(out):
        return _package_to_store(run_dir, os.fspath(out), name, version, overwrite)
    run_root = Path(run_dir)
    if not run_root.is_dir():
        raise BundleError(f"run directory {run_root} does not exist; pass a directory written "
                          f"by `manymodels train` (runs/<run_id>)")
    run = manifest if manifest is not None else read_manifest(run_root)
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
        routes = list(run.raw.get("routes", []))
        if run.raw.get("forecast"):  # series tails and routes are part of what it serves
            routes.append(run.raw["forecast"])
        bundle_version = version or _content_version(routes, entries)
        env = environment_record(run.raw)
        written = _bundle_manifest(run, entries, bundle_name, bundle_version, env)
        _write_json(tmp / MANIFEST_FILE, written, compact=True)
        _write_environment(tmp, env)
        _copy_runtime(tmp)
        _copy_score_script(tmp)
        _copy_training_report(run_root, tmp)
        _write_mlmodel(tmp, bundle_name, bundle_version, forecast=bool(run.raw.get("forecast")))
        swap_directory_into_place(tmp, out_path)
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
        manifest=parse_manifest(out_path, written),
    )


def _package_to_store(run_dir: str | os.PathLike[str], url: str, name: str | None,
                      version: str | None, overwrite: bool) -> PackResult:
    fs, base = filesystem(url)
    if fs.exists(f"{base}/{MANIFEST_FILE}") and not overwrite:  # refuse before packing
        raise BundleError(f"--out {url} already holds a bundle; pass --overwrite to replace it")
    with tempfile.TemporaryDirectory(prefix="manymodels-pack-") as tmp:
        local = Path(tmp) / (base.rsplit("/", 1)[-1] or "bundle")
        result = package_run(run_dir, local, name=name, version=version)
        upload_bundle(local, url, overwrite=overwrite)
    return replace(result, path=url.rstrip("/"), manifest=None)


def _routed_models(run: Manifest) -> list[str]:
    """Model names the routing table uses, in route order, without repeats."""
    seen: dict[str, None] = {}
    for table in run.routes:
        for model in table.values():
            seen.setdefault(model, None)
    for blend in run.blends.values():  # a blend's coarser model (normally routed anyway)
        seen.setdefault(blend.partner, None)
    forecast = run.raw.get("forecast") or {}
    for route in [*forecast.get("routes", []), {"members": forecast.get("fallback", [])}]:
        for member in route["members"]:
            if member.get("model"):
                seen.setdefault(str(member["model"]), None)
    return list(seen)


def _refuse_empty_run(run: Manifest, used: list[str]) -> None:
    """A run where no segment was trained and routed is refused.

    A run whose gate routed every segment to a pooled or the global model is a result
    ("segmenting does not pay off"): its segment routes name those coarser models, and
    the bundle holds them and the routing table. Only when no segment route exists
    (every segment failed) is there nothing of this run's answer to deploy.
    """
    if used and run.routes and run.routes[0]:
        return
    if (run.raw.get("forecast") or {}).get("routes"):
        return  # a forecasting run routes its series in its forecast section
    failed = list(run.raw.get("failed", []))
    reasons = "; ".join(f"{format_key(f.get('key', {}))}: {f.get('reason', '?')}"
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


def _place_and_hash(src: Path, dst: Path) -> tuple[str, int]:
    """Place ``src`` at ``dst`` (a hard link where possible: no bytes written, and model
    files are never rewritten in place) and read its sha256 and size from the placed
    file, so the check against the run's checksums still reads every byte."""
    link_or_copy(src, dst)
    return runtime.sha256_file(dst), dst.stat().st_size


def _copy_models(run: Manifest, used: list[str], tmp: Path) -> dict[str, dict[str, Any]]:
    """Place the routed models in ``tmp/models`` and check them against the run's checksums."""
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
        sha, size = _place_and_hash(src, tmp / "models" / file_name)
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


def _write_json(path: Path, payload: Any, compact: bool = False) -> None:
    if compact:  # a manifest: tens of megabytes at the largest, so no indentation
        path.write_bytes(manifest_json(payload) + b"\n")
    else:
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
    shutil.copyfile(Path(__file__).parent.parent / "templates" / "score.py", tmp / "score.py")


#: What a run keeps for ``manymodels report``: the per-segment report and, for forecasting
#: runs, each series' backtest windows and recent history.
TRAINING_REPORT_FILES = ("report.parquet", "backtests.parquet", "history.parquet")


def _copy_training_report(run_root: Path, tmp: Path) -> None:
    """Carry the run's training report files along, for ``manymodels report``."""
    for name in TRAINING_REPORT_FILES:
        if (run_root / name).is_file():
            shutil.copyfile(run_root / name, tmp / name)


def _write_mlmodel(tmp: Path, name: str, version: str, forecast: bool = False) -> None:
    """Write the ``MLmodel`` file with MLflow's own model API (not hand-written YAML)."""
    # mlflow takes seconds to import: only when the registry or tracking is used
    import mlflow.pyfunc
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    # No input schema: each segment's model has its own inputs and the runtime checks
    # them. The optional "model" parameter scores every row with one named model; a
    # forecasting bundle's "horizon" forecasts that many periods of the series the rows
    # name (0, the default, means the rows are future periods).
    spec = ParamSpec("horizon", "long", 0) if forecast else ParamSpec("model", "string", "")
    signature = ModelSignature(inputs=None, outputs=None, params=ParamSchema([spec]))
    model = Model(signature=signature,
                  metadata={"manymodels_bundle": name, "manymodels_version": version})
    mlflow.pyfunc.add_to_model(model, loader_module=RUNTIME_MODULE, code="code",
                               conda_env="conda.yaml", python_env="python_env.yaml")
    model.save(str(tmp / "MLmodel"))


