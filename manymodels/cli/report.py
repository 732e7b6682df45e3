"""CLI command ``manymodels report``: a run's or bundle's HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["register", "report_command_line"]


def report_command_line(source: str | Path, out: str | Path = "report.html") -> str:
    """The command that writes the report of ``source`` (``train`` prints it)."""
    import shlex

    return f"manymodels report {shlex.quote(str(source))} --out {shlex.quote(str(out))}"


def report(
    source: Annotated[str, typer.Argument(
        help="Run directory, bundle directory or models:/<name>@<alias>")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="HTML file to write (default: report.html in the directory)")] = None,
    monitor: Annotated[Path | None, typer.Option(
        help="`manymodels monitor` JSON output to include (default: monitor.json in the "
             "directory when present)")] = None,
    series: Annotated[int, typer.Option(
        min=0, help="Forecasting runs: series whose plots (history, backtests, forecast) are "
                    "embedded, the first in the run's order")] = 200,
) -> None:
    """Write one self-contained HTML report (opens offline) of a training run or bundle."""
    from manymodels.report import build_report

    path = build_report(source, out, monitor, series)
    Console().print(f"report: {path}", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("report")(report)
