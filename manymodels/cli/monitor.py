"""CLI command ``manymodels monitor``: drift and accuracy per model from prediction logs."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["register"]


def _number(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _print(report: Any, show: int) -> None:
    console = Console()
    drift = sorted(report.drift, key=lambda d: (not d.alarm, -(d.psi or 0.0)))
    table = Table(title=f"drift: {report.rows:,} logged rows, "
                  f"{len({d.model for d in report.drift}):,} models", title_justify="left")
    for column in ("model", "feature", "rows", "PSI", "threshold", "verdict"):
        table.add_column(column, justify="right" if column in ("rows", "PSI",
                                                                "threshold") else "left")
    for d in drift[:show]:
        style = "bold red" if d.alarm else None
        table.add_row(d.model, d.feature, f"{d.rows:,}", _number(d.psi),
                      _number(d.threshold), d.verdict, style=style)
    console.print(table)
    if len(drift) > show:
        console.print(f"({len(drift) - show:,} more feature verdicts in --out)")
    if report.accuracy:
        acc = Table(title="accuracy against actuals", title_justify="left")
        for column in ("model", "rows", "metric", "live", "holdout", "verdict"):
            acc.add_column(column)
        for a in sorted(report.accuracy, key=lambda a: (not a.alarm, a.model))[:show]:
            acc.add_row(a.model, f"{a.rows:,}", a.metric, _number(a.value),
                        _number(a.holdout), a.verdict, style="bold red" if a.alarm else None)
        console.print(acc)
    if report.unknown_models:
        console.print(f"[yellow]{len(report.unknown_models)} logged model(s) are not in the "
                      f"bundle[/], e.g. {report.unknown_models[0]}")
    for skipped in report.unreadable_files:
        console.print(f"[yellow]skipped unreadable prediction-log file[/] {skipped}",
                      highlight=False)
    console.print(f"alarms: [bold]{report.alarms}[/]", highlight=False)


def monitor(
    bundle: Annotated[str, typer.Argument(
        help="The served bundle (directory, models:/ URI or s3:// URL)")],
    predictions: Annotated[str, typer.Option(
        help="The server's --log-predictions directory")],
    actuals: Annotated[str | None, typer.Option(
        help="CSV or Parquet of true values, for accuracy per model")] = None,
    id_column: Annotated[str | None, typer.Option(
        help="Column joining actuals to logged rows (one the client sent, or request_id)")
    ] = None,
    target: Annotated[str | None, typer.Option(
        help="Target column of the actuals (default: the bundle's target)")] = None,
    deployment: Annotated[str | None, typer.Option(
        help="Only rows answered by this deployment")] = None,
    out: Annotated[str | None, typer.Option(
        help="Write the report: .json (with a per-model summary) or .parquet")] = None,
    min_rows: Annotated[int, typer.Option(
        help="No verdict for a model with fewer logged rows", min=1)] = 30,
    alpha: Annotated[float, typer.Option(
        help="Chance that an unchanged feature is flagged (per feature)", min=1e-6,
        max=0.5)] = 0.01,
    psi_floor: Annotated[float, typer.Option(
        help="PSI below this never alarms (0.2: the conventional 'significant')", min=0.0)
    ] = 0.2,
    tolerance: Annotated[float, typer.Option(
        help="Accuracy alarm when the live error exceeds this × the holdout error", min=1.0)
    ] = 1.5,
    show: Annotated[int, typer.Option(help="Rows of each table printed", min=1)] = 30,
) -> None:
    """Drift per model and feature (PSI on the training bins in the manifest) and accuracy
    per model against actuals. Exit code 10 when an alarm is raised, 0 when none."""
    from manymodels.monitor import ALARM_EXIT_CODE
    from manymodels.monitor import monitor as run_monitor

    report = run_monitor(bundle, predictions, actuals=actuals, id_column=id_column,
                         target=target, deployment=deployment, min_rows=min_rows, alpha=alpha,
                         floor=psi_floor, tolerance=tolerance)
    if out is not None:
        report.write(out)
    _print(report, show)
    if report.alarms:
        raise typer.Exit(ALARM_EXIT_CODE)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("monitor")(monitor)
