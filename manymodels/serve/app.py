"""The FastAPI application: every model of a bundle behind one endpoint.

Before any route runs, :class:`ManyModelsAPI` asks the :class:`~.endpoint.Endpoint`
which deployment answers the request (pinned by header, else by weight), puts it in the
ASGI scope's state (``state["deployment"]`` is its name, for logs and metrics) and adds
the ``x-manymodels-deployment`` header to the answer; handlers take the deployment from
the request and never branch on which one it is.

Routes are thin: read the body (:func:`~.dataplane.read_json`), call the data plane,
return orjson bytes. Handlers are ``async def`` and score small requests on the event
loop (tens of microseconds), because a thread hop per request doubles the CPU cost;
model loads and large requests go to a thread pool, so they never stall other requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import Response

from manymodels._version import __version__
from manymodels.errors import BundleError

from . import schemas
from .admin import make_admin_router
from .auth import AuthMiddleware, build_guard, document_security
from .dataplane import (
    check_headers,
    dumps,
    is_csv,
    parse_json,
    read_csv_table,
    read_json,
    receive_body,
)
from .docs import add_docs
from .endpoint import Deployment, DeploymentSpec, Endpoint, EndpointSpec, load_endpoint_spec
from .errors import install_error_handlers, render_exception
from .keyed import key_of_scope
from .metrics import Metrics
from .mirror import Mirror
from .observe import ObserveMiddleware, Telemetries, Telemetry
from .paths import DATA_PLANE, FAST_ROUTES
from .registry import ModelRegistry, SharedSessions
from .scorer import ReplyFunction
from .settings import ServeSettings
from .stats import make_observe_router
from .ui import make_ui_router
from .v2 import make_v2_router

if TYPE_CHECKING:
    from .predlog import PredictionLog

__all__ = ["DEPLOYMENT_STATE", "ManyModelsAPI", "create_app", "create_app_from_env",
           "deployment_of"]

log = logging.getLogger("manymodels.serve")

JSON = "application/json"
JSON_BYTES = b"application/json"
#: Scope-state key of the :class:`~.endpoint.Deployment` answering a request.
DEPLOYMENT_STATE = "manymodels.deployment"


def deployment_of(request: Request) -> Deployment:
    """The deployment the endpoint chose for ``request``."""
    return request.scope["state"][DEPLOYMENT_STATE]  # type: ignore[no-any-return]


class ManyModelsAPI(FastAPI):
    """FastAPI with a deployment chosen per request and a fast lane for the hot routes.

    ``POST /score``, ``POST /v2/models/{name}/infer`` and the key-carrying routes
    ``POST /models/{name}/score`` and ``POST /segments/score`` are answered straight from the
    ASGI call: same body checks, same data plane, same error table as the declared
    routes (which stay, for the OpenAPI page and for any caller that mounts the router),
    but without routing, dependency solving and the middleware stack, which cost about
    50 µs per request, four times the scoring itself. Every other route goes through
    FastAPI as usual. Both lanes get their deployment from :meth:`serve`. Cross-cutting
    checks (credentials: :mod:`.auth`) are pure ASGI middlewares put around
    :meth:`dispatch` with :meth:`wrap`, so neither lane can skip them.
    """

    def __init__(self, endpoint: Endpoint, mirror_queue: int, body_limit: int,
                 **kwargs: Any) -> None:
        """``kwargs`` go to FastAPI; ``mirror_queue`` bounds the mirrored copies waiting."""
        super().__init__(**kwargs)
        self.endpoint = endpoint
        self.mirror = Mirror(endpoint, self.serve, mirror_queue)
        self.body_limit = body_limit
        self._entry: Any = self._dispatch
        self._fast_routes: dict[str, Any] = {}

    def wrap(self, layer: Callable[[Any], Any]) -> None:
        """Wrap the whole application, fast lane included, in the ASGI middleware that
        ``layer(inner)`` returns; the layer wrapped last is the outermost."""
        self._entry = layer(self._entry)

    def bind_fast_routes(self, *routers: APIRouter) -> None:
        """Remember the declared routes the fast lane answers for (here or in an included
        ``routers``), so that it sets ``scope["route"]`` as FastAPI does; outer layers
        label requests by it."""
        for route in [*self.routes, *(r for router in routers for r in router.routes)]:
            path = getattr(route, "path", "")
            if path in FAST_ROUTES:
                self._fast_routes[path] = route

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(DATA_PLANE):
            await self._starlette(scope, receive, send)
            return
        try:
            choice = self.endpoint.choose(scope["headers"])
        except Exception as exc:  # an unknown pinned deployment, no live traffic
            await _send_error(send, scope["path"], exc, ())
            return
        shadow = None if choice.pinned else self.mirror.sample(scope["method"], scope["path"])
        if shadow is None:
            await self.serve(scope, receive, send, choice.deployment)
        else:
            await self.mirror.serve(scope, receive, send, choice.deployment, shadow)

    async def serve(self, scope: Any, receive: Any, send: Any,
                    deployment: Deployment) -> tuple[Any, dict[str, Any]] | None:
        """Answer one request on ``deployment`` (live, pinned, or a mirrored copy).

        On the fast lane, returns the parsed body and the reply that was sent (``None``
        if the request failed), so the mirror reuses them instead of parsing again."""
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["deployment"] = deployment.name
        state[DEPLOYMENT_STATE] = deployment
        deployment.inflight += 1
        try:
            fast = deployment.scorer.reply_for(scope)
            if fast is not None:
                reply_to, route = fast
                scope["route"] = self._fast_routes.get(route)
                return await self._fast(scope, receive, send, reply_to, deployment)
            header = deployment.header

            async def send_named(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

            await self._starlette(scope, receive, send_named)
            return None
        finally:
            deployment.inflight -= 1

    async def _starlette(self, scope: Any, receive: Any, send: Any) -> None:
        """FastAPI's own handling (routing, dependencies, the error handlers)."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        except Exception:  # noqa: S110
            # Starlette answers 500 through our handler (which logs one line), then
            # re-raises so that servers can log it too; uvicorn would print the stack trace
            pass

    async def _fast(self, scope: Any, receive: Any, send: Any, reply_to: ReplyFunction,
                    deployment: Deployment) -> tuple[Any, dict[str, Any]] | None:
        status, media = 200, JSON_BYTES
        try:
            check_headers(scope["headers"], self.body_limit)
            body = parse_json(await receive_body(receive, self.body_limit))
            reply = await reply_to(body)
            content = dumps(reply)
        except Exception as exc:  # every failure becomes one mapped answer, never a crash
            await _send_error(send, scope["path"], exc, (deployment.header,))
            return None
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media),
                                (b"content-length", str(len(content)).encode()),
                                deployment.header]})
        await send({"type": "http.response.body", "body": content})
        return body, reply


async def _send_error(send: Any, path: str, exc: Exception,
                      extra: tuple[tuple[bytes, bytes], ...]) -> None:
    status, content, media = render_exception(path, exc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media.encode()),
                            (b"content-length", str(len(content)).encode()), *extra]})
    await send({"type": "http.response.body", "body": content})


def _model_list(registry: ModelRegistry) -> dict[str, Any]:
    manifest = registry.bundle.manifest
    return {
        "bundle": manifest.name, "version": registry.version,
        "segment_columns": list(manifest.segment_columns),
        "models": [{"name": name, "level": e.level, "segment": e.key, "algorithm": e.algorithm,
                    "kind": e.kind, "inputs": [{"name": c.name, "dtype": c.dtype}
                                               for c in e.inputs],
                    "tags": e.raw.get("tags", {}), "loaded": name in registry.cache}
                   for name, e in manifest.models.items()],
    }


def _add_routes(app: ManyModelsAPI, settings: ServeSettings) -> None:
    limit = settings.max_body_bytes
    process = psutil.Process()

    @app.post("/score", tags=["scoring"], response_class=Response,
              summary="Score rows with a named model, or route them by segment key",
              openapi_extra=schemas.body("ScoreRequest"),
              responses=schemas.reply("ScoreResponse", 400, 404, 413, 415, 422, 503))
    async def score(request: Request) -> Response:
        """Azure-ML style scoring.

        With ``"model"``, every row is scored by that model and the reply is
        ``{"model", "predictions"}``. Without it, each row's segment columns pick its
        model down the fallback chain and the reply gives, per row in input order, the
        prediction, the model that produced it and whether a fallback was used.
        """
        scorer = deployment_of(request).scorer
        reply = await scorer.score_reply(await read_json(request, limit))
        return Response(dumps(reply), media_type=JSON)

    @app.post("/invocations", tags=["scoring"], response_class=Response,
              summary="MLflow scoring-server protocol, routed by segment columns",
              openapi_extra=schemas.body("InvocationsRequest", csv=True),
              responses=schemas.reply("InvocationsResponse", 400, 404, 413, 415, 422, 503))
    async def invocations(request: Request) -> Response:
        """Takes ``dataframe_split``, ``dataframe_records`` or ``instances`` like
        ``mlflow models serve``, or a ``text/csv`` body; ``"params": {"model": name}``
        (``?model=name`` with CSV) skips the routing."""
        scorer = deployment_of(request).scorer
        if is_csv(request.scope["headers"]):
            table = await read_csv_table(request, limit)
            reply = await scorer.invocations_reply(None, table,
                                                   request.query_params.get("model"))
        else:
            reply = await scorer.invocations_reply(await read_json(request, limit))
        return Response(dumps(reply), media_type=JSON)

    @app.post("/models/{name}/score", tags=["scoring"], response_class=Response,
              summary="Score rows with the model in the path (a proxy can route by it)",
              openapi_extra=schemas.body("ScoreRequest"),
              responses=schemas.reply("ScoreResponse", 400, 404, 413, 415, 422, 503))
    async def score_model_route(name: str, request: Request) -> Response:
        """``/score`` with ``"model"`` taken from the path, so that a fleet's proxy routes
        the request by model name without reading the body (see ``manymodels fleet``)."""
        scorer = deployment_of(request).scorer
        reply = await scorer.model_reply(name, await read_json(request, limit))
        return Response(dumps(reply), media_type=JSON)

    @app.post("/segments/score", tags=["scoring"], response_class=Response,
              summary="Score one segment's rows; the key is in ?key= or x-manymodels-key",
              openapi_extra=schemas.body("ScoreRequest"),
              responses=schemas.reply("ScoreResponse", 400, 404, 413, 415, 422, 503))
    async def score_segment_route(request: Request, key: str | None = None) -> Response:
        """``/score`` for the rows of one segment, whose key (``store=42,brand=tropicana``)
        rides in the query or the ``x-manymodels-key`` header where a proxy sees it. Rows
        may omit the segment columns; rows that carry them must match the key."""
        scorer = deployment_of(request).scorer
        reply = await scorer.segment_reply(key if key is not None
                                           else key_of_scope(request.scope),
                                           await read_json(request, limit))
        return Response(dumps(reply), media_type=JSON)

    @app.get("/models", tags=["models"], response_class=Response,
             summary="List the models: names, segments, tags, loaded or not",
             responses=schemas.reply("ModelList"))
    async def list_models(request: Request) -> Response:
        return Response(dumps(_model_list(deployment_of(request).registry)), media_type=JSON)

    @app.get("/stats", tags=["health"], response_class=Response,
             summary="Model cache and process memory (resident bytes)")
    async def stats(request: Request, by_model: bool = False) -> Response:
        """The answering deployment's models; ``shared``: the session cache every
        deployment shares (by model file sha256); ``rss``: the whole process;
        ``?by_model=true`` adds how many times each model was loaded (a fleet's check
        that no model loads on two replicas)."""
        deployment = deployment_of(request)
        return Response(dumps({**deployment.registry.stats(by_model),
                               "deployment": deployment.name,
                               "shared": app.endpoint.shared.stats(),
                               "rss": process.memory_info().rss, "pid": os.getpid()}),
                        media_type=JSON)

    @app.get("/ping", tags=["health"], response_class=Response,
             summary="Liveness, as MLflow's scoring server answers it")
    @app.get("/health", tags=["health"], response_class=Response, include_in_schema=True,
             summary="Liveness")
    async def ping() -> Response:
        return Response(b'{"status":"ok"}', media_type=JSON)


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
        started["ready"] = True
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            mirror.close()
            log_writer, telemetries.log = telemetries.log, None
            for each in registries():
                each.telemetry.attach_log(None)
            if log_writer is not None:
                await asyncio.get_running_loop().run_in_executor(None, log_writer.close)
            endpoint.close()

    for each in registries():  # a bad preload file fails here, before the server starts
        each.preload_names(settings.preload)
    names = ", ".join(endpoint.deployments) or "none"
    app = ManyModelsAPI(endpoint, settings.mirror_queue, settings.max_body_bytes,
                        title="manymodels", version=__version__, lifespan=lifespan,
                        docs_url=None, redoc_url=None,
                        description=f"Serves the models of the deployments {names} by name, "
                        f"by segment key and over the Open Inference Protocol (V2).")
    mirror = app.mirror
    install_error_handlers(app)
    guard = build_guard(settings)
    if guard is not None:
        app.wrap(lambda inner: AuthMiddleware(inner, guard))
    _add_routes(app, settings)
    app.include_router(make_observe_router(  # before /v2/models/{name}
        lambda request: deployment_of(request).registry, metrics))
    v2_router = make_v2_router(
        lambda request: deployment_of(request).registry, settings.max_body_bytes,
        lambda: started["ready"] and not any(r.preloading for r in registries()))
    app.include_router(v2_router)
    app.include_router(make_admin_router(endpoint, mirror, settings))
    app.include_router(make_ui_router(endpoint, mirror, settings))
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    if guard is not None:
        app.openapi = document_security(app.openapi, guard.mode)  # type: ignore[method-assign]
    add_docs(app)  # Swagger UI from local files: /docs renders without internet
    app.bind_fast_routes(v2_router)
    app.wrap(lambda inner: ObserveMiddleware(  # outermost: every request passes it
        inner, metrics, settings.access_log, lambda: telemetries.log is not None))
    return app


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
