"""The MLflow model registry for bundles: one registered-model version per bundle.

Thousands of segment models would drown a registry if each were registered; a bundle is
registered once, as one version of one registered model, with the numbers that matter as
version tags. Everything goes through :class:`mlflow.MlflowClient`; MLflow errors become
:class:`~manymodels.errors.RegistryError` here, at the boundary.

The store is ``MLFLOW_TRACKING_URI`` when set, otherwise ``sqlite:///mlruns.db`` in the
working directory; when this module creates the experiment, artifacts go beside the
database (``mlartifacts/``). Store and experiment are the ones :mod:`manymodels.tracking`
logs training runs to, so a training run and the bundles packed from it sit side by side.

:func:`resolve_bundle` is how every later step (serve, batch, inspect, validate) opens a
bundle: a directory path, ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``. Registry
versions are downloaded once into a local cache and reused.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from manymodels.bundle import BundleSummary, summarise
from manymodels.errors import BundleError, RegistryError
from manymodels.io import link_or_copy
from manymodels.promotions import Promotion, append_promotion
from manymodels.runtime import MANIFEST_FILE, Manifest, read_manifest
from manymodels.storage import cache_root, fetch_bundle, is_remote
from manymodels.tracking import (
    DEFAULT_TRACKING_URI,
    EXPERIMENT,
    experiment_id,
    sqlite_dir,
    tracking_uri,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = [
    "ARTIFACT_PATH",
    "DEFAULT_TRACKING_URI",
    "EXPERIMENT",
    "ModelSummary",
    "RegisteredBundle",
    "cache_dir",
    "find_version",
    "list_models",
    "parse_models_uri",
    "promote",
    "register_bundle",
    "resolve_bundle",
    "resolve_version",
    "seed_cache",
    "set_version_tags",
    "tracking_uri",
]

#: Artifact path of the bundle directory inside its MLflow run.
ARTIFACT_PATH = "bundle"

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))/?$")


@contextmanager
def _mlflow_errors(action: str) -> Iterator[None]:
    """Turn MLflow's exceptions into one RegistryError that says what was being done."""
    # mlflow takes seconds to import: only when the registry or tracking is used
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise RegistryError(f"MLflow registry failed to {action}: {exc.message}") from exc
    except OSError as exc:
        raise RegistryError(f"MLflow registry failed to {action}: {exc}") from exc


def _client(uri: str | None) -> MlflowClient:
    # mlflow takes seconds to import: only when the registry or tracking is used
    from mlflow import MlflowClient

    resolved = tracking_uri(uri)
    with _mlflow_errors(f"open the store {resolved}"):
        return MlflowClient(tracking_uri=resolved, registry_uri=resolved)


# -- register -----------------------------------------------------------------------------
@dataclass(frozen=True)
class RegisteredBundle:
    """One registered-model version holding a bundle."""

    name: str
    version: str
    run_id: str
    source: str
    alias: str | None
    tags: dict[str, str]

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def _data_window(raw: Mapping[str, Any]) -> str | None:
    """The training data's time window, if the run recorded one."""
    window = raw.get("data_window")
    if window is None and isinstance(raw.get("data"), Mapping):
        window = raw["data"].get("window")
    if isinstance(window, Mapping):
        start = window.get("start", window.get("min"))
        end = window.get("end", window.get("max"))
        if start is None and end is None:
            return None
        column = f"{window['column']} " if window.get("column") else ""
        return f"{column}{start}..{end}"
    if isinstance(window, list | tuple) and len(window) == 2:
        return f"{window[0]}..{window[1]}"
    return str(window) if window else None


def version_tags(summary: BundleSummary, raw: Mapping[str, Any]) -> dict[str, str]:
    """Tags of a registered version: the numbers a user compares versions by."""
    tags = {
        "manymodels.models": str(len(summary.models)),
        "manymodels.segment_models": str(summary.segment_models),
        "manymodels.failed_segments": str(len(summary.failed)),
        "manymodels.bundle_version": summary.version,
        "manymodels.segment_columns": ",".join(summary.segment_columns),
        "manymodels.bytes": str(summary.total_bytes),
    }
    if summary.run_id:
        tags["manymodels.run_id"] = str(summary.run_id)
    window = _data_window(raw)
    if window:
        tags["manymodels.data_window"] = window
    if summary.metric_name:
        for stat, value in summary.metric_summary().items():
            tags[f"manymodels.{summary.metric_name}.{stat}"] = f"{value:.6g}"
    return tags


def register_bundle(bundle_dir: str | os.PathLike[str], name: str | None = None,
                    alias: str | None = None, uri: str | None = None,
                    reason: str = "registered with this alias",
                    manifest: Manifest | None = None) -> RegisteredBundle:
    """Log ``bundle_dir`` as the artifacts of one MLflow run and register it as one version.

    Parameters
    ----------
    bundle_dir
        A bundle written by :func:`manymodels.bundle.package_run`.
    name
        Registered-model name (default: the bundle's name).
    alias
        Alias to point at the new version (e.g. ``champion``).
    uri
        Tracking/registry URI (default: :func:`tracking_uri`).
    reason
        Why the alias moves, for the promotion log (:mod:`manymodels.promotions`).
    manifest
        The bundle's manifest when the caller holds it (:attr:`PackResult.manifest`):
        saves reading a 10,000-model manifest again.
    """
    root = Path(bundle_dir)
    manifest = manifest if manifest is not None else read_manifest(root)
    if manifest.raw.get("kind") != "bundle":
        raise BundleError(f"{root} is a '{manifest.raw.get('kind')}' directory, not a bundle; "
                          "run `manymodels package` first")
    summary = summarise(manifest)
    model_name = name or manifest.name
    tags = version_tags(summary, manifest.raw)
    resolved = tracking_uri(uri)
    client = _client(resolved)
    previous: str | None = None
    with _mlflow_errors(f"register {root} as '{model_name}'"):
        run = client.create_run(experiment_id(client, resolved),
                                run_name=f"{model_name}-{summary.version}", tags=tags)
        run_id = run.info.run_id
        _log_bundle(client, run, root)
        client.set_terminated(run_id)
        if not client.search_registered_models(filter_string=f"name = '{model_name}'"):
            client.create_registered_model(
                model_name, description="A manymodels bundle: one ONNX model per segment.")
        source = f"runs:/{run_id}/{ARTIFACT_PATH}"
        version = client.create_model_version(model_name, source, run_id=run_id, tags=tags)
        if alias:
            previous = (client.get_registered_model(model_name).aliases or {}).get(alias)
            client.set_registered_model_alias(model_name, alias, version.version)
    if alias:
        _log_alias_move(model_name, alias, str(version.version), previous, reason, resolved)
    return RegisteredBundle(model_name, str(version.version), run_id, source, alias, tags)


# -- list / promote -----------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSummary:
    """One registered model: its versions and aliases."""

    name: str
    versions: list[str]
    latest: str | None
    aliases: dict[str, str]  # alias -> version
    tags: dict[str, str]  # tags of the latest version


def list_models(uri: str | None = None) -> list[ModelSummary]:
    """Every registered model of the store with its versions and aliases."""
    client = _client(uri)
    out: list[ModelSummary] = []
    with _mlflow_errors("list registered models"):
        for model in client.search_registered_models(max_results=1000):
            versions = sorted(client.search_model_versions(f"name = '{model.name}'"),
                              key=lambda v: int(v.version))
            latest = versions[-1] if versions else None
            out.append(ModelSummary(
                name=model.name, versions=[str(v.version) for v in versions],
                latest=str(latest.version) if latest else None,
                aliases={str(a): str(v) for a, v in (model.aliases or {}).items()},
                tags=dict(latest.tags) if latest else {},
            ))
    return sorted(out, key=lambda m: m.name)


def promote(name: str, version: str | int, alias: str = "champion",
            uri: str | None = None, reason: str = "promoted by hand") -> str | None:
    """Point ``alias`` of registered model ``name`` at ``version``.

    Returns the version the alias pointed at before (None if it is new), so the caller
    can say what changed and how to roll back. The move is appended to the promotion
    log with ``reason`` (MLflow keeps no history of aliases).
    """
    client = _client(uri)
    with _mlflow_errors(f"set alias '{alias}' of '{name}' to version {version}"):
        client.get_model_version(name, str(version))  # a clear error for a missing version
        aliases = client.get_registered_model(name).aliases or {}
        previous = aliases.get(alias)
        client.set_registered_model_alias(name, alias, str(version))
    _log_alias_move(name, alias, str(version), previous, reason, tracking_uri(uri))
    return str(previous) if previous is not None else None


def set_version_tags(name: str, version: str | int, tags: Mapping[str, str],
                     uri: str | None = None) -> None:
    """Set tags on one registered version (a rollout marks a version ``rejected`` and says
    why, so the next reader of the registry sees it)."""
    client = _client(uri)
    with _mlflow_errors(f"tag version {version} of '{name}'"):
        for key, value in tags.items():
            client.set_model_version_tag(name, str(version), key, str(value)[:5000])


def _log_alias_move(name: str, alias: str, version: str, previous: Any, reason: str,
                    uri: str) -> None:
    before = None if previous is None else str(previous)
    append_promotion(Promotion.now(name, alias, version, before, reason), uri)


# -- resolve ------------------------------------------------------------------------------
def parse_models_uri(source: str) -> tuple[str, str | None, str | None]:
    """Split ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` into (name, version, alias)."""
    match = _MODELS_URI.match(source)
    if match is None:
        raise BundleError(f"'{source}' is not a registry URI; use models:/NAME/VERSION or "
                          "models:/NAME@ALIAS")
    return match["name"], match["version"], match["alias"]


def _refuse_missing_store(uri: str, source: str) -> None:
    """A lookup never creates a store: MLflow would make an empty SQLite file (in the
    working directory, for the default URI) just to answer that nothing is there."""
    db_dir = sqlite_dir(uri)
    if db_dir is not None and not (db_dir / Path(unquote(uri[len("sqlite:///"):])).name
                                   ).is_file():
        raise RegistryError(f"cannot find {source}: there is no registry at {uri} (the file "
                            f"does not exist); register a bundle first (`manymodels package "
                            f"RUN --register`) or point MLFLOW_TRACKING_URI at the registry")


def resolve_version(source: str, uri: str | None = None) -> RegisteredBundle:
    """Look up the registered version a ``models:/`` URI names (aliases resolved)."""
    name, version, alias = parse_models_uri(source)
    _refuse_missing_store(tracking_uri(uri), source)
    client = _client(uri)
    with _mlflow_errors(f"find {source}"):
        mv = (client.get_model_version_by_alias(name, alias) if alias
              else client.get_model_version(name, str(version)))
    return RegisteredBundle(name, str(mv.version), str(mv.run_id or ""), str(mv.source), alias,
                            dict(mv.tags))


def cache_dir() -> Path:
    """Where registry downloads are kept: ``MANYMODELS_CACHE_DIR`` or ``~/.cache/manymodels``."""
    return cache_root()


def _download(found: RegisteredBundle, uri: str, target: Path) -> Path:
    """Download a version's bundle into ``target`` through a temp dir and a rename."""
    # mlflow takes seconds to import: only when the registry or tracking is used
    import mlflow.artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        with _mlflow_errors(f"download models:/{found.name}/{found.version}"):
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=found.source, dst_path=str(tmp), tracking_uri=uri))
        if not (local / MANIFEST_FILE).is_file():
            raise BundleError(f"models:/{found.name}/{found.version} (source {found.source}) "
                              f"holds no {MANIFEST_FILE}; it was not registered by manymodels")
        try:
            os.replace(local, target)
        except OSError:
            if not (target / MANIFEST_FILE).is_file():  # not a concurrent download: real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_target(name: str, version: str, uri: str, cache: str | os.PathLike[str] | None
                  ) -> Path:
    store = hashlib.sha256(_store_identity(uri).encode()).hexdigest()[:12]
    return Path(cache or cache_dir()) / "registry" / store / name / version


def _link_models_copy_rest(src: str, dst: str) -> None:
    """The copy function of a bundle's tree: model files linked, everything else copied
    (a manifest edited in place in the bundle directory must not change what is
    registered; a model file is never edited in place, and validate checks its sha256)."""
    if src.endswith(".onnx"):
        link_or_copy(src, dst)
    else:
        shutil.copy2(src, dst)


def _log_bundle(client: MlflowClient, run: Any, root: Path) -> None:
    """Log the bundle as the run's artifacts. A local artifact store gets the tree MLflow's
    own local repository writes (``log_artifacts`` copies it), with the model files hard
    linked rather than written a second time; any other store gets ``log_artifacts``."""
    artifact_uri = str(run.info.artifact_uri)
    if urlparse(artifact_uri).scheme not in ("", "file"):
        client.log_artifacts(run.info.run_id, str(root), ARTIFACT_PATH)
        return
    # mlflow takes seconds to import: only when the registry or tracking is used
    from mlflow.utils.file_utils import local_file_uri_to_path

    target = Path(local_file_uri_to_path(artifact_uri)) / ARTIFACT_PATH
    target.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root, target, copy_function=_link_models_copy_rest, dirs_exist_ok=True)


def seed_cache(bundle_dir: str | os.PathLike[str], name: str, version: str,
               uri: str | None = None, cache: str | os.PathLike[str] | None = None) -> Path:
    """Put a just-registered bundle into the download cache (hard links where possible),
    so the next ``resolve_bundle`` of that version does not download what is on disk."""
    target = _cache_target(name, str(version), tracking_uri(uri), cache)
    if (target / MANIFEST_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"

    try:
        shutil.copytree(bundle_dir, tmp, copy_function=link_or_copy)
        os.replace(tmp, target)
    except OSError:
        if not (target / MANIFEST_FILE).is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_version(name: str, bundle_version: str, uri: str | None = None) -> str | None:
    """The registered version of ``name`` holding the bundle of this content version, if
    any (a rerun after a crash between registering and finishing must not register twice)."""
    client = _client(uri)
    with _mlflow_errors(f"list the versions of '{name}'"):
        if not client.search_registered_models(filter_string=f"name = '{name}'"):
            return None
        for mv in client.search_model_versions(f"name = '{name}'"):
            if (mv.tags or {}).get("manymodels.bundle_version") == bundle_version:
                return str(mv.version)
    return None


def resolve_bundle(source: str | os.PathLike[str], uri: str | None = None,
                   cache: str | os.PathLike[str] | None = None) -> Path:
    """A local directory that :class:`manymodels.runtime.Bundle` can open.

    Parameters
    ----------
    source
        A bundle (or run) directory, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or
        an object-store URL (``s3://bucket/path``, see :mod:`manymodels.storage`).
    uri
        Tracking/registry URI for ``models:/`` sources (default: :func:`tracking_uri`).
    cache
        Download cache (default: :func:`cache_dir`). A version's content never changes,
        so a version downloaded once is reused; an alias is looked up on every call.
    """
    text = os.fspath(source)
    if is_remote(text):
        return fetch_bundle(text)
    if not text.startswith("models:"):
        path = Path(text)
        if not (path / MANIFEST_FILE).is_file():
            raise BundleError(f"{path} is not a bundle directory ({MANIFEST_FILE} is missing) "
                              "and not a models:/NAME/VERSION or models:/NAME@ALIAS URI")
        return path
    resolved = tracking_uri(uri)
    found = resolve_version(text, resolved)
    target = _cache_target(found.name, found.version, resolved, cache)
    if (target / MANIFEST_FILE).is_file():
        return target
    return _download(found, resolved, target)


def _store_identity(uri: str) -> str:
    """One string per store, so two stores' ``oj-sales/3`` never share a cache entry."""
    db_dir = sqlite_dir(uri)
    if db_dir is not None:
        return f"sqlite:{db_dir / Path(urlparse(uri).path).name}"
    return uri
