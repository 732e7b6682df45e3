"""CLI commands: ``package``, ``inspect``, ``validate`` and the ``models`` registry group.

Thin shells over :mod:`manymodels.bundle` and :mod:`manymodels.registry`; both are
imported inside the commands so that ``manymodels --help`` does not pay for MLflow.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console, JustifyMethod
from rich.table import Table

if TYPE_CHECKING:
    from manymodels.bundle import BundleSummary, PackResult, ValidationReport

console = Console()

models_app = typer.Typer(help="The MLflow model registry: list bundles, promote a version.",
                         no_args_is_help=True)


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GB"


def _print_pack(result: PackResult) -> None:
    console.print(f"[green]packed[/] {result.models} models ({result.segment_models} segment, "
                  f"{result.fallback_models} fallback, {_size(result.bytes)}) into "
                  f"[bold]{result.path}[/] as {result.name} version {result.version}")
    if result.failed:
        console.print(f"[yellow]{len(result.failed)} segment(s) failed in training and are "
                      "served by the fallback chain:[/]")
        for failed in result.failed[:20]:
            key = ", ".join(f"{k}={v}" for k, v in dict(failed.get("key", {})).items())
            console.print(f"  {key}: {failed.get('reason', '?')}", highlight=False)
        if len(result.failed) > 20:
            console.print(f"  ... and {len(result.failed) - 20} more (see the manifest)")
    if result.dropped:
        console.print(f"{len(result.dropped)} model(s) of the run are not routed and were left out")


def package(
    run_dir: Path = typer.Argument(..., help="Run directory written by `manymodels train`."),
    name: str | None = typer.Option(None, "--name", help="Bundle and registered-model name."),
    out: str | None = typer.Option(
        None, "--out", help="Bundle dir or s3://bucket/path (default: bundles/NAME)."),
    version: str | None = typer.Option(None, "--version", help="Default: a content digest."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    register: bool = typer.Option(False, "--register", help="Register it in MLflow."),
    alias: str | None = typer.Option(None, "--alias", help="Register with this alias."),
) -> None:
    """Pack a training run into one bundle directory (optionally registered in MLflow)."""
    from manymodels.bundle import package_run

    target: str | Path
    if out is not None:
        target = out
    elif name is not None:
        target = Path("bundles") / name
    else:
        raise typer.BadParameter("give --name or --out", param_hint="--name")
    result = package_run(run_dir, target, name=name, version=version, overwrite=overwrite)
    _print_pack(result)
    if register or alias:
        from manymodels.registry import register_bundle, resolve_bundle, tracking_uri

        local = resolve_bundle(result.path)  # an s3:// bundle registers its verified copy
        registered = register_bundle(local, name=result.name, alias=alias)
        tail = f" with alias [bold]{alias}[/]" if alias else ""
        console.print(f"[green]registered[/] {registered.uri}{tail} in {tracking_uri()}")


def _summary_table(summary: BundleSummary) -> Table:
    metric = summary.metric_name or "metric"
    table = Table(title=f"{summary.name} {summary.version} ({summary.kind})", show_lines=False)
    columns: list[tuple[str, JustifyMethod]] = [("segment", "left"), ("algorithm", "left"),
                                                (metric, "right"), ("rows", "right"),
                                                ("size", "right")]
    for column, justify in columns:
        table.add_column(column, justify=justify)
    for row in summary.models:
        table.add_row(row.segment, row.algorithm,
                      "" if row.metric is None else f"{row.metric:.4g}",
                      "" if row.rows is None else str(row.rows), _size(row.bytes))
    return table


def _print_totals(summary: BundleSummary) -> None:
    algorithms = ", ".join(f"{a} {n}" for a, n in summary.algorithms.items())
    console.print(f"{len(summary.models)} models ({summary.segment_models} segment), "
                  f"{summary.routes} routes, {_size(summary.total_bytes)}; {algorithms}")
    stats = summary.metric_summary()
    if stats:
        console.print(f"{summary.metric_name}: median {stats['median']:.4g}, "
                      f"min {stats['min']:.4g}, max {stats['max']:.4g} over segment models")
    chain = " -> ".join("(" + ", ".join(level) + ")" if level else "(global)"
                        for level in summary.levels)
    console.print(f"fallback chain: {chain}; run {summary.run_id}; created {summary.created_at}")
    if summary.failed:
        console.print(f"[yellow]{len(summary.failed)} segment(s) failed in training[/] "
                      "(served by the fallback chain)")


def inspect(
    bundle: str = typer.Argument(..., help="Bundle directory or models:/NAME/VERSION|@ALIAS."),
    limit: int = typer.Option(50, "--limit", help="Show at most this many models (0 = all)."),
) -> None:
    """Show a bundle's models (segment, algorithm, metric, rows, size) and totals."""
    from manymodels.bundle import inspect_bundle
    from manymodels.registry import resolve_bundle

    summary = inspect_bundle(resolve_bundle(bundle))
    shown = summary
    if limit and len(summary.models) > limit:
        from dataclasses import replace

        shown = replace(summary, models=summary.models[:limit])
    console.print(_summary_table(shown))
    if shown is not summary:
        console.print(f"... {len(summary.models) - limit} more (use --limit 0 for all)")
    if summary.segments:
        routes = Table(title=f"segment routes ({len(summary.segments):,})", show_lines=False)
        for column in ("segment", "status", "route"):
            routes.add_column(column)
        for route in summary.segments[:limit or None]:
            routes.add_row(route.segment, route.status, route.describe())
        console.print(routes)
        if limit and len(summary.segments) > limit:
            console.print(f"... {len(summary.segments) - limit} more segments (--limit 0 for "
                          "all)")
        kinds = Counter(r.kind for r in summary.segments)
        console.print("routes: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    _print_totals(summary)


def _print_report(report: ValidationReport) -> None:
    for problem in report.warnings:
        console.print(f"[yellow]warning[/] {problem}", highlight=False)
    for problem in report.errors:
        console.print(f"[red]problem[/] {problem}", highlight=False)
    if report.ok:
        console.print(f"[green]ok[/] {report.path}: {report.models_checked} models checked "
                      "(checksums, onnxruntime load, input schemas, routes)")
    else:
        console.print(f"[red]invalid[/] {report.path}: {len(report.errors)} problem(s)")


def validate(
    bundle: str = typer.Argument(..., help="Bundle directory or models:/NAME/VERSION|@ALIAS."),
) -> None:
    """Check checksums, onnxruntime loading, input schemas and routes; exit 1 on problems."""
    from manymodels.bundle import validate_bundle
    from manymodels.registry import resolve_bundle

    report = validate_bundle(resolve_bundle(bundle))
    _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


@models_app.command("list")
def list_command() -> None:
    """List registered models with their versions and aliases."""
    from manymodels.registry import list_models, tracking_uri

    models = list_models()
    table = Table(title=f"registered models in {tracking_uri()}")
    for column in ("name", "versions", "latest", "aliases", "models", "run"):
        table.add_column(column)
    for model in models:
        aliases = ", ".join(f"{a} -> {v}" for a, v in sorted(model.aliases.items()))
        table.add_row(model.name, str(len(model.versions)), model.latest or "", aliases,
                      model.tags.get("manymodels.models", ""),
                      model.tags.get("manymodels.run_id", ""))
    console.print(table)
    if not models:
        console.print("no registered models yet: `manymodels package RUN --name N --register`")


@models_app.command("promote")
def promote_command(
    name: str = typer.Argument(..., help="Registered-model name."),
    version: str = typer.Argument(..., help="Version to point the alias at."),
    alias: str = typer.Option("champion", "--alias", help="Alias to move."),
    reason: str = typer.Option("promoted by hand", "--reason",
                               help="Why, for the promotion log (`models history`)."),
) -> None:
    """Point an alias (default: champion) at a version of a registered model."""
    from manymodels.registry import promote

    previous = promote(name, version, alias, reason=reason)
    was = f" (was version {previous})" if previous else ""
    console.print(f"[green]{name}@{alias}[/] -> version {version}{was}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("package")(package)
    app.command("inspect")(inspect)
    app.command("validate")(validate)
    app.add_typer(models_app, name="models")
