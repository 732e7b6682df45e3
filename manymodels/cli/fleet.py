"""CLI commands ``manymodels fleet config nginx|haproxy`` and ``manymodels fleet up``."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["register"]

fleet_app = typer.Typer(help="Replicas of `manymodels serve` behind a proxy, sharded by key.",
                        no_args_is_help=True)


@fleet_app.command("config")
def config(
    proxy: Annotated[str, typer.Argument(help="nginx or haproxy")],
    replicas: Annotated[str, typer.Option(
        help="Replica addresses: 127.0.0.1:8001,127.0.0.1:8002,...")],
    listen: Annotated[str, typer.Option(help="Where the proxy listens")] = "127.0.0.1:8080",
) -> None:
    """Print the proxy's configuration (consistent hashing by model or segment key)."""
    from manymodels.errors import SpecError
    from manymodels.fleet import haproxy_config, nginx_config, parse_replicas

    addresses = parse_replicas(replicas)
    if proxy == "nginx":
        typer.echo(nginx_config(addresses, listen), nl=False)
    elif proxy == "haproxy":
        typer.echo(haproxy_config(addresses, listen), nl=False)
    else:
        raise SpecError(f"proxy must be 'nginx' or 'haproxy', got {proxy!r}")


@fleet_app.command("up")
def up(
    bundle: Annotated[str, typer.Argument(help="Bundle directory, models:/ URI or s3:// URL")],
    replicas: Annotated[int, typer.Option(help="Number of replicas")] = 3,
    listen: Annotated[str, typer.Option(help="Where the proxy listens")] = "127.0.0.1:8080",
    max_memory_mb: Annotated[float | None, typer.Option(
        help="Model cache budget per replica, MB")] = None,
    proxy: Annotated[str, typer.Option(help="nginx or haproxy")] = "nginx",
) -> None:
    """Start replicas and a proxy on this machine, until Ctrl-C (for trying a fleet); a
    replica that exits is started again (with backoff) while the others serve."""
    from manymodels.errors import SpecError
    from manymodels.fleet import LocalFleet

    if replicas < 1:
        raise SpecError(f"--replicas must be at least 1, got {replicas}")
    args = ["--max-memory-mb", f"{max_memory_mb:g}"] if max_memory_mb else []
    console = Console(stderr=True)

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    with LocalFleet(bundle, replicas, listen, args, proxy_name=proxy, say=say) as fleet:
        members = ", ".join(r.url for r in fleet.members)
        say(f"fleet of {replicas} on [bold]{fleet.url}[/] ({proxy}) over {members}; "
            f"Ctrl-C stops it")
        try:
            while fleet.proxy is not None and fleet.proxy.poll() is None:
                time.sleep(0.5)
            raise SpecError(f"{proxy} exited with code {fleet.proxy.returncode if fleet.proxy else '?'}; "
                            f"the fleet stopped")
        except KeyboardInterrupt:
            pass


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(fleet_app, name="fleet")
