"""The HTTP routes of the scoring protocols and health, declared on the application.

Routes are thin: read the body (:func:`~.dataplane.read_json`), call the deployment's
:class:`~.scorer.Scorer`, return orjson bytes. Handlers are ``async def`` and score
small requests on the event loop, because a thread hop per request costs more CPU than
the scoring; model loads and large requests go to a thread pool, so they never stall
other requests.
"""

from __future__ import annotations

import os
from typing import Any

import psutil
from starlette.requests import Request
from starlette.responses import Response

from . import schemas
from .asgi import ManyModelsAPI, deployment_of
from .dataplane import dumps, is_csv, read_csv_table, read_json
from .keyed import key_of_scope
from .registry import ModelRegistry
from .settings import ServeSettings

__all__ = ["add_routes"]

JSON = "application/json"


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


def add_routes(app: ManyModelsAPI, settings: ServeSettings) -> None:
    """Declare the scoring, model-list and health routes on ``app``."""
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
            table = await read_csv_table(request, limit, scorer.registry.bundle_columns)
            reply = await scorer.invocations_reply(None, table,
                                                   request.query_params.get("model"))
        else:
            reply = await scorer.invocations_reply(await read_json(request, limit))
        return Response(dumps(reply), media_type=JSON)

    @app.post("/forecast", tags=["scoring"], response_class=Response,
              summary="Forecast the next periods of some or all series of a forecasting bundle",
              openapi_extra=schemas.body("ForecastRequest"),
              responses=schemas.reply("ForecastResponse", 400, 404, 413, 415, 422, 503))
    async def forecast(request: Request) -> Response:
        """``keys`` (or one ``segment``) and a ``horizon`` (default: the trained one);
        ``future`` supplies known-future covariates for every step, ``history`` fresher
        observations that continue or replace a series' stored tail. Answers one record
        per series and step, as ``Bundle.forecast`` does."""
        scorer = deployment_of(request).scorer
        reply = await scorer.forecast_reply(await read_json(request, limit))
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
