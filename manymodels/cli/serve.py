"""CLI command ``manymodels serve``: every model of a bundle behind one HTTP endpoint."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

__all__ = ["register"]


def serve(
    source: Annotated[str | None, typer.Argument(
        help="Bundle directory or registry URI models:/<name>@<alias> "
             "(default: the spec's or MANYMODELS_BUNDLE)")] = None,
    spec: Annotated[str | None, typer.Option(
        help="Settings spec: a name in serving/ (e.g. default) or a YAML path")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port")] = None,
    workers: Annotated[int | None, typer.Option(
        help="Worker processes; each holds its own model cache (default 1)")] = None,
    max_memory_mb: Annotated[float | None, typer.Option(
        help="Model cache budget per worker, MB of resident memory (default: unbounded)")] = None,
    max_body_mb: Annotated[float | None, typer.Option(
        help="Largest request body in MB (default 16)")] = None,
    preload: Annotated[str | None, typer.Option(
        help="all | none | FILE listing model names, one per line (default none)")] = None,
    pin_fallbacks: Annotated[bool | None, typer.Option(
        "--pin-fallbacks/--no-pin-fallbacks",
        help="Keep the fallback models resident (default on)")] = None,
    log_level: Annotated[str | None, typer.Option(help="critical|error|warning|info|debug")] = None,
    access_log: Annotated[bool | None, typer.Option(
        "--access-log/--no-access-log", help="One log line per request (default off)")] = None,
) -> None:
    """Serve a bundle over HTTP: /score, /invocations, /models and the V2 protocol."""
    from manymodels.serve import load_settings, run  # FastAPI/uvicorn only when serving

    settings = load_settings(spec, bundle=source, host=host, port=port, workers=workers,
                             max_memory_mb=max_memory_mb, max_body_mb=max_body_mb,
                             preload=preload, pin_fallbacks=pin_fallbacks, log_level=log_level,
                             access_log=access_log)
    budget = f"{settings.max_memory_mb:g} MB" if settings.max_memory_mb else "unbounded"
    Console(stderr=True).print(
        f"serving [bold]{settings.bundle}[/] on http://{settings.host}:{settings.port} "
        f"(workers {settings.workers}, cache {budget}, preload {settings.preload}); "
        f"docs at /docs", highlight=False, soft_wrap=True)
    run(settings)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("serve")(serve)
