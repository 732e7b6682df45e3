"""CLI: ``manymodels retrain`` and ``manymodels models history``.

Exit codes of ``retrain`` (docs/guide/retrain.md): 0 new version promoted (or,
with ``--dry-run``, something to do), 10 nothing to do (no segment changed, or no
challenger was better; a forecasting bundle: no series needs a refit and none has new
periods: nothing written), 11 new version registered (or written) but not
promoted, 12 ``--promote`` refused (validate failed, or the bundle is worse), 13 another
retrain of
the model holds its lock; a failure exits with the code of its error, as every command
does (2 spec, 3 data, 4 bundle, 5 training, 6 registry, 1 other).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import pandas as pd

    from manymodels.retrain import RetrainResult

__all__ = ["register"]


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "-"
    if pct:
        return f"{value:+.1%}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _segments_table(report: pd.DataFrame, metric: str, limit: int) -> Table:
    retrained = report[report["action"] == "retrain"]
    table = Table(title=f"retrained segments ({len(retrained)}; {min(limit, len(retrained))} "
                        "shown)")
    dry = "outcome" not in report
    columns = ["segment", "reason"] if dry else ["segment", "outcome", f"current {metric}",
                                                 f"new {metric}", "gain", "reason"]
    for column in columns:
        table.add_column(column, overflow="fold")
    order = retrained if dry else retrained.sort_values(
        "outcome", key=lambda s: s.map({"failed": 0, "kept current": 1}).fillna(2))
    for row in order.head(limit).to_dict("records"):
        if dry:
            table.add_row(str(row["segment"]), str(row["reason"]))
        else:
            table.add_row(str(row["segment"]), str(row["outcome"]),
                          _fmt(row[f"current_{metric}"]), _fmt(row[f"new_{metric}"]),
                          _fmt(row["gain"], pct=True), str(row["reason"]))
    return table


def _shared_table(shared: pd.DataFrame, limit: int) -> Table:
    table = Table(title=f"pooled and global models ({len(shared)})")
    for column in ("model", "action", "changed rows", "reason"):
        table.add_column(column, overflow="fold")
    order = shared.sort_values("action", key=lambda s: s != "refit")
    for row in order.head(limit).to_dict("records"):
        table.add_row(str(row["model"]), str(row["action"]),
                      f"{row['changed_rows']:,} of {row['rows']:,} ({row['changed_share']:.1%})",
                      str(row["reason"]))
    return table


def _summary_line(result: RetrainResult) -> str:
    plan = result.plan
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(plan.counts().items()))
    shared = result.shared["action"].value_counts().to_dict() if len(result.shared) else {}
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.counts().items())
                         if k not in ("unchanged", "absent"))
    line = (f"retrain {result.name}: {len(plan.retrained)} of {len(plan.segments)} segment(s) "
            f"to retrain ({reasons}); pooled/global: {shared.get('refit', 0)} refit, "
            f"{shared.get('keep', 0)} kept")
    if outcomes and result.outcome.label != "dry run":
        line += f"; {outcomes}"
    return line


def _timings_line(timings: dict[str, float]) -> str:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in timings.items() if k != "total")
    return f"took {timings.get('total', 0.0):.2f} s ({parts})"


def _print(console: Console, result: RetrainResult, quiet: bool) -> None:
    if not quiet and len(result.plan.retrained):
        console.print(_segments_table(result.report, result.metric, 20))
    if not quiet and len(result.shared):
        console.print(_shared_table(result.shared, 20))
    console.print(_summary_line(result), highlight=False, soft_wrap=True)
    if result.comparison is not None and result.comparison.rows:
        console.print(f"bundle: {result.comparison.describe()}", highlight=False, soft_wrap=True)
    if result.bundle is not None:
        registered = f", registered as {result.name} version {result.version}" \
            if result.version else ""
        console.print(f"bundle {result.bundle} (version {result.bundle_version}){registered}; "
                      f"run {result.run_dir}", highlight=False, soft_wrap=True)
    console.print(_timings_line(result.timings), highlight=False, soft_wrap=True)
    tail = f": {result.why}" if result.why else ""
    if result.outcome.label == "dry run":
        tail = ": nothing was written"
    console.print(f"outcome: {result.outcome.label} (exit {result.exit_code}){tail}",
                  highlight=False, soft_wrap=True)


def retrain_command(
    data: Path = typer.Option(..., "--data", "-d", help="The new data: the whole table "
                                                         "(Parquet or CSV), not a delta."),
    source: str = typer.Option(..., "--from", help="The champion: models:/NAME@ALIAS, "
                                                    "models:/NAME/VERSION or a bundle dir."),
    name: str | None = typer.Option(None, "--name", help="Registered-model name (default: "
                                                         "from --from)."),
    register: bool = typer.Option(False, "--register", help="Register the new bundle."),
    promote: bool = typer.Option(False, "--promote", help="Move the alias to the new version "
                                                          "if it validates and is no worse "
                                                          "(implies --register)."),
    alias: str = typer.Option("champion", "--alias", help="Alias that --promote moves."),
    retrain_all: bool = typer.Option(False, "--all", help="Retrain every segment."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would be retrained and "
                                                          "why; write nothing."),
    out: Path | None = typer.Option(None, "--out", help="Bundle dir (default: "
                                                        "bundles/NAME-RUNID)."),
    runs: Path = typer.Option(Path("runs"), "--runs", help="Parent of the merged run dir."),
    segmenter: str | None = typer.Option(None, help="Segmenter spec (default: the champion's)."),
    trainer: str | None = typer.Option(None, help="Trainer spec (default: the champion's)."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", help="Workers (default: one per "
                                                                "core)."),
    backend: str = typer.Option("loky", help="loky (local processes) or dask."),
    scheduler: str | None = typer.Option(None, help="Dask scheduler address."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to wait for another retrain of "
                                                   "the model (default: exit 13 at once)."),
    state_dir: Path | None = typer.Option(None, "--state-dir", help="Locks and resumable "
                                                                    "state (default: beside "
                                                                    "the MLflow store)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log lines only: no tables, no "
                                                            "progress bar."),
    track: bool = typer.Option(True, help="Log the retrain (report, timings) to MLflow."),
    csv_delimiter: str | None = typer.Option(None, "--csv-delimiter",
                                             help="Field delimiter of a CSV --data "
                                                  "(default: sniffed: , ; tab or |)."),
) -> None:
    """Retrain only the segments that changed; keep every other model byte for byte.

    A forecasting bundle refits the series its refit policy names (new, older than
    retrain.max_age, error grown past retrain.error_growth) and moves the others' origin.
    """
    from manymodels.data import read_table
    from manymodels.errors import SpecError
    from manymodels.retrain import retrain

    if jobs is not None and jobs < 1:
        raise SpecError(f"--jobs must be at least 1, not {jobs}")
    if wait < 0:
        raise SpecError(f"--wait must be 0 or more seconds, not {wait:g}")
    console = Console()

    def say(line: str) -> None:
        console.print(line, highlight=False, soft_wrap=True)

    table = read_table(data, csv_delimiter=csv_delimiter) if csv_delimiter else data
    result = retrain(table, source, name=name, out=out, runs=runs, register=register,
                     promote=promote, alias=alias, retrain_all=retrain_all, dry_run=dry_run,
                     segmenter=segmenter, trainer=trainer, jobs=jobs, backend=backend,
                     scheduler=scheduler, wait=wait, state_dir=state_dir, track=track,
                     progress=not quiet, say=say)
    _print(console, result, quiet)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def history_command(
    name: str | None = typer.Argument(None, help="Registered-model name (default: all)."),
) -> None:
    """Every alias move (promotion log): who, when, from which version to which, and why."""
    from manymodels.promotions import log_path, read_promotions

    moves = read_promotions(model=name)
    console = Console()
    if not moves:
        console.print(f"no alias moves logged in {log_path()}")
        return
    table = Table(title=f"promotion log {log_path()}")
    for column in ("when", "model", "alias", "from", "to", "who", "why"):
        table.add_column(column, overflow="fold")
    for move in moves:
        table.add_row(move.at, move.model, move.alias, move.previous or "-", move.version,
                      move.who, move.reason)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add ``retrain`` to ``app`` and ``history`` to its ``models`` group."""
    from .package import models_app

    app.command("retrain")(retrain_command)
    models_app.command("history")(history_command)
