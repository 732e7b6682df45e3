"""CLI: ``manymodels train``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from manymodels.errors import SpecError, TrainingError

__all__ = ["print_summary", "register"]


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.4g}"
    return str(value)


def print_forecast_summary(console: Console, report: Any, summary: dict[str, Any],
                           run_dir: Path, limit: int = 20) -> None:
    """Series table (worst backtest first), the methods chosen and each one's error."""
    metric = summary["metric"]
    shown = report.sort_values("backtest_error", ascending=False).head(limit)
    table = Table(title=f"series ({len(report):,}; worst {len(shown)} by backtest {metric})")
    for col in ("series", "method", f"backtest {metric}", "periods"):
        table.add_column(col)
    for row in shown.to_dict("records"):
        table.add_row(row["segment"], row["method"], _fmt(row["backtest_error"]), str(row["periods"]))
    console.print(table)
    chosen = ", ".join(f"{k}: {v}" for k, v in sorted(summary["methods_chosen"].items()))
    console.print(f"series: {summary['segments']}  horizon: {summary['horizon']}  "
                  f"freq: {summary['freq']}  season: {summary['season_length']}  "
                  f"methods: {chosen}", highlight=False)
    per_method = "  ".join(f"{k} {_fmt(v)}" for k, v in summary["backtest"].items())
    console.print(f"mean backtest {metric}: {per_method}", highlight=False, soft_wrap=True)
    console.print(f"run directory: {run_dir}")


def _shared_counts(summary: dict[str, Any]) -> str:
    """Pools and the global model, which the progress bar counts as models with the
    segments: so that its totals add up to the summary's."""
    shared = summary.get("shared", 0)
    failed = len(summary.get("shared_failed") or {})
    if not shared:
        return ""
    return f"shared models: {shared}" + (f" ({failed} failed)  " if failed else "  ")


def print_summary(console: Console, report: Any, summary: dict[str, Any], run_dir: Path,
                  limit: int = 20) -> None:
    """Segments table (worst gains first), failures, level counts and the routed metric."""
    if summary.get("task") == "forecast":
        print_forecast_summary(console, report, summary, run_dir, limit)
        return
    metric = summary["metric"]
    shown_count = min(limit, len(report))
    title = (f"segments ({len(report):,})" if shown_count == len(report)
             else f"segments ({len(report):,}; {shown_count} shown)")
    table = Table(title=title, show_lines=False)
    key_columns = [c for c in report.columns if str(c).startswith("key.")]
    table.add_column("/".join(str(c)[4:] for c in key_columns) or "segment", no_wrap=True)
    for col in ("status", "winner", f"own {metric}", f"global {metric}", "level", "rows"):
        table.add_column(col)
    shown = report.sort_values("status", key=lambda s: s != "failed").head(limit)
    for row in shown.to_dict("records"):
        key = "/".join(str(row[c]) for c in key_columns) or row["segment"]
        table.add_row(key, row["status"], row["winner"] or "-",
                      _fmt(row["metric_own"]), _fmt(row["metric_global"]), row["level"],
                      str(row["rows"]))
    console.print(table)
    failed = report[report["status"] == "failed"]
    for row in failed.head(10).to_dict("records"):
        console.print(f"[red]failed[/] {row['segment']}: {row['reason']}", highlight=False)
    levels = ", ".join(f"{k}: {v}" for k, v in sorted(summary["levels"].items()))
    constant = summary.get("constant", 0)
    console.print(f"segments: {summary['segments']}  trained: {summary['trained']}  "
                  f"failed: {summary['failed']}  small: {summary['small']}  "
                  + (f"one class (fallback): {constant}  " if constant else "")
                  + _shared_counts(summary)
                  + f"routing: {levels}", highlight=False)
    for name, reason in (summary.get("shared_failed") or {}).items():
        console.print(f"[red]shared model failed[/] {name}: {reason} (its segments fall back "
                      f"to the next level)", highlight=False)
    holdout = summary["holdout"]
    if holdout:
        console.print(f"holdout {metric}: routed {_fmt(holdout.get('routed'))}  vs global-only "
                      f"{_fmt(holdout.get('global_only'))}  vs own-only "
                      f"{_fmt(holdout.get('own_only'))}  "
                      f"(own model beats global in {summary['own_beats_global']} of "
                      f"{summary['compared_with_global']} segments)")
    if not summary.get("segmenting_pays_off", True):
        console.print("[yellow]The global model wins most segments: segmenting by these columns "
                      "does not pay off on this data.[/]")
    console.print(f"run directory: {run_dir}")
    from .report import report_command_line

    console.print(f"report: {report_command_line(run_dir, Path(run_dir) / 'report.html')}",
                  highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``train`` to ``app``."""

    @app.command("train")
    def train_command(
        data: Path = typer.Option(..., "--data", "-d", help="Parquet or CSV table."),
        segmenter: str = typer.Option("store_brand", help="Segmenter spec name or path."),
        trainer: str = typer.Option("default", help="Trainer spec name or path."),
        out: Path = typer.Option(Path("runs"), help="Parent folder of run directories."),
        run_id: str = typer.Option(None, help="Run id (default: timestamp + random)."),
        jobs: int = typer.Option(None, "--jobs", "-j",
                                 help="Worker processes, at least 1 (default: one per core)."),
        backend: str = typer.Option("loky", help="loky (local processes), threading or dask."),
        scheduler: str = typer.Option(None, help="Dask scheduler address (tcp://host:8786)."),
        gate: str = typer.Option(None, help="on/off: compare own vs pooled vs global models."),
        max_failed: float = typer.Option(0.05, help="Allowed fraction of failed segments."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables."),
        track: bool = typer.Option(True, help="Log the run to MLflow."),
        log_segments: bool = typer.Option(False, help="One MLflow child run per segment."),
        overwrite: bool = typer.Option(False, help="Replace an existing run of the same id."),
        csv_delimiter: str = typer.Option(
            None, "--csv-delimiter",
            help="Field delimiter of a CSV --data (default: sniffed: , ; tab or |)."),
    ) -> None:
        """Segment the table, fit the candidates per segment in parallel, export ONNX."""
        from manymodels.data import read_table
        from manymodels.training import TrainResult, train

        if gate not in (None, "on", "off"):
            raise SpecError(f"--gate must be 'on' or 'off', not '{gate}'")
        console = Console()
        error: TrainingError | None = None
        result: TrainResult | None
        try:
            table = read_table(data, csv_delimiter=csv_delimiter) if csv_delimiter else data
            result = train(table, segmenter, trainer, out=out, run_id=run_id, jobs=jobs,
                           backend=backend, scheduler=scheduler,
                           gate=None if gate is None else gate == "on", max_failed=max_failed,
                           progress=not quiet, track=track, log_segments=log_segments,
                           overwrite=overwrite)
        except TrainingError as exc:
            error = exc
            result = getattr(exc, "result", None)
        if result is not None and not quiet:
            print_summary(console, result.report, result.summary, result.run_dir)
        elif result is not None:
            console.print(str(result.run_dir))
        if result is not None and result.summary.get("duplicate_rows"):
            Console(stderr=True).print(
                f"[yellow]warning[/]: {result.summary['duplicate_rows']:,} row(s) repeat a "
                f"(segment, time) of another row and were trained on; set duplicates: refuse "
                f"in the trainer spec to stop on them", highlight=False, soft_wrap=True)
        if error is not None:
            raise error
