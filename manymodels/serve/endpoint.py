"""Deployments on one endpoint: traffic split, pinning, sticky sessions, live changes.

An :class:`Endpoint` hosts named :class:`Deployment` s, each one bundle behind its own
:class:`~.registry.ModelRegistry`; all of them share one session cache keyed by model
file sha256. The app asks the endpoint which deployment answers a request
(:meth:`Endpoint.choose`) before any route runs, so no handler branches on deployments.

The rules are Azure ML's online endpoints: live weights are integers summing to 100 (or
all 0); at most one deployment takes mirrored traffic, at most 50% of live requests, and
it takes no live traffic itself; pinned requests are never mirrored. Every change is
checked first, applied in one step on the event loop (a request sees the old table or
the new one, never a mix), then written atomically to the endpoint file, so a restarted
server comes back in the same state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator

from manymodels.errors import BundleError, ManyModelsError, SpecError
from manymodels.io import atomic_write_text
from manymodels.registry import resolve_version
from manymodels.runtime import load_model
from manymodels.sources import resolve_bundle_source
from manymodels.specs import load_spec

from .dataplane import Table, score_model
from .errors import (
    DeploymentNotFound,
    DeploymentRefused,
    EndpointConflict,
    NoLiveTraffic,
    one_line,
)
from .integrity import file_problems
from .observe import Telemetry
from .registry import ModelRegistry, SharedSessions
from .scorer import Scorer
from .settings import BatchDefaults, ServeSettings
from .source_policy import SourcePolicy

__all__ = [
    "DEPLOYMENT_HEADER",
    "Deployment",
    "DeploymentSpec",
    "Endpoint",
    "EndpointSpec",
    "MirrorSpec",
    "check_bundle",
    "load_endpoint_spec",
    "parse_weights",
    "pin_alias",
]

log = logging.getLogger("manymodels.serve")

#: Response header naming the deployment that answered; the same request header pins one.
DEPLOYMENT_HEADER = "x-manymodels-deployment"
PIN_HEADERS = (DEPLOYMENT_HEADER.encode(), b"azureml-model-deployment")
SESSION_HEADER = b"x-manymodels-session"
NAME_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,31}$"
MAX_MIRROR_PERCENT = 50
#: Seconds a removal waits for requests in flight on the removed deployment.
DRAIN_SECONDS = 60.0


# -- the endpoint file ------------------------------------------------------------------------
class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeploymentSpec(_Spec):
    """One deployment: a bundle directory or a registry URI."""

    bundle: str
    """Bundle directory, ``models:/<name>/<version>`` or ``models:/<name>@<alias>``; the
    server writes an alias as the version it named when the deployment was made, so a
    restart serves the same bundle even if the alias has moved since."""
    alias: str | None = None
    """The ``models:/<name>@<alias>`` URI the deployment was asked for, if any."""
    batch: BatchDefaults | None = None
    """Options of the batch jobs this deployment scores (mini-batch size, concurrency,
    error threshold, retries), unless a job's request overrides them."""


class MirrorSpec(_Spec):
    """Mirrored (shadow) traffic: a share of live requests copied to one deployment."""

    deployment: str
    """The deployment that receives the copies; it takes no live traffic."""
    percent: int = Field(ge=0, le=MAX_MIRROR_PERCENT)
    """Share of live (unpinned) requests copied, 0–50."""


class EndpointSpec(_Spec):
    """What ``endpoint.yaml`` holds; the server rewrites it on every change."""

    name: str = "endpoint"
    """Name of the endpoint (the file's stem when loaded from a file)."""
    deployments: dict[str, DeploymentSpec] = Field(default_factory=dict)
    """Deployments by name (letters, digits, ``-`` and ``_``, starting with a letter)."""
    traffic: dict[str, int] = Field(default_factory=dict)
    """Live weight per deployment, integers summing to 100, or all 0; unnamed ones get 0."""
    mirror: MirrorSpec | None = None
    """Mirrored traffic, or none."""
    follow: str | None = None
    """``models:/NAME@ALIAS`` this endpoint follows (``serve --follow``): each new version
    the alias names is rolled out by the serving spec's ``rollout`` policy."""

    @field_validator("follow")
    @classmethod
    def _alias(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^models:/[^/@]+@[\w-]+$", value):
            raise ValueError(f"follow must be an alias URI models:/NAME@ALIAS, not {value!r}")
        return value

    @field_validator("deployments")
    @classmethod
    def _names(cls, value: dict[str, DeploymentSpec]) -> dict[str, DeploymentSpec]:
        for name in value:
            check_name(name)
        return value


def check_name(name: str) -> str:
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise SpecError(f"deployment name {name!r} must start with a letter and hold up to 32 "
                        f"letters, digits, '-' or '_'")
    return name


def check_rules(names: Sequence[str], traffic: Mapping[str, int],
                mirror: MirrorSpec | None, changing: str = "mirror") -> dict[str, int]:
    """The full weight table for ``names`` after checking the endpoint's rules;
    ``changing`` (``traffic`` or ``mirror``) says which half the caller is changing, so a
    refusal advises undoing the other half."""
    unknown = [n for n in traffic if n not in names]
    if unknown:
        raise DeploymentNotFound(unknown[0], list(names))
    for name, weight in traffic.items():
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            raise EndpointConflict(f"traffic for '{name}' must be an integer from 0 to 100, "
                                   f"not {weight!r}")
    total = sum(traffic.values())
    if total not in (0, 100):
        raise EndpointConflict(f"live traffic must sum to 100 (or be all 0), not {total}: "
                               f"{_weights_text(traffic)}")
    if mirror is not None:
        if mirror.deployment not in names:
            raise DeploymentNotFound(mirror.deployment, list(names))
        if not 0 <= mirror.percent <= MAX_MIRROR_PERCENT:
            raise EndpointConflict(f"mirrored traffic is at most {MAX_MIRROR_PERCENT}%, "
                                   f"not {mirror.percent}%")
        if traffic.get(mirror.deployment, 0) and mirror.percent:
            if changing == "traffic":
                raise EndpointConflict(
                    f"deployment '{mirror.deployment}' receives {mirror.percent}% mirrored "
                    f"traffic, so it cannot take live traffic; stop the mirror first "
                    f"(`manymodels endpoint mirror off`, or PUT /admin/mirror with "
                    f"{{\"deployment\": null, \"percent\": 0}}), then set the traffic")
            raise EndpointConflict(f"deployment '{mirror.deployment}' takes live traffic "
                                   f"({traffic[mirror.deployment]}%), so it cannot take "
                                   f"mirrored traffic; set its traffic to 0 first")
    return {name: int(traffic.get(name, 0)) for name in names}


def _weights_text(traffic: Mapping[str, int]) -> str:
    return ",".join(f"{n}={w}" for n, w in traffic.items()) or "none"


def parse_weights(text: str) -> dict[str, int]:
    """``blue=90,green=10`` as a mapping (the CLI's and the endpoint file's notation)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise SpecError(f"traffic '{part}' must be NAME=PERCENT, e.g. blue=90,green=10")
        out[name.strip()] = int(value)
    return out


def pin_alias(source: str) -> tuple[str, str | None]:
    """``(models:/NAME/VERSION, models:/NAME@ALIAS)`` for an alias URI (the version it
    names now), else ``(source, None)``: a deployment is one fixed bundle version."""
    if not source.startswith("models:/") or "@" not in source:
        return source, None
    found = resolve_version(source)
    return f"models:/{found.name}/{found.version}", source


def load_endpoint_spec(path: str | os.PathLike[str]) -> EndpointSpec:
    """The endpoint file at ``path``, checked against the rules. The server writes every
    field, so a file without deployments or without ``traffic`` is cut short (or written
    by hand incompletely) and refused rather than served with no live traffic."""
    spec = load_spec("endpoint", EndpointSpec, Path(path))
    if not spec.deployments:
        raise SpecError(f"endpoint file {path} lists no deployment (is it cut short?); "
                        f"restore it, or delete it to start from a bundle again")
    if "traffic" not in spec.model_fields_set:
        raise SpecError(f"endpoint file {path} has no 'traffic' (is it cut short?); add "
                        f"e.g. 'traffic: {{{next(iter(spec.deployments))}: 100}}'")
    check_rules(list(spec.deployments), spec.traffic, spec.mirror)
    return spec


# -- checking a bundle before it takes traffic --------------------------------------------------
def _smoke_row(entry: Any) -> dict[str, Sequence[Any]]:
    """One plausible row for a model: the median of each numeric feature and the most
    frequent category, from the manifest's feature statistics (0 / the key if absent)."""
    stats = entry.raw.get("feature_stats") or {}
    row: dict[str, Sequence[Any]] = {}
    for column in entry.inputs:
        seen = stats.get(column.name) or {}
        if column.dtype == "string":
            freq = seen.get("frequencies") or {}
            # an unseen category when nothing is known: "" would be a null to the contract
            value: Any = max(freq, key=lambda k: freq[k]) if freq else \
                entry.key.get(column.name) or "unseen"
        else:
            value = (seen.get("quantiles") or {}).get("0.5", 0.0)
        row[column.name] = [value]
    return row


def check_bundle(registry: ModelRegistry, limit: int = 5) -> list[str]:
    """Problems that keep a bundle from taking traffic: a missing or changed file
    (sha256), a model onnxruntime cannot load, a smoke score from the feature
    statistics that fails or is not finite. Files already in the shared cache are known
    good (same sha256); others are loaded here and dropped, so the live deployments'
    cache is not disturbed. Runs in a thread: it reads every file."""
    problems: list[str] = []
    bundle = registry.bundle
    for name, entry in bundle.manifest.models.items():
        path = bundle.root / entry.file
        try:
            registry.shared.checks.check(entry, path)
            loaded = registry.shared.resident(registry.cache.key(name))
            if loaded is None:
                loaded = load_model(entry, path, bundle._options)
            served = registry._prepare(loaded, entry)  # dropped after the smoke score
            prediction = score_model(registry, served, Table(_smoke_row(entry), 1)).prediction
            if entry.kind != "classification" and not all(
                    math.isfinite(float(v)) for v in prediction):
                raise BundleError(f"smoke score is not finite ({prediction.tolist()})")
        except ManyModelsError as exc:
            problems.append(f"model '{name}': {exc.message}")
            if len(problems) >= limit:
                break
    registry.trim()
    return problems


# -- deployments and the endpoint ---------------------------------------------------------------
@dataclass(eq=False)
class Deployment:
    """One bundle on the endpoint, with what the routes need to use it."""

    name: str
    source: str
    registry: ModelRegistry
    scorer: Scorer
    alias: str | None = None
    header: tuple[bytes, bytes] = (b"", b"")
    batch: BatchDefaults | None = None
    """Batch job options of this deployment (its spec's ``batch:``)."""
    inflight: int = 0
    """Requests (and mirrored copies) being answered by this deployment right now."""

    def __post_init__(self) -> None:
        self.header = (DEPLOYMENT_HEADER.encode(), self.name.encode())

    def describe(self, weight: int, mirror: MirrorSpec | None) -> dict[str, Any]:
        manifest = self.registry.bundle.manifest
        return {"name": self.name, "bundle": self.source, "alias": self.alias,
                "path": str(self.registry.bundle.root),
                "bundle_name": manifest.name, "version": self.registry.version,
                "models": len(manifest.models), "traffic": weight,
                "mirror": mirror.percent if mirror is not None
                and mirror.deployment == self.name else 0,
                "inflight": self.inflight, "loaded": len(self.registry.cache)}


@dataclass
class Choice:
    """The deployment a request goes to; ``pinned`` requests are never mirrored."""

    deployment: Deployment
    pinned: bool


@dataclass
class Endpoint:
    """The deployments of one server and how requests are spread over them.

    Parameters
    ----------
    settings
        Server settings (cache budget, optimisation, threads) every deployment uses.
    shared
        The session cache every deployment's registry shares.
    telemetry_for
        The telemetry (metrics, stats, prediction log) of the deployment with a name.
    path
        The endpoint file written on every change (``None``: changes are not kept).
    """

    settings: ServeSettings
    shared: SharedSessions
    telemetry_for: Callable[[str], Telemetry]
    path: Path | None = None
    name: str = "endpoint"
    deployments: dict[str, Deployment] = field(default_factory=dict)
    traffic: dict[str, int] = field(default_factory=dict)
    mirror: MirrorSpec | None = None
    #: Where admins may deploy from (:meth:`source_policy`, built on first use).
    sources: SourcePolicy | None = None
    #: ``models:/NAME@ALIAS`` followed by a rollout (:mod:`.rollout`), if any.
    follow: str | None = None
    _table: list[Deployment] = field(default_factory=list, init=False)
    _lock: asyncio.Lock | None = field(default=None, init=False)

    # -- building -------------------------------------------------------------------------
    def registry_for(self, name: str, source: str) -> ModelRegistry:
        """A registry over ``source`` for deployment ``name``, sharing this endpoint's
        session cache."""
        settings = self.settings
        return ModelRegistry(resolve_bundle_source(source), max_bytes=settings.max_bytes,
                             optimisation=settings.optimisation,
                             load_threads=settings.load_threads,
                             telemetry=self.telemetry_for(name),
                             inline_rows=settings.inline_rows, shared=self.shared,
                             strict_columns=settings.strict_columns)

    def open(self, name: str, source: str, alias: str | None = None) -> Deployment:
        """A deployment of ``source`` (an alias pinned to the version it names now)."""
        pinned, asked = pin_alias(source)
        registry = self.registry_for(check_name(name), pinned)
        return Deployment(name, pinned, registry, Scorer(registry), asked or alias)

    @classmethod
    def from_spec(cls, spec: EndpointSpec, settings: ServeSettings, shared: SharedSessions,
                  telemetry_for: Callable[[str], Telemetry],
                  path: Path | None = None) -> Endpoint:
        """An endpoint in the state ``spec`` describes (bundles opened, not yet loaded)."""
        endpoint = cls(settings, shared, telemetry_for, path, spec.name, follow=spec.follow)
        weights = check_rules(list(spec.deployments), spec.traffic, spec.mirror)
        for name, deployment in spec.deployments.items():
            endpoint.deployments[name] = opened = endpoint.open(name, deployment.bundle,
                                                                deployment.alias)
            opened.batch = deployment.batch
            if settings.verify_files:
                endpoint.refuse_changed_files(opened)
        endpoint._apply(weights, spec.mirror)
        return endpoint

    @classmethod
    def of_registry(cls, registry: ModelRegistry, settings: ServeSettings,
                    telemetry_for: Callable[[str], Telemetry],
                    path: Path | None = None) -> Endpoint:
        """An endpoint whose one deployment ``default`` serves a ready ``registry``,
        sharing its session cache with deployments added later."""
        endpoint = cls(settings, registry.shared, telemetry_for, path)
        endpoint.deployments["default"] = Deployment(
            "default", str(registry.bundle.root), registry, Scorer(registry))
        endpoint._apply({"default": 100}, None)
        return endpoint

    def refuse_changed_files(self, deployment: Deployment) -> None:
        """Refuse (:class:`BundleError`) a deployment whose model files do not match the
        manifest's sha256 (``verify_files``); the verdicts are kept, so the first load of
        each model costs a ``stat``."""
        registry = deployment.registry
        problems = file_problems(self.shared.checks, registry.bundle.manifest.models.values(),
                                 registry.bundle.root)
        if problems:
            self.close()
            raise BundleError(f"bundle {deployment.source} of deployment '{deployment.name}' "
                              f"fails its checksums: {'; '.join(problems)}. Run `manymodels "
                              f"validate` on it; --no-verify-files serves it anyway (those "
                              f"models answer 503)")

    def spec(self) -> EndpointSpec:
        return EndpointSpec(name=self.name, deployments={
            n: DeploymentSpec(bundle=d.source, alias=d.alias, batch=d.batch)
            for n, d in self.deployments.items()},
            traffic=dict(self.traffic), mirror=self.mirror, follow=self.follow)

    # -- the request path -----------------------------------------------------------------
    def choose(self, headers: Sequence[tuple[bytes, bytes]]) -> Choice:
        """The deployment for a request: the pinned one, else by weight (sticky by the
        session header's hash while the weights hold)."""
        session = None
        for key, value in headers:
            if key in PIN_HEADERS:
                name = value.decode("latin-1").strip()
                deployment = self.deployments.get(name)
                if deployment is None:
                    raise DeploymentNotFound(name, list(self.deployments))
                return Choice(deployment, True)
            if key == SESSION_HEADER:
                session = value
        table = self._table
        if not table:
            raise NoLiveTraffic(
                "no deployment takes live traffic (all weights are 0): set the traffic "
                "(PUT /admin/traffic) or pin one with the x-manymodels-deployment header")
        slot = zlib.crc32(session) % 100 if session is not None else int(random.random() * 100)
        return Choice(table[slot], False)

    @property
    def live(self) -> bool:
        """Whether unpinned requests have a deployment to go to (readiness needs it)."""
        return bool(self._table)

    def mirror_target(self) -> tuple[Deployment, int] | None:
        mirror = self.mirror
        if mirror is None or not mirror.percent:
            return None
        return self.deployments[mirror.deployment], mirror.percent

    # -- changes --------------------------------------------------------------------------
    def _apply(self, weights: dict[str, int], mirror: MirrorSpec | None) -> None:
        table: list[Deployment] = []
        for name, weight in weights.items():
            table.extend([self.deployments[name]] * weight)
        self.traffic = weights
        self.mirror = mirror if mirror is not None and mirror.percent else None
        self._table = table  # one reference swap: a request sees the old table or the new

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def write(self) -> None:
        """Write the endpoint file atomically (temp file, fsync, rename)."""
        if self.path is not None:
            state = self.spec().model_dump(
                mode="json", exclude={"follow"} if self.follow is None else None)
            for deployment in state["deployments"].values():
                if deployment.get("batch") is None:  # no batch defaults of its own
                    deployment.pop("batch", None)
            text = ("# manymodels endpoint: rewritten by the server on every change\n"
                    + yaml.safe_dump(state, sort_keys=False))
            atomic_write_text(self.path, text)

    async def save(self) -> None:
        await asyncio.to_thread(self.write)

    async def set_traffic(self, traffic: Mapping[str, int]) -> dict[str, int]:
        async with self.lock:
            weights = check_rules(list(self.deployments), traffic, self.mirror, "traffic")
            self._apply(weights, self.mirror)
            await self.save()
            log.warning("endpoint traffic is now %s", _weights_text(weights))
            return weights

    async def set_mirror(self, deployment: str | None, percent: int) -> MirrorSpec | None:
        async with self.lock:
            mirror = None
            if deployment is not None and percent:
                mirror = MirrorSpec(deployment=deployment, percent=percent) \
                    if 0 <= percent <= MAX_MIRROR_PERCENT else None
                if mirror is None:
                    raise EndpointConflict(f"mirrored traffic is at most "
                                           f"{MAX_MIRROR_PERCENT}%, not {percent}%")
            check_rules(list(self.deployments), self.traffic, mirror)
            self._apply(self.traffic, mirror)
            await self.save()
            return self.mirror

    def source_policy(self) -> SourcePolicy:
        """What admins may deploy: the settings' roots and buckets and the places of the
        bundles served when the policy was first asked for (at start-up)."""
        if self.sources is None:
            self.sources = SourcePolicy.build(
                self.settings.bundle_roots, self.settings.bundle_buckets,
                [d.source for d in self.deployments.values()])
        return self.sources

    async def add(self, name: str, source: str) -> Deployment:
        """Open, check and add a deployment with 0% traffic; refused with the reasons if
        the source is not allowed (:mod:`.source_policy`) or the bundle fails its checks
        (nothing changes then)."""
        check_name(name)
        self.source_policy().check(source)
        async with self.lock:
            if name in self.deployments:
                raise EndpointConflict(f"deployment '{name}' already exists; remove it first "
                                       f"or pick another name")
            try:
                deployment = await asyncio.to_thread(self.open, name, source)
            except ManyModelsError as exc:
                raise DeploymentRefused(f"bundle {source} cannot be opened: {exc.message}") \
                    from exc
            except Exception as exc:  # a store's own errors (no credentials, no bucket)
                raise DeploymentRefused(f"bundle {source} cannot be opened: "
                                        f"{one_line(exc)}") from exc
            registry = deployment.registry
            problems = await registry.run_in_thread(check_bundle, registry)
            if problems:
                registry.close()
                raise DeploymentRefused(f"bundle {source} is refused, traffic is unchanged: "
                                        + "; ".join(problems))
            if self.settings.pin_fallbacks:
                await registry.run_in_thread(registry.pin_fallbacks)
            self.deployments[name] = deployment
            self._apply({**self.traffic, name: 0}, self.mirror)
            await self.save()
            log.warning("deployment %s added from %s", name, source)
            return deployment

    async def remove(self, name: str) -> int:
        """Take a deployment out (it must take no live traffic), then wait until the
        requests it started finish before closing it. Returns the requests drained."""
        async with self.lock:
            deployment = self.deployments.get(name)
            if deployment is None:
                raise DeploymentNotFound(name, list(self.deployments))
            if self.traffic.get(name):
                raise EndpointConflict(f"deployment '{name}' takes {self.traffic[name]}% of "
                                       f"live traffic; move it elsewhere first "
                                       f"(PUT /admin/traffic)")
            mirror = None if self.mirror and self.mirror.deployment == name else self.mirror
            del self.deployments[name]
            self._apply({n: w for n, w in self.traffic.items() if n != name}, mirror)
            await self.save()
        drained = deployment.inflight
        waited = 0.0
        while deployment.inflight and waited < DRAIN_SECONDS:
            await asyncio.sleep(0.01)
            waited += 0.01
        deployment.registry.close()
        log.warning("deployment %s removed (%d requests drained)", name, drained)
        return drained

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "traffic": dict(self.traffic), "follow": self.follow,
                "mirror": self.mirror.model_dump() if self.mirror else None,
                "persisted": str(self.path) if self.path else None,
                "cache": self.shared.stats(),
                "deployments": [d.describe(self.traffic.get(n, 0), self.mirror)
                                for n, d in self.deployments.items()]}

    def close(self) -> None:
        for deployment in self.deployments.values():
            deployment.registry.close()
        self.shared.close()
