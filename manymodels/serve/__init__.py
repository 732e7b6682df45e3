"""Online serving: every model of a bundle behind one FastAPI application.

Layers, bottom to top: :mod:`.registry` (model name → ready session, lazy, bounded in
bytes), :mod:`.dataplane` (request rows → checked numpy inputs → predictions),
:mod:`.app` and :mod:`.v2` (HTTP routes only), :mod:`.errors` (one table from error
class to HTTP status), :mod:`.settings` (flags, environment, ``serving/`` specs).
This package never imports a training library.
"""

from manymodels.sources import resolve_bundle_source as resolve_source

from .app import create_app, create_app_from_env
from .errors import HTTP_STATUS, status_for
from .registry import ModelRegistry, ServedModel
from .server import run, uvicorn_config, uvicorn_options
from .settings import ServeSettings, load_settings

__all__ = [
    "HTTP_STATUS",
    "ModelRegistry",
    "ServeSettings",
    "ServedModel",
    "create_app",
    "create_app_from_env",
    "load_settings",
    "resolve_source",
    "run",
    "status_for",
    "uvicorn_config",
    "uvicorn_options",
]
