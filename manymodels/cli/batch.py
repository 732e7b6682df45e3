"""CLI command ``manymodels batch``: score files through a bundle, exactly once."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from manymodels.errors import SpecError

__all__ = ["QUICK_EXIT", "register"]

#: Set once a batch run has committed everything and printed its summary: the process
#: may then end without tearing down its interpreter (freeing every session and every
#: module; all output is already durable). Only the console-script
#: entry point acts on it, so in-process callers (tests, notebooks) are unaffected.
QUICK_EXIT = {"ok": False}


def _print_summary(summary: object) -> None:
    from manymodels.batch import BatchSummary

    assert isinstance(summary, BatchSummary)
    console = Console()
    table = Table(title=f"manymodels batch → {summary.output}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("rows scored (in OUTPUT)", f"{summary.rows_scored:,}")
    table.add_row("rows rejected (OUTPUT/rejected)", f"{summary.rows_rejected:,}")
    table.add_row("fallback rows", f"{summary.fallbacks:,}")
    table.add_row("models used", f"{len(summary.models):,}")
    table.add_row("pieces committed now / already done",
                  f"{summary.pieces_committed:,} / {summary.pieces_skipped:,}")
    if summary.pieces_retracted:
        table.add_row("stale pieces replaced (input changed)", f"{summary.pieces_retracted:,}")
    table.add_row("rows this run", f"{summary.rows_this_run:,} in {summary.seconds:.1f} s "
                  f"({summary.rows_per_second:,.0f} rows/s, {summary.workers} worker(s), "
                  f"{summary.backend})")
    table.add_row(f"errors ({summary.error_unit}) / threshold",
                  f"{summary.errors:,} / {summary.error_threshold}")
    console.print(table)
    top = list(summary.models.items())[:5]
    if top:
        console.print("top models: " + ", ".join(f"{m} ({c:,})" for m, c in top),
                      highlight=False)
    for rel, reason in summary.failed_files:
        console.print(f"[red]failed[/] {rel}: {reason}", highlight=False, soft_wrap=True)
    if summary.failed_files:
        console.print("rerun the same command to retry the failed files", highlight=False)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command("batch")
    def batch(
        bundle: str = typer.Argument(
            ..., help="Bundle directory, models:/name@alias or s3://bucket/path."),
        input: str = typer.Argument(  # noqa: A002
            ..., help="CSV or Parquet file, or a folder of them (hive key=value folders ok); "
                      "local or s3://..."),
        output: str = typer.Argument(
            ..., help="Output folder (local or s3://...): predictions/, rejected/ and the "
                      "commit log."),
        mini_batch_size: str = typer.Option(
            "1000000", "--mini-batch-size",
            help="Rows per mini-batch (whole row groups), or 'N files'."),
        workers: int = typer.Option(
            0, "--workers",
            help="Worker processes (one is a pipelined process using about two cores); "
                 "0 = choose from the input size and the cores."),
        error_threshold: int = typer.Option(
            -1, "--error-threshold",
            help="Rows (files with 'N files') allowed to fail before stopping; -1 never."),
        id_column: str = typer.Option(
            "", "--id-column", help="Column identifying a row (default: file + row number)."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Discard earlier results in OUTPUT and start over."),
        backend: str = typer.Option("local", "--backend", help="'local' or 'dask'."),
        scheduler: str = typer.Option(
            "", "--scheduler", help="Dask scheduler address (default: a local cluster)."),
        cache_mb: int = typer.Option(
            1024, "--cache-mb", help="Session cache budget per worker, in MB."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar."),
        strict_columns: bool = typer.Option(
            False, "--strict-columns",
            help="Reject rows of files with columns no model takes (default: ignore them)."),
        csv_delimiter: str = typer.Option(
            None, "--csv-delimiter",
            help="Field delimiter of CSV inputs (default: sniffed: , ; tab or |)."),
    ) -> None:
        """Score CSV/Parquet rows through a bundle into Parquet, exactly once (resumable)."""
        from manymodels.batch import ErrorThresholdExceeded, NothingScored, score_batch
        from manymodels.batch.executors import reuse_freed_memory

        reuse_freed_memory()

        if scheduler and backend != "dask":
            raise SpecError("--scheduler needs --backend dask")
        try:
            summary = score_batch(
                bundle, input, output, mini_batch_size=mini_batch_size,
                workers=workers or None, error_threshold=error_threshold,
                id_column=id_column or None, overwrite=overwrite, backend=backend,
                scheduler=scheduler or None, progress=progress,
                cache_bytes=cache_mb * (1 << 20), strict_columns=strict_columns,
                csv_delimiter=csv_delimiter)
        except (ErrorThresholdExceeded, NothingScored) as exc:
            _print_summary(exc.summary)
            raise
        _print_summary(summary)
        QUICK_EXIT["ok"] = True
