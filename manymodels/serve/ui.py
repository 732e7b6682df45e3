"""The endpoint's own web page: ``GET /ui`` and the JSON it refreshes from.

``/ui`` is one static HTML file (``ui.html`` beside this module: no build step, no CDN;
its Content-Security-Policy lets it talk to this server only). The page holds no data:
every couple of seconds it fetches

* ``GET /ui/state``: the deployments with their live-traffic and mirror shares, requests
  in flight, models loaded, the shared session cache (bytes against the budget, loads,
  evictions), mirrored-traffic counters and, when ``--monitor FILE`` names
  ``manymodels monitor`` output, the models flagged for drift;
* ``GET /metrics`` when the server exports Prometheus metrics, for requests/s, latency
  percentiles and error rate per deployment and the busiest models (the page computes
  rates from the counters' change between two fetches);
* ``GET /ui/routes`` once per deployment (and on each search): what serves every segment,
  its own model, a pool, the global model, a blend with its weights or a fallback, the
  same routes ``manymodels inspect`` lists and the names answers carry in ``model``.

Both are data routes like any other: with authentication on they need a ``read``
credential, which the page asks for and sends as ``Authorization: Bearer``.
"""

from __future__ import annotations

import os
import time
from importlib import resources
from pathlib import Path
from typing import Any

import psutil
from fastapi import APIRouter, Query
from starlette.responses import Response

from manymodels.bundle import SegmentRoute, segment_routes
from manymodels.errors import DataError
from manymodels.report import load_monitor, monitor_records

from .dataplane import dumps
from .endpoint import Endpoint
from .errors import DeploymentNotFound
from .mirror import Mirror
from .rollout import Rollout
from .settings import ServeSettings

__all__ = ["PAGE_HEADERS", "has_route", "make_ui_router", "monitor_flags", "route_table",
           "ui_page", "ui_state"]

#: The page may load nothing from anywhere and talk to this origin only.
PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; "
                               "style-src 'unsafe-inline'; img-src data:; connect-src 'self'; "
                               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "cache-control": "no-store",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def ui_page() -> bytes:
    """The page's bytes, read from the package (``manymodels/serve/ui.html``)."""
    return resources.files("manymodels.serve").joinpath("ui.html").read_bytes()


def monitor_flags(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Per-model drift flags from ``manymodels monitor`` JSON output, for the page.

    A model counts as flagged when its record says so (``drifted``/``drift``/``flagged``
    true) or, lacking such a field, when its largest PSI is at least 0.2 (the usual
    "significant" threshold). A missing or unreadable file is reported, not raised: the
    page should say the monitor data is stale, not stop working.
    """
    try:
        monitor = load_monitor(path)
    except DataError as exc:
        return {"file": str(path), "error": str(exc), "models": 0, "flagged": []}
    raw = monitor_records(monitor, flatten=False)
    shown = monitor_records(monitor)
    flagged = [row for record, row in zip(raw, shown, strict=True) if _is_flagged(record)]
    return {"file": str(path), "models": len(raw),
            "modified": os.path.getmtime(path) if Path(path).is_file() else None,
            "flagged": flagged[:200]}


#: PSI at or above this is "significant" by the usual convention (< 0.1 stable).
PSI_FLAG = 0.2


def _is_flagged(record: dict[str, Any]) -> bool:
    """The record's own verdict when it has one, else its largest PSI against PSI_FLAG."""
    for key in ("drifted", "drift", "flagged"):
        if isinstance(record.get(key), bool):
            return bool(record[key])
    return max(_psi_values(record), default=0.0) >= PSI_FLAG


def _psi_values(value: Any, named: bool = False) -> list[float]:
    """Every number under a key naming PSI, however deeply nested."""
    if isinstance(value, dict):
        return [x for k, v in value.items() for x in _psi_values(v, named or "psi" in str(k).lower())]
    if isinstance(value, list):
        return [x for v in value for x in _psi_values(v, named)]
    if named and isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)]
    return []


def ui_state(endpoint: Endpoint, mirror: Mirror, settings: ServeSettings, started: float,
             process: psutil.Process, rollout: Rollout | None = None) -> dict[str, Any]:
    """What the page shows that is not a Prometheus counter, in one answer."""
    described = endpoint.describe()
    registries = {name: d.registry for name, d in endpoint.deployments.items()}
    for deployment in described["deployments"]:
        deployment.pop("path", None)  # server file paths are not the page's business
        registry = registries[deployment["name"]]
        deployment["cache"] = registry.stats()
        if deployment.get("mirror"):
            stats = mirror.stats_for(endpoint.deployments[deployment["name"]])
            deployment["mirrored"] = stats.as_dict(deployment["name"])
    described.pop("persisted", None)
    return {
        **described,
        "server": {"pid": os.getpid(), "rss": process.memory_info().rss,
                   "uptime_seconds": round(time.monotonic() - started, 1),
                   "workers": settings.workers, "time": time.time()},
        "metrics": settings.metrics,  # the app serves /metrics exactly when this is on
        "monitor": monitor_flags(settings.monitor) if settings.monitor else None,
        "rollout": rollout.describe() if rollout is not None else None,
    }


#: Routes shown per request at most: the page searches, it does not page through 50,000.
ROUTES_SHOWN = 500


class RouteCache:
    """Every segment route of each deployment's bundle, worked out once per bundle (a
    deployment swapped to another bundle gets its routes anew)."""

    def __init__(self) -> None:
        self._routes: dict[str, tuple[object, list[SegmentRoute]]] = {}

    def of(self, endpoint: Endpoint, name: str) -> list[SegmentRoute]:
        deployment = endpoint.deployments.get(name)
        if deployment is None:
            raise DeploymentNotFound(name, list(endpoint.deployments))
        manifest = deployment.registry.bundle.manifest
        held = self._routes.get(name)
        if held is None or held[0] is not manifest:
            held = self._routes[name] = (manifest, segment_routes(manifest))
        return held[1]


def route_table(routes: list[SegmentRoute], query: str = "", limit: int = ROUTES_SHOWN
                ) -> dict[str, Any]:
    """The routes whose segment, kind, status or model contains ``query`` (case-blind),
    the first ``limit`` of them, with the count of every kind over all routes."""
    kinds: dict[str, int] = {}
    for route in routes:
        kinds[route.kind] = kinds.get(route.kind, 0) + 1
    needle = query.strip().lower()
    matched = [r for r in routes if not needle or needle in
               f"{r.segment}\x1f{r.kind}\x1f{r.status}\x1f{r.answer or ''}".lower()]
    return {"segments": len(routes), "kinds": dict(sorted(kinds.items())),
            "matched": len(matched), "routes": [r.as_dict() for r in matched[:limit]]}


def has_route(routes: Any, path: str) -> bool:
    """Whether a route answers ``path``, looking inside included routers too (FastAPI
    keeps an included router as one entry whose own routes hold the paths)."""
    for route in routes:
        if getattr(route, "path", None) == path:
            return True
        inner = getattr(getattr(route, "original_router", route), "routes", None)
        if inner is not None and inner is not routes and has_route(inner, path):
            return True
    return False


def make_ui_router(endpoint: Endpoint, mirror: Mirror, settings: ServeSettings,
                   rollout: Rollout | None = None) -> APIRouter:
    """``GET /ui`` (the page) and ``GET /ui/state`` (its JSON) over ``endpoint``."""
    router = APIRouter(tags=["ui"])
    page = ui_page()
    started = time.monotonic()
    process = psutil.Process()

    @router.get("/ui", response_class=Response,
                summary="The endpoint's web page: deployments, traffic, latency, cache, drift")
    async def ui() -> Response:
        """A static page (no build step, nothing from a CDN) that refreshes itself from
        ``/ui/state`` and ``/metrics``; with authentication on, it asks for a credential
        with the ``read`` scope and sends it as a Bearer header."""
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    @router.get("/ui/state", response_class=Response,
                summary="Deployments, traffic and mirror shares, session cache, drift flags")
    async def state() -> Response:
        return Response(dumps(ui_state(endpoint, mirror, settings, started, process,
                                             rollout)),
                        media_type="application/json", headers={"cache-control": "no-store"})

    routes = RouteCache()

    @router.get("/ui/routes", response_class=Response,
                summary="What serves every segment of a deployment: own, pooled, global, "
                        "blend with weights, or a fallback")
    async def segment_route_table(
            deployment: str = Query(..., description="the deployment's name"),
            q: str = Query("", description="keep routes whose segment, kind, status or "
                                           "model contains this text"),
            limit: int = Query(ROUTES_SHOWN, ge=0, le=ROUTES_SHOWN)) -> Response:
        """The routes ``manymodels inspect`` lists, with the name an answer's ``model``
        field carries for the segment's rows (a blend names its members and weights)."""
        table = route_table(routes.of(endpoint, deployment), q, limit)
        return Response(dumps({"deployment": deployment, **table}),
                        media_type="application/json", headers={"cache-control": "no-store"})

    return router
