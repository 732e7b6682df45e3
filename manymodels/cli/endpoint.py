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


rollout_app = typer.Typer(help="The rollout of the alias the endpoint follows (serve --follow).",
                          no_args_is_help=True)
endpoint_app.add_typer(rollout_app, name="rollout")


def _print_rollout(found: dict[str, Any]) -> None:
    console = Console()
    state = found.get("state")
    if found.get("follow") is None or state is None:
        console.print("this endpoint follows no alias (serve models:/NAME@ALIAS --follow)"
                      if found.get("follow") is None else
                      f"following {found['follow']}: no rollout state yet", highlight=False)
        return
    line = (f"following {found['follow']}: live version {state['stable']}, status "
            f"{state['status']}")
    if state["status"] == "running":
        step = state["step"]
        line += (f", candidate {state['candidate']} at step {step} "
                 f"({'mirror phase' if step == 0 else str(state['candidate_percent']) + '%'})"
                 f"{' PAUSED' if state['paused'] else ''}")
    elif state.get("reason"):
        line += f" ({state['reason']})"
    console.print(line, highlight=False, soft_wrap=True)
    if state.get("held_back"):
        console.print(f"held back: {', '.join(state['held_back'])}", highlight=False)
    verdict = state.get("last_verdict") or (state.get("verdicts") or [None])[-1]
    if verdict and verdict.get("models"):
        table = Table(title=f"step {verdict.get('step')}: {verdict['outcome']} "
                            f"({verdict['requests']} compared requests, {verdict['seconds']} s)",
                      title_justify="left")
        for column in ("model", "requests", "rows", "errors", "divergent", "rel. diff p95",
                       "p95 ms cand/live", "verdict"):
            table.add_column(column, justify="left" if column in ("model", "verdict")
                             else "right")
        failing = verdict.get("failing", {})
        for name, m in verdict["models"].items():
            table.add_row(name, str(m["requests"]), str(m["rows"]), str(m["errors"]),
                          f"{m['divergent_share']:.1%}", str(m["relative_diff_p95"]),
                          f"{m['candidate_p95_ms']}/{m['live_p95_ms']}",
                          failing.get(name) or ("unobserved" if name in verdict.get(
                              "unobserved", []) else "ok"))
        console.print(table)
    for event in found.get("log", [])[-5:]:
        console.print(f"{event['at']} {event['event']} (step {event['step']}, candidate "
                      f"{event.get('candidate')})", highlight=False)


@rollout_app.command("show")
def rollout_show(url: Url = DEFAULT_URL) -> None:
    """Status, step, the current phase's verdict per changed model, latest events."""
    _print_rollout(_call(url, "GET", "/admin/rollout"))


def _action(action: str, doc: str) -> None:
    def command(url: Url = DEFAULT_URL) -> None:
        _print_rollout(_call(url, "POST", f"/admin/rollout/{action}"))

    command.__doc__ = doc
    rollout_app.command(action)(command)


for _name, _doc in (("pause", "Pause the rollout: no verdicts, traffic stays."),
                    ("resume", "Resume a paused rollout."),
                    ("abort", "Roll back now: candidate removed, alias moved back, version "
                              "tagged rejected."),
                    ("promote", "Promote now: the candidate takes all live traffic.")):
    _action(_name, _doc)


def register(app: typer.Typer) -> None:
    """Add the ``endpoint`` command group to ``app``."""
    app.add_typer(endpoint_app, name="endpoint")
