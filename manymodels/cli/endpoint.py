"""CLI ``manymodels endpoint show|add|traffic|mirror|remove``: a running server's deployments.

A thin client of the admin API (``/admin/...``): each command is one HTTP call (with
``MANYMODELS_TOKEN`` as its Bearer credential when the server has ``--auth``), and the
server's answer is printed as a table; a refusal (an unknown deployment, traffic that
does not sum to 100, a bundle that fails its checks) is the server's reason on one line.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from manymodels.errors import BundleError, ManyModelsError, SpecError

__all__ = ["register"]

endpoint_app = typer.Typer(help="Deployments, traffic and mirroring of a running endpoint.",
                           no_args_is_help=True)

Url = Annotated[str, typer.Option(
    envvar="MANYMODELS_URL", help="The server, e.g. http://127.0.0.1:8000 (MANYMODELS_URL)")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _call(url: str, method: str, path: str, body: Any = None) -> Any:
    """One admin call; the server's refusal becomes one ManyModelsError line."""
    import os

    import httpx

    credential = os.environ.get("MANYMODELS_TOKEN")  # an admin key or token, as Bearer
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    try:
        reply = httpx.request(method, url.rstrip("/") + path, json=body, headers=headers,
                              timeout=600)
    except httpx.HTTPError as exc:
        raise ManyModelsError(f"cannot reach the endpoint at {url}: {exc}") from None
    if reply.status_code >= 400:
        try:
            detail = reply.json().get("detail") or reply.text
        except ValueError:
            detail = reply.text
        if reply.status_code in (401, 403):
            detail += ("; set MANYMODELS_TOKEN to a key or token with scope admin "
                       "(`manymodels keys create --scope admin`)")
        error = BundleError if reply.status_code == 422 else (
            SpecError if reply.status_code < 500 else ManyModelsError)
        raise error(f"{method} {path} answered {reply.status_code}: {detail}")
    return reply.json()


def _print_endpoint(state: dict[str, Any]) -> None:
    table = Table(title=f"endpoint {state['name']}", title_justify="left")
    for column in ("deployment", "traffic %", "mirror %", "bundle", "version", "models",
                   "loaded", "in flight"):
        table.add_column(column, justify="right" if column[0] in "tmvli" else "left")
    for d in state["deployments"]:
        table.add_row(d["name"], str(d["traffic"]), str(d["mirror"]), d["bundle"],
                      str(d["version"]), str(d["models"]), str(d["loaded"]), str(d["inflight"]))
    console = Console()
    console.print(table)
    cache = state["cache"]
    console.print(f"shared cache: {cache['loaded']} sessions, {cache['bytes']:,} bytes "
                  f"(budget {cache['max_bytes'] or 'unbounded'}); endpoint file: "
                  f"{state['persisted'] or 'none'}", highlight=False)


def _print_mirror(stats: dict[str, Any]) -> None:
    console = Console()
    shadow = stats["latency_ms"]["shadow"]
    console.print(f"mirror to {stats['deployment']} ({stats['percent']}%): "
                  f"{stats['mirrored']} mirrored, {stats['compared']} compared, "
                  f"{stats['dropped']} dropped, {stats['errors']} shadow errors "
                  f"{stats['errors_by_status'] or ''}; shadow latency p50 {shadow['p50']} ms, "
                  f"p99 {shadow['p99']} ms", highlight=False)
    table = Table(title="answers compared per model", title_justify="left")
    for column in ("model", "rows", "differing", "mean |diff|", "max |diff|",
                   "disagreement", "rerouted"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, diff in stats["models"].items():
        table.add_row(name, str(diff["rows"]), str(diff["differing"]),
                      f"{diff.get('mean_abs_diff', 0):.6g}", f"{diff.get('max_abs_diff', 0):.6g}",
                      f"{diff.get('disagreement_rate', 0):.2%}", str(diff["rerouted"]))
    console.print(table)


@endpoint_app.command("show")
def show(name: Annotated[str | None, typer.Argument(
             help="A deployment: also show how its mirrored answers compare")] = None,
         url: Url = DEFAULT_URL) -> None:
    """Deployments, live and mirrored traffic, and the shared session cache."""
    _print_endpoint(_call(url, "GET", "/admin/deployments"))
    if name is not None:
        _print_mirror(_call(url, "GET", f"/admin/deployments/{name}/mirror"))


@endpoint_app.command("add")
def add(name: Annotated[str, typer.Argument(help="Deployment name, e.g. green")],
        bundle: Annotated[str, typer.Argument(help="Bundle directory or models:/ URI")],
        url: Url = DEFAULT_URL) -> None:
    """Check a bundle and add it as a deployment with 0% traffic."""
    _call(url, "POST", "/admin/deployments", {"name": name, "bundle": bundle})
    _print_endpoint(_call(url, "GET", "/admin/deployments"))


@endpoint_app.command("traffic")
def traffic(weights: Annotated[str, typer.Argument(help="e.g. blue=90,green=10")],
            url: Url = DEFAULT_URL) -> None:
    """Set the live traffic split atomically (integers summing to 100, or all 0)."""
    from manymodels.serve.endpoint import parse_weights

    _call(url, "PUT", "/admin/traffic", parse_weights(weights))
    _print_endpoint(_call(url, "GET", "/admin/deployments"))


@endpoint_app.command("mirror")
def mirror(target: Annotated[str, typer.Argument(help="NAME=PERCENT (at most 50), or off")],
           url: Url = DEFAULT_URL) -> None:
    """Mirror a share of live traffic to a deployment with no live traffic (or stop)."""
    from manymodels.serve.endpoint import parse_weights

    body: dict[str, Any] = {"deployment": None, "percent": 0}
    if target != "off":
        (name, percent), *rest = parse_weights(target).items()
        if rest:
            raise SpecError("mirror takes one NAME=PERCENT, e.g. green=10")
        body = {"deployment": name, "percent": percent}
    _call(url, "PUT", "/admin/mirror", body)
    _print_endpoint(_call(url, "GET", "/admin/deployments"))


@endpoint_app.command("remove")
def remove(name: Annotated[str, typer.Argument(help="Deployment with 0% live traffic")],
           url: Url = DEFAULT_URL) -> None:
    """Remove a deployment once its requests in flight have finished."""
    done = _call(url, "DELETE", f"/admin/deployments/{name}")
    Console(stderr=True).print(f"removed {name} ({done['drained']} requests drained)",
                               highlight=False)
    _print_endpoint(done)


def register(app: typer.Typer) -> None:
    """Add the ``endpoint`` command group to ``app``."""
    app.add_typer(endpoint_app, name="endpoint")
