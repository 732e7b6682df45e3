"""The FastAPI application: every model of a bundle behind one endpoint.

Routes are thin: read the body (:func:`~.dataplane.read_json`), call the data plane,
return orjson bytes. Handlers are ``async def`` and score small requests on the event
loop (tens of microseconds), because a thread hop per request doubles the CPU cost;
model loads and large requests go to a thread pool, so they never stall other requests.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.requests import Request
from starlette.responses import Response

from manymodels.errors import BundleError

from . import schemas
from .dataplane import (
    Prediction,
    Table,
    check_headers,
    dumps,
    is_csv,
    parse_json,
    parse_table,
    read_csv_table,
    read_json,
    receive_body,
    route_rows,
    score_groups,
    score_model,
)
from .errors import MalformedBody, install_error_handlers, render_exception
from .registry import ModelRegistry, ServedModel
from .settings import ServeSettings
from .v2 import infer_reply, make_v2_router, split_infer_path

__all__ = ["ManyModelsAPI", "create_app", "create_app_from_env", "resolve_source"]

log = logging.getLogger("manymodels.serve")

SCORE_FIELDS = ("data", "dataframe_split", "dataframe_records")
INVOCATION_FIELDS = ("dataframe_split", "dataframe_records", "instances")
JSON = "application/json"
JSON_BYTES = b"application/json"


def resolve_source(source: str | os.PathLike[str]) -> Path:
    """A bundle directory from a path or a registry URI (``models:/name@alias``)."""
    text = os.fspath(source)
    if text.startswith("models:/"):
        from manymodels.registry import resolve_bundle  # lazy: MLflow only when asked for

        return Path(resolve_bundle(text))
    path = Path(text)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist; pass a directory made by "
                          f"`manymodels package` or a registry URI models:/<name>@<alias>")
    return path


async def models_for(registry: ModelRegistry, names: Iterable[str]) -> dict[str, ServedModel]:
    """The served models ``names``: hits at once, misses loaded in parallel off the loop."""
    out: dict[str, ServedModel] = {}
    misses = []
    for name in names:
        hit = registry.cached(name)
        if hit is None:
            misses.append(name)
        else:
            out[name] = hit
    if misses:
        loaded = await asyncio.gather(*(registry.get(n) for n in misses))
        out.update(zip(misses, loaded, strict=True))
    return out


class Scorer:
    """The two ways to address a model, shared by ``/score`` and ``/invocations``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.inline_rows = registry.inline_rows
        self.task = registry.bundle.manifest.task

    async def named(self, name: Any, table: Table) -> Prediction:
        if not isinstance(name, str):
            raise MalformedBody(f"'model' must be a model name (a string), not {name!r}")
        served = await self.registry.get(name)
        if table.n > self.inline_rows:
            return await self.registry.run_in_thread(score_model, served, table)  # type: ignore[no-any-return]
        return score_model(served, table)

    async def routed(self, table: Table) -> tuple[Prediction, list[str], list[bool]]:
        routing = route_rows(self.registry, table)
        models = await models_for(self.registry, routing.groups)
        if table.n > self.inline_rows:
            prediction = await self.registry.run_in_thread(score_groups, models, routing, table,
                                                           self.task)
        else:
            prediction = score_groups(models, routing, table, self.task)
        return prediction, routing.model, routing.fallback

    async def score_reply(self, body: Any) -> dict[str, Any]:
        """The ``/score`` response for a parsed body."""
        if not isinstance(body, dict):
            raise MalformedBody("the body must be a JSON object with 'data' or "
                                "'dataframe_split' (and optionally 'model')")
        table = parse_table(body, SCORE_FIELDS)
        name = body.get("model")
        if name is not None:
            prediction = await self.named(name, table)
            payload = {"model": name, "predictions": prediction.prediction}
        else:
            prediction, models, fallback = await self.routed(table)
            payload = {"predictions": prediction.prediction, "model": models,
                       "fallback": fallback}
        return _with_classes(payload, prediction)

    async def invocations_reply(self, body: Any, table: Table | None = None,
                                name: Any = None) -> dict[str, Any]:
        """The ``/invocations`` (MLflow) response for a parsed JSON body, or for a
        ``table`` read from CSV (``name`` then comes from the ``model`` query parameter)."""
        if table is None:
            if not isinstance(body, dict):
                raise MalformedBody("the body must be a JSON object with 'dataframe_split' "
                                    "or 'dataframe_records'")
            table = parse_table(body, INVOCATION_FIELDS)
            params = body.get("params") or {}
            name = params.get("model") if isinstance(params, dict) else None
        if name is not None:
            prediction = await self.named(name, table)
            models, fallback = [name] * table.n, [False] * table.n
        else:
            prediction, models, fallback = await self.routed(table)
        values = prediction.prediction.tolist()
        return {"predictions": [{"prediction": p, "model": m, "fallback": f}
                                for p, m, f in zip(values, models, fallback, strict=True)]}


class ManyModelsAPI(FastAPI):
    """FastAPI with a fast lane for the two hot routes.

    ``POST /score`` and ``POST /v2/models/{name}/infer`` are answered straight from the
    ASGI call: same body checks, same data plane, same error table as the declared
    routes (which stay, for the OpenAPI page and for any caller that mounts the router),
    but without routing, dependency solving and the middleware stack, which cost about
    50 µs per request, four times the scoring itself. Every other route goes through
    FastAPI as usual.
    """

    scorer: Scorer
    body_limit: int

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            if path == "/score":
                await self._fast(scope, receive, send, None)
                return
            target = split_infer_path(path)
            if target is not None:
                await self._fast(scope, receive, send, target)
                return
        await super().__call__(scope, receive, send)

    async def _fast(self, scope: Any, receive: Any, send: Any,
                    target: tuple[str, str | None] | None) -> None:
        status, media = 200, JSON_BYTES
        try:
            check_headers(scope["headers"], self.body_limit)
            body = parse_json(await receive_body(receive, self.body_limit))
            if target is None:
                reply = await self.scorer.score_reply(body)
            else:
                reply = await infer_reply(self.scorer.registry, target[0], target[1], body)
            content = dumps(reply)
        except Exception as exc:  # every failure becomes one mapped answer, never a crash
            status, content, media_text = render_exception(scope["path"], exc)
            media = media_text.encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media),
                                (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


def _with_classes(payload: dict[str, Any], prediction: Prediction) -> dict[str, Any]:
    if prediction.probabilities is not None:
        payload["probabilities"] = prediction.probabilities
        payload["classes"] = list(prediction.classes or [])
    return payload


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


def _add_routes(app: ManyModelsAPI, registry: ModelRegistry, settings: ServeSettings) -> None:
    scorer = app.scorer
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
        if is_csv(request.scope["headers"]):
            table = await read_csv_table(request, limit)
            reply = await scorer.invocations_reply(None, table,
                                                   request.query_params.get("model"))
        else:
            reply = await scorer.invocations_reply(await read_json(request, limit))
        return Response(dumps(reply), media_type=JSON)

    @app.get("/models", tags=["models"], response_class=Response,
             summary="List the models: names, segments, tags, loaded or not",
             responses=schemas.reply("ModelList"))
    async def list_models() -> Response:
        return Response(dumps(_model_list(registry)), media_type=JSON)

    @app.get("/stats", tags=["health"], response_class=Response,
             summary="Model cache and process memory (resident bytes)")
    async def stats() -> Response:
        return Response(dumps({**registry.stats(), "rss": process.memory_info().rss,
                               "pid": os.getpid()}), media_type=JSON)

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


def create_app(settings: ServeSettings, registry: ModelRegistry | None = None) -> FastAPI:
    """Build the application for ``settings.bundle`` (or a ready ``registry``)."""
    if registry is None:
        if settings.bundle is None:
            raise BundleError("no bundle to serve: pass a bundle directory or models:/ URI "
                              "(or set MANYMODELS_BUNDLE)")
        registry = ModelRegistry(resolve_source(settings.bundle), max_bytes=settings.max_bytes,
                                 optimisation=settings.optimisation,
                                 load_threads=settings.load_threads,
                                 inline_rows=settings.inline_rows)
    preload = registry.preload_names(settings.preload)
    started = {"ready": False}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if settings.pin_fallbacks:
            await registry.run_in_thread(registry.pin_fallbacks)
        task = None
        if preload:
            registry.preloading = True
            task = asyncio.ensure_future(registry.run_in_thread(registry.preload, preload))
        started["ready"] = True
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            registry.close()

    app = ManyModelsAPI(title="manymodels", version=_version(), lifespan=lifespan,
                  description=f"Serves the {len(registry.bundle.manifest.models)} models of "
                  f"bundle '{registry.bundle.manifest.name}' by name, by segment key and "
                  f"over the Open Inference Protocol (V2).")
    app.scorer = Scorer(registry)
    app.body_limit = settings.max_body_bytes
    app.state.registry = registry
    app.state.settings = settings
    install_error_handlers(app)
    _add_routes(app, registry, settings)
    app.include_router(make_v2_router(registry, settings.max_body_bytes,
                                      lambda: started["ready"] and not registry.preloading))
    app.openapi = _custom_openapi(app)  # type: ignore[method-assign]
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("manymodels")
    except PackageNotFoundError:
        return "0"


def create_app_from_env() -> FastAPI:
    """Factory for uvicorn workers: settings from the ``MANYMODELS_*`` environment."""
    settings = ServeSettings()
    logging.getLogger("manymodels").setLevel(settings.log_level.upper())
    return create_app(settings)
