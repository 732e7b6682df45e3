"""Run the application under uvicorn with the settings that make it fast.

uvloop + httptools (the fastest event loop and parser uvicorn offers) with the connection
limits of :mod:`.limits`, no access log and no ``server``/``date`` headers by default.
One worker serves from this process; several workers re-create the application from
``MANYMODELS_*`` variables in each process, and each then holds its own model cache.
With several workers, Prometheus metrics use prometheus-client's multiprocess mode in a
fresh directory (``PROMETHEUS_MULTIPROC_DIR``, removed at exit; set it yourself to keep
the files, and empty it before each start).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import uvicorn

from manymodels.errors import SpecError
from manymodels.sources import resolve_bundle_source

from .app import create_app
from .limits import LIMITS_ATTRIBUTE, ConnectionLimits, GuardedHttpTools
from .metrics import METRICS_DIR_ENV
from .settings import ServeSettings

if TYPE_CHECKING:
    from .endpoint import EndpointSpec

__all__ = ["run", "uvicorn_config", "uvicorn_options"]


def uvicorn_options(settings: ServeSettings) -> dict[str, object]:
    """uvicorn keyword arguments shared by ``run``, the tests and the benchmark peers."""
    return {"host": settings.host, "port": settings.port, "loop": "uvloop",
            "http": GuardedHttpTools, "log_level": settings.log_level,
            "access_log": False, "server_header": False, "date_header": False,
            "timeout_keep_alive": settings.keep_alive_seconds,
            "limit_concurrency": settings.max_concurrency,
            "ssl_certfile": settings.ssl_certfile, "ssl_keyfile": settings.ssl_keyfile}


def uvicorn_config(settings: ServeSettings, spec: EndpointSpec | None = None) -> uvicorn.Config:
    """A uvicorn config serving ``settings`` (or the endpoint ``spec``) in this process."""
    config = uvicorn.Config(create_app(settings, spec=spec), **uvicorn_options(settings))  # type: ignore[arg-type]
    setattr(config, LIMITS_ATTRIBUTE, ConnectionLimits.of(settings))  # read per connection
    return config


def run(settings: ServeSettings, spec: EndpointSpec | None = None) -> None:
    """Serve until interrupted. A registry URI is resolved once, before workers start;
    several workers read the deployments from the endpoint file."""
    logging.getLogger("manymodels").setLevel(settings.log_level.upper())
    if settings.bundle is not None and not settings.follow:  # following keeps the alias
        settings = settings.model_copy(update={"bundle": str(resolve_bundle_source(settings.bundle))})
    if settings.workers == 1:
        uvicorn.Server(uvicorn_config(settings, spec)).run()
        return
    if spec is not None and settings.endpoint is None:
        raise SpecError("several deployments with --workers > 1 need --endpoint FILE, so "
                        "every worker reads the same deployments")
    create_app(settings, spec=spec)  # fail here, once, on a bad bundle, not in every worker
    settings = settings.model_copy(update={"bundle": None}) if settings.endpoint else settings
    os.environ.update(settings.to_env())
    own_dir = None
    if settings.metrics and not os.environ.get(METRICS_DIR_ENV):
        own_dir = tempfile.mkdtemp(prefix="manymodels-metrics-")  # fresh: no stale counts
        os.environ[METRICS_DIR_ENV] = own_dir  # read by prometheus-client in every worker
    try:
        uvicorn.run("manymodels.serve.app:create_app_from_env", factory=True,
                    workers=settings.workers, **uvicorn_options(settings))  # type: ignore[arg-type]
    finally:
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
            os.environ.pop(METRICS_DIR_ENV, None)
