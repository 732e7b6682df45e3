"""The observability routes: ``GET /metrics`` and the V2 statistics extension.

``/v2/models/{name}/stats`` answers in the shape of Triton's statistics extension
(``{"model_stats": [{name, version, last_inference, inference_count, execution_count,
inference_stats: {success, fail, ...}}]}``) from the exact per-model figures of this
worker, for every model (``/metrics`` keeps only the busiest); ``GET /v2/models/stats``
lists every model that has been used.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import Response

from . import schemas
from .dataplane import dumps
from .metrics import Metrics, render_metrics
from .registry import ModelRegistry
from .v2 import check_known

__all__ = ["make_observe_router"]

JSON = "application/json"


def make_observe_router(registry_of: Callable[[Request], ModelRegistry],
                        metrics: Metrics | None) -> APIRouter:
    """``/metrics`` (when ``metrics`` is given) and the statistics routes over the
    registry of the deployment answering each request (``registry_of``)."""
    router = APIRouter()

    if metrics is not None:
        @router.get("/metrics", tags=["health"], response_class=Response,
                    summary="Prometheus metrics: requests, latency, models, cache (all workers)")
        async def prometheus_metrics() -> Response:
            return Response(render_metrics(metrics), media_type=CONTENT_TYPE_LATEST)

    @router.get("/v2/models/stats", tags=["Open Inference Protocol (V2)"],
                response_class=Response,
                summary="Statistics of every model used so far (this worker)")
    async def all_stats(request: Request) -> Response:
        registry = registry_of(request)
        stats = registry.telemetry.stats
        return Response(dumps({"model_stats": [stats.model_stats(n, registry.version)
                                               for n in sorted(stats.names())]}),
                        media_type=JSON)

    async def model_stats(request: Request, name: str,
                          model_version: str | None = None) -> Response:
        registry = registry_of(request)
        check_known(registry, name, model_version)
        stats = registry.telemetry.stats
        return Response(dumps({"model_stats": [stats.model_stats(name, registry.version)]}),
                        media_type=JSON)

    for base in ("/v2/models/{name}", "/v2/models/{name}/versions/{model_version}"):
        router.add_api_route(f"{base}/stats", model_stats, methods=["GET"],
                             response_class=Response, tags=["Open Inference Protocol (V2)"],
                             summary="Model statistics: request counts, success/fail, "
                             "cumulative durations (Triton's statistics extension)",
                             responses=schemas.reply(None, 404, v2=True))
    return router
