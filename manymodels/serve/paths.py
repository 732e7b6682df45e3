"""Every route path of the server and the parsers that classify a request's path.

The fast lane, the mirror and the credentials check all decide by path before any
FastAPI routing runs, so each path constant and parser lives here once and every one of
them reads the same table.
"""

from __future__ import annotations

import urllib.parse

__all__ = [
    "BATCH",
    "BATCH_JOBS",
    "DATA_PLANE",
    "FAST_ROUTES",
    "FORECAST",
    "INVOCATIONS",
    "MODEL_SCORE",
    "OPEN_PATHS",
    "SCORE",
    "SCORE_PATHS",
    "SEGMENT_SCORE",
    "V2_INFER",
    "V2_INFER_VERSION",
    "is_batch_path",
    "is_mirrored_route",
    "is_model_score_path",
    "is_repository_change",
    "split_infer_path",
    "split_model_score_path",
]

SCORE = "/score"
INVOCATIONS = "/invocations"
V2_INFER = "/v2/models/{name}/infer"
V2_INFER_VERSION = "/v2/models/{name}/versions/{model_version}/infer"
#: The key-carrying routes a fleet's proxy routes by (see :mod:`.keyed`).
MODEL_SCORE = "/models/{name}/score"
SEGMENT_SCORE = "/segments/score"
#: Forecasts of a forecasting bundle's series (see :mod:`.forecasting`).
FORECAST = "/forecast"
#: Batch jobs (see :mod:`.jobroutes`); every path under ``/batch`` needs scope ``batch``.
BATCH = "/batch"
BATCH_JOBS = "/batch/jobs"
#: Route templates the fast lane answers without FastAPI's routing.
FAST_ROUTES = (SCORE, V2_INFER, V2_INFER_VERSION, MODEL_SCORE, SEGMENT_SCORE, FORECAST)
#: Paths answered by one deployment; the rest (health, docs, admin) by the endpoint.
DATA_PLANE = ("/score", "/invocations", "/models", "/stats", "/v2/models/", "/v2/repository/",
              "/segments/", FORECAST)
# ``/ui`` is the endpoint page's static shell: it holds no data (its data routes, /ui/state
# and /metrics, need ``read``), and a browser cannot send a Bearer header on a plain
# navigation, so the page itself must load to ask for the credential.
OPEN_PATHS = frozenset({"/ping", "/health", "/v2/health/live", "/v2/health/ready", "/ui"})
SCORE_PATHS = frozenset({SCORE, INVOCATIONS, SEGMENT_SCORE, FORECAST})


def split_infer_path(path: str) -> tuple[str, str | None] | None:
    """``(name, version)`` of ``/v2/models/{name}[/versions/{v}]/infer``, else ``None``."""
    if not (path.startswith("/v2/models/") and path.endswith("/infer")):
        return None
    parts = path[11:-6].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[1] == "versions" and parts[0] and parts[2]:
        return parts[0], parts[2]
    return None


def split_model_score_path(path: str) -> str | None:
    """The model name of ``/models/{name}/score``, else ``None``."""
    if not (path.startswith("/models/") and path.endswith("/score")):
        return None
    name = urllib.parse.unquote(path[8:-6])
    return name if name and "/" not in name else None


def is_model_score_path(path: str) -> bool:
    """``/models/{name}/score``: a name without ``/`` between the two fixed parts."""
    return path.startswith("/models/") and path.endswith("/score") and \
        len(path) > 14 and "/" not in path[8:-6]


def is_repository_change(path: str) -> bool:
    """V2 model repository extension: ``/v2/repository/models/{name}/load|unload``."""
    return path.startswith("/v2/repository/models/") and (
        path.endswith("/load") or path.endswith("/unload"))


def is_batch_path(path: str) -> bool:
    """``/batch`` and every path under it (the batch jobs API)."""
    return path == BATCH or path.startswith(BATCH + "/")


def is_mirrored_route(method: str, path: str) -> bool:
    """Scoring routes only: copies of GETs or of repository loads would be side effects."""
    return method == "POST" and (path in (SCORE, INVOCATIONS)
                                 or split_infer_path(path) is not None)
