"""CLI command ``manymodels serve``: every model of a bundle behind one HTTP endpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from manymodels.errors import SpecError

if TYPE_CHECKING:
    from manymodels.serve.endpoint import EndpointSpec

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
    access_log: Annotated[str | None, typer.Option(
        help="Access log on stdout, one line per request: json | plain | off (default off)")
    ] = None,
    metrics: Annotated[bool | None, typer.Option(
        "--metrics/--no-metrics", help="Prometheus metrics at GET /metrics (default on)")] = None,
    metrics_top_models: Annotated[int | None, typer.Option(
        help="Busiest models with their own /metrics series; the rest are model=\"other\" "
             "(default 50)")] = None,
    log_predictions: Annotated[str | None, typer.Option(
        help="Directory for the prediction log: Parquet files of inputs and predictions")
    ] = None,
    log_sample: Annotated[float | None, typer.Option(
        help="Fraction 0..1 of scored rows written to the prediction log (default 1)")] = None,
    deployment: Annotated[list[str] | None, typer.Option(
        help="NAME=BUNDLE, once per deployment (e.g. blue=models:/oj-sales/3)")] = None,
    traffic: Annotated[str | None, typer.Option(
        help="Live traffic, e.g. blue=90,green=10 (default: all to the first deployment)")
    ] = None,
    mirror: Annotated[str | None, typer.Option(
        help="Mirrored traffic NAME=PERCENT (at most 50) to a deployment with no live traffic")
    ] = None,
    endpoint: Annotated[str | None, typer.Option(
        help="Endpoint file: loaded if it exists, else written; rewritten on every change")
    ] = None,
    follow: Annotated[bool | None, typer.Option(
        "--follow", help="Follow the alias of models:/NAME@ALIAS: roll each new version it "
        "names out by the spec's rollout policy (mirror phase, traffic steps, analysis)")
    ] = None,
    monitor: Annotated[str | None, typer.Option(
        help="`manymodels monitor` JSON output: its drift flags are shown on /ui")] = None,
    auth: Annotated[str | None, typer.Option(
        help="none | key | token (default: none on loopback, key on any other host)")] = None,
    key_file: Annotated[str | None, typer.Option(
        help="Key file of `manymodels keys` (default ~/.config/manymodels/keys.json)")] = None,
    token_secret_file: Annotated[str | None, typer.Option(
        help="HS256 secret of `manymodels token create` (default "
             "~/.config/manymodels/token-secret)")] = None,
    token_public_key_file: Annotated[str | None, typer.Option(
        help="PEM public key (RS256/ES256) of a service that issues the tokens")] = None,
    rate_limit: Annotated[float | None, typer.Option(
        help="Requests/s per key or token subject, per worker (default: no limit)")] = None,
    allow_unauthenticated: Annotated[bool | None, typer.Option(
        "--allow-unauthenticated", help="Allow --auth none on a non-loopback host "
        "(a gateway in front authenticates)")] = None,
    ssl_certfile: Annotated[str | None, typer.Option(help="PEM certificate: serve HTTPS")] = None,
    ssl_keyfile: Annotated[str | None, typer.Option(help="PEM private key of the certificate")
                           ] = None,
    audit_log: Annotated[str | None, typer.Option(
        help="JSON-lines audit log of admin changes and denied requests (rotated)")] = None,
    verify_files: Annotated[bool | None, typer.Option(
        "--verify-files/--no-verify-files",
        help="Refuse a bundle whose model files do not match their sha256 (default on)")
    ] = None,
    strict_columns: Annotated[bool | None, typer.Option(
        "--strict-columns/--ignore-extra-columns",
        help="422 for rows with columns no model takes (default: ignore them)")] = None,
    state_dir: Annotated[str | None, typer.Option(
        help="The endpoint's state: batch jobs database and logs (default: beside the "
             "endpoint file)")] = None,
    batch_root: Annotated[list[str] | None, typer.Option(
        help="A directory batch jobs may read and write under (repeat for several)")] = None,
    batch_bucket: Annotated[list[str] | None, typer.Option(
        help="An s3://bucket/prefix/ batch jobs may read and write under (repeatable)")
    ] = None,
    batch_executor: Annotated[str | None, typer.Option(
        help="Where batch jobs run: local (worker processes) or dask://HOST:PORT")] = None,
    batch_max_workers: Annotated[int | None, typer.Option(
        help="Worker processes of all running batch jobs together (default: the cores)")
    ] = None,
) -> None:
    """Serve bundles over HTTP: /score, /invocations, /models, the V2 protocol, /admin."""
    from manymodels.serve import load_settings, run  # FastAPI/uvicorn only when serving
    from manymodels.serve.auth import auth_mode, is_loopback

    settings = load_settings(spec, bundle=source, host=host, port=port, workers=workers,
                             max_memory_mb=max_memory_mb, max_body_mb=max_body_mb,
                             preload=preload, pin_fallbacks=pin_fallbacks, log_level=log_level,
                             access_log=access_log, endpoint=endpoint, monitor=monitor,
                             metrics=metrics, metrics_top_models=metrics_top_models,
                             log_predictions=log_predictions, log_sample=log_sample,
                             ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile,
                             auth={"mode": auth, "key_file": key_file,
                                   "token_secret_file": token_secret_file,
                                   "token_public_key_file": token_public_key_file,
                                   "rate_limit": rate_limit,
                                   "allow_unauthenticated": allow_unauthenticated},
                             strict_columns=strict_columns, verify_files=verify_files,
                             audit_log=audit_log, follow=follow, state_dir=state_dir,
                             batch={"roots": batch_root or None,
                                    "buckets": batch_bucket or None,
                                    "executor": batch_executor,
                                    "max_workers": batch_max_workers})
    mode = auth_mode(settings)  # refuses `none` on a non-loopback host, with the reason
    plan = endpoint_plan(settings.bundle, deployment or [], traffic, mirror,
                         settings.endpoint)
    sources: list[str | None] = [d.bundle for d in plan.deployments.values()] if plan \
        else [settings.bundle]
    _check_bundles(sources, settings.endpoint)  # fail before "serving ..." is printed
    if settings.log_predictions and importlib.util.find_spec("pyarrow") is None:
        raise SpecError("the prediction log (--log-predictions) writes Parquet and needs "
                        "pyarrow: pip install pyarrow, or build the image with "
                        "`manymodels image build --prediction-log`")
    budget = f"{settings.max_memory_mb:g} MB" if settings.max_memory_mb else "unbounded"
    what = ", ".join(f"{n}={d.bundle}" for n, d in plan.deployments.items()) if plan else (
        settings.endpoint if settings.bundle is None else settings.bundle)
    scheme = "https" if settings.ssl_certfile else "http"
    console = Console(stderr=True)
    console.print(
        f"serving [bold]{what}[/] on {scheme}://{settings.host}:{settings.port} "
        f"(workers {settings.workers}, cache {budget}, preload {settings.preload}, auth {mode}); "
        f"docs at /docs, dashboard at /ui", highlight=False, soft_wrap=True)
    if scheme == "http" and mode != "none" and not is_loopback(settings.host):
        console.print("[yellow]warning[/]: credentials will cross the network in clear text; "
                      "serve HTTPS with --ssl-certfile/--ssl-keyfile or terminate TLS in front",
                      highlight=False, soft_wrap=True)
    run(settings, plan)


def endpoint_plan(bundle: str | None, deployments: list[str], traffic: str | None,
                  mirror: str | None, endpoint_file: str | None) -> EndpointSpec | None:
    """The endpoint the ``--deployment`` / ``--traffic`` / ``--mirror`` flags describe,
    or ``None`` when they are not used (one bundle, or the endpoint file's state)."""
    from manymodels.serve.endpoint import (
        DeploymentSpec,
        EndpointSpec,
        MirrorSpec,
        check_rules,
        parse_weights,
    )

    if not deployments:
        if traffic or mirror:
            raise SpecError("--traffic and --mirror need --deployment NAME=BUNDLE flags")
        return None
    if bundle is not None:
        raise SpecError("pass either a bundle argument or --deployment flags, not both")
    if endpoint_file is not None and Path(endpoint_file).is_file():
        raise SpecError(f"endpoint file {endpoint_file} already lists the deployments; drop "
                        f"the --deployment flags (or change them with `manymodels endpoint`)")
    found: dict[str, DeploymentSpec] = {}
    for item in deployments:
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise SpecError(f"--deployment '{item}' must be NAME=BUNDLE, e.g. "
                            f"blue=models:/oj-sales/3")
        if name in found:
            raise SpecError(f"--deployment names '{name}' twice")
        found[name] = DeploymentSpec(bundle=source)
    weights = parse_weights(traffic) if traffic else {next(iter(found)): 100}
    shadow = None
    if mirror:
        (target, percent), *rest = parse_weights(mirror).items()
        if rest:
            raise SpecError("--mirror takes one NAME=PERCENT")
        shadow = MirrorSpec.model_construct(deployment=target, percent=percent)
    check_rules(list(found), weights, shadow)
    try:
        return EndpointSpec(deployments=found, traffic=weights,
                            mirror=None if shadow is None else MirrorSpec(
                                deployment=shadow.deployment, percent=shadow.percent))
    except ValidationError as exc:
        raise SpecError(f"--deployment/--traffic/--mirror: {exc.errors()[0]['msg']}") from None


def _check_bundles(sources: list[str | None], endpoint_file: str | None) -> None:
    """Refuse a missing or unreadable local bundle now (registry URIs resolve when served)."""
    from manymodels.errors import BundleError
    from manymodels.runtime import read_manifest
    from manymodels.serve import resolve_source

    for bundle in sources:
        if bundle is None:
            if endpoint_file is None:
                raise BundleError("no bundle to serve: pass a bundle directory or models:/ "
                                  "URI (or set MANYMODELS_BUNDLE), --deployment NAME=BUNDLE, "
                                  "or --endpoint FILE")
        elif not bundle.startswith("models:/"):
            read_manifest(resolve_source(bundle))


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("serve")(serve)
