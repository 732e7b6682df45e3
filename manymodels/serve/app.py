"""The composition root of the server: settings in, a ready application out.

:func:`create_app` builds the endpoint (its deployments and their shared session cache),
the telemetry, the mirror, the batch jobs, the credentials check and every router, and wires them
together through their constructors; nothing below this module imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from manymodels._version import __version__
from manymodels.errors import AuthError, BundleError

from . import schemas
from .admin import make_admin_router
from .asgi import ManyModelsAPI, deployment_of
from .audit import AuditLog, AuditMiddleware
from .audit import who as caller_of
from .auth import AuthMiddleware, build_guard, document_security
from .docs import add_docs
from .endpoint import DeploymentSpec, Endpoint, EndpointSpec, load_endpoint_spec
from .errors import install_error_handlers
from .jobroutes import make_jobs_router
from .jobs import JobManager
from .metrics import Metrics
from .observe import ObserveMiddleware, Telemetries, Telemetry
from .registry import ModelRegistry, SharedSessions
from .rollout import Rollout
from .routes import add_routes
from .settings import ServeSettings
from .stats import make_observe_router
from .ui import make_ui_router
from .v2 import make_v2_router

if TYPE_CHECKING:
    from .predlog import PredictionLog

__all__ = ["build_endpoint", "create_app", "create_app_from_env"]


def _custom_openapi(app: FastAPI) -> Any:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version,
                                   description=app.description, routes=app.routes)
            document.setdefault("components", {}).setdefault("schemas", {}).update(
                schemas.COMPONENTS)
            app.openapi_schema = document
        return app.openapi_schema

    return openapi


def build_endpoint(settings: ServeSettings, telemetry_for: Callable[[str], Telemetry],
                   spec: EndpointSpec | None = None, registry: ModelRegistry | None = None,
                   on_load: Callable[[float], None] | None = None) -> Endpoint:
    """The endpoint to serve: a ready ``registry`` (one deployment), an endpoint
    ``spec``, the endpoint file of ``settings`` (loaded if it exists, else written from
    the spec or the bundle), or ``settings.bundle`` as the one deployment ``default``.
    ``telemetry_for`` gives each deployment its telemetry; ``on_load`` hears how long
    each session took to create."""
    path = Path(settings.endpoint) if settings.endpoint else None
    if registry is not None:  # built by the caller: it reports to this app from now on
        registry.telemetry = telemetry_for("default")
        registry.shared.on_load = on_load
        return Endpoint.of_registry(registry, settings, telemetry_for, path)
    shared = SharedSessions(settings.max_bytes, settings.load_threads, on_load)
    if spec is None and path is not None and path.is_file():
        if settings.bundle is not None:
            raise BundleError(f"endpoint file {path} already lists the deployments; drop the "
                              f"bundle argument (or change them with `manymodels endpoint`)")
        return Endpoint.from_spec(load_endpoint_spec(path), settings, shared, telemetry_for,
                                  path)
    if spec is None:
        if settings.bundle is None:
            raise BundleError("no bundle to serve: pass a bundle directory or models:/ URI "
                              "(or set MANYMODELS_BUNDLE), --deployment NAME=BUNDLE, or "
                              "--endpoint FILE")
        spec = EndpointSpec(deployments={"default": DeploymentSpec(bundle=settings.bundle)},
                            traffic={"default": 100})
    endpoint = Endpoint.from_spec(spec, settings, shared, telemetry_for, path)
    if path is not None:
        endpoint.write()
    return endpoint


def _followed(settings: ServeSettings, endpoint: Endpoint) -> str | None:
    """The alias the endpoint follows: its file's, or with ``--follow`` the alias one of
    its deployments was made from."""
    if settings.follow and endpoint.follow is None:
        aliases = [d.alias for d in endpoint.deployments.values() if d.alias]
        if len(aliases) != 1:
            raise BundleError("--follow needs one deployment made from a models:/NAME@ALIAS "
                              "URI, e.g. `manymodels serve models:/oj-sales@champion --follow`")
        endpoint.follow = aliases[0]
        endpoint.write()
    return endpoint.follow


def create_app(settings: ServeSettings, registry: ModelRegistry | None = None,
               spec: EndpointSpec | None = None) -> ManyModelsAPI:
    """Build the application for ``settings`` (see :func:`build_endpoint`)."""
    started = {"ready": False}
    metrics = Metrics(settings.metrics_top_models) if settings.metrics else None
    telemetries = Telemetries(metrics)
    endpoint = build_endpoint(settings, telemetries, spec, registry,
                              metrics.model_loaded if metrics is not None else None)

    def registries() -> list[ModelRegistry]:
        return [d.registry for d in endpoint.deployments.values()]

    follow = _followed(settings, endpoint)
    rollout = Rollout(endpoint, follow, settings.rollout, metrics) if follow else None
    jobs = JobManager(settings, endpoint)
    audit = AuditLog(settings.audit_log, int(settings.audit_max_mb * 2**20),
                     settings.audit_backups) if settings.audit_log else None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        tasks = []
        if settings.log_predictions is not None:
            telemetries.log = _prediction_log(settings, endpoint, metrics)
        for each in registries():
            each.telemetry.attach_log(telemetries.log)
            if settings.pin_fallbacks:
                await each.run_in_thread(each.pin_fallbacks)
            each.shared.report(each.telemetry)
            preload = each.preload_names(settings.preload)
            if preload:
                each.preloading = True
                tasks.append(asyncio.ensure_future(each.run_in_thread(each.preload, preload)))
        if rollout is not None:
            tasks.append(asyncio.ensure_future(rollout.run()))
        started["ready"] = True
        jobs.start()  # resumes the jobs of a server that stopped mid-job
        try:
            yield
        finally:
            jobs.close()
            for task in tasks:
                task.cancel()
            mirror.close()
            log_writer, telemetries.log = telemetries.log, None
            for each in registries():
                each.telemetry.attach_log(None)
            if log_writer is not None:
                await asyncio.get_running_loop().run_in_executor(None, log_writer.close)
            if audit is not None:
                audit.close()
            endpoint.close()

    for each in registries():  # a bad preload file fails here, before the server starts
        each.preload_names(settings.preload)
    names = ", ".join(endpoint.deployments) or "none"
    app = ManyModelsAPI(endpoint, settings.mirror_queue, settings.max_body_bytes, rollout,
                        title="manymodels", version=__version__, lifespan=lifespan,
                        docs_url=None, redoc_url=None,
                        description=f"Serves the models of the deployments {names} by name, "
                        f"by segment key and over the Open Inference Protocol (V2).")
    mirror = app.mirror
    install_error_handlers(app)
    if audit is not None:  # inside the credentials check: it knows who is calling
        app.wrap(lambda inner: AuditMiddleware(inner, audit, lambda: endpoint.spec().model_dump(
            mode="json", exclude={"name"})))
    guard = build_guard(settings)
    if guard is not None:
        app.wrap(lambda inner: AuthMiddleware(inner, guard, _denied_reporter(metrics, audit)))
    add_routes(app, settings)
    app.include_router(make_observe_router(  # before /v2/models/{name}
        lambda request: deployment_of(request).registry, metrics))
    v2_router = make_v2_router(
        lambda request: deployment_of(request).registry, settings.max_body_bytes,
        lambda: started["ready"] and endpoint.live
        and not any(r.preloading for r in registries()))
    app.include_router(v2_router)
    app.include_router(make_admin_router(endpoint, mirror, settings, rollout))
    app.include_router(make_jobs_router(jobs, settings))
    app.include_router(make_ui_router(endpoint, mirror, settings, rollout))
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    if guard is not None:
        app.openapi = document_security(app.openapi, guard.mode)  # type: ignore[method-assign]
    add_docs(app)  # Swagger UI from local files: /docs renders without internet
    app.bind_fast_routes(v2_router)
    app.wrap(lambda inner: ObserveMiddleware(  # outermost: every request passes it
        inner, metrics, settings.access_log, lambda: telemetries.log is not None))
    return app


def _denied_reporter(metrics: Metrics | None, audit: AuditLog | None
                     ) -> Callable[[Any, str, AuthError], None]:
    """What a refused request updates: ``manymodels_auth_denied_total{reason}`` and the
    audit log's per-minute counts."""
    def denied(scope: Any, path: str, exc: AuthError) -> None:
        if metrics is not None:
            metrics.auth_denied.labels(exc.code).inc()
        if audit is not None:
            audit.denied(exc.caller or caller_of(scope), path, exc.code)

    return denied


def _prediction_log(settings: ServeSettings, endpoint: Endpoint,
                    metrics: Metrics | None) -> PredictionLog:
    """The prediction log of the endpoint (one for every deployment: rows name theirs)."""
    from .predlog import PredictionLog  # pyarrow only when logging

    assert settings.log_predictions is not None
    manifests = [d.registry.bundle.manifest for d in endpoint.deployments.values()]
    return PredictionLog(settings.log_predictions, manifests,
                         sample=settings.log_sample,
                         max_bytes=int(settings.log_max_mb * 2**20),
                         max_seconds=settings.log_max_seconds,
                         queue_rows=settings.log_queue_rows,
                         on_written=metrics.log_rows.inc if metrics else None,
                         on_dropped=metrics.log_dropped.inc if metrics else None)


def create_app_from_env() -> ManyModelsAPI:
    """Factory for uvicorn workers: settings from the ``MANYMODELS_*`` environment."""
    settings = ServeSettings()
    logging.getLogger("manymodels").setLevel(settings.log_level.upper())
    return create_app(settings)
