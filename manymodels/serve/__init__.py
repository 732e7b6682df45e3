"""Online serving: every model of a bundle behind one FastAPI application.

Layers, bottom to top (a module imports only the ones below it):

- :mod:`.settings`, :mod:`.errors` (one table from error class to HTTP status),
  :mod:`.schemas`, :mod:`.metrics`; then :mod:`.observe` (telemetry, request ids);
- :mod:`.registry` (model name → ready session, lazy, bounded in bytes), then
  :mod:`.dataplane` (request rows → checked numpy inputs → predictions);
- :mod:`.paths` (every route path and its parser), then :mod:`.v2`, :mod:`.keyed`,
  :mod:`.auth` and :mod:`.stats`;
- :mod:`.scorer` (a deployment's replies), :mod:`.endpoint` (deployments and traffic),
  :mod:`.mirror` (shadow traffic), :mod:`.asgi` (deployment choice and fast lane);
- :mod:`.policy`, :mod:`.analysis`, :mod:`.rollout_state` and :mod:`.holdback`, then
  :mod:`.rollout` (following an alias: rollouts by analysis, per changed model);
- :mod:`.jobs` (batch jobs: submission checks, the job store, runner processes);
- :mod:`.routes`, :mod:`.admin`, :mod:`.jobroutes` and :mod:`.ui` (HTTP only);
- :mod:`.app`, the composition root, and :mod:`.server` (uvicorn).

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
