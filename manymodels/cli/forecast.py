"""CLI commands ``forecast`` and ``update`` for forecasting bundles.

Thin shells: ``forecast`` calls :meth:`manymodels.Bundle.forecast` and writes its table;
``update`` calls :func:`manymodels.forecast.update.update_bundle`.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

console = Console(stderr=True)

__all__ = ["register"]


def _keys(values: list[str], columns: list[str], levels: bool = False) -> list[dict[str, str]]:
    """``--keys store=2,brand=tropicana`` (repeatable) as key mappings, read as the key
    header and ``?key=`` are (a value holding ``,`` or ``%`` percent-encoded); with
    ``levels`` a column left out names the aggregate over it (``--keys store=2``: store
    2's total)."""
    from manymodels.errors import SpecError
    from manymodels.keys import parse_segment_key

    out = []
    for text in values:
        try:
            parts = parse_segment_key(text)
        except ValueError as exc:
            raise SpecError(f"--keys: {exc}; percent-encode a ',' or '%' inside a value "
                            f"(%2C, %25)") from None
        unknown = [c for c in parts if c not in columns]
        missing = [c for c in columns if c not in parts]
        if unknown:
            raise SpecError(f"--keys {text!r} names {', '.join(unknown)}, not a segment "
                            f"column (segment columns: {', '.join(columns)})")
        if missing and not levels:
            raise SpecError(f"--keys {text!r} does not name {', '.join(missing)} "
                            f"(segment columns: {', '.join(columns)})")
        out.append({c: parts[c] for c in columns if c in parts})
    return out


def forecast(
    bundle: str = typer.Argument(..., help="Forecasting bundle directory or models:/name@alias."),
    horizon: int = typer.Option(0, "--horizon", "-h",
                                help="Periods to forecast (default: the trained horizon)."),
    keys: list[str] = typer.Option(  # noqa: B006
        [], "--keys", help="A series as col=value,col=value (repeatable); default all."),
    future: str = typer.Option("", "--future",
                               help="CSV/Parquet of known-future covariates (keys, time, values)."),
    history: str = typer.Option("", "--history",
                                help="CSV/Parquet of fresher history (keys, time, target)."),
    out: str = typer.Option(..., "--out", help="Output file (.parquet or .csv), written atomically."),
) -> None:
    """Forecast the next periods of every series (or of --keys) into one table."""
    from manymodels.data import read_table
    from manymodels.io import atomic_write_bytes
    from manymodels.registry import resolve_bundle
    from manymodels.runtime import Bundle

    opened = Bundle(resolve_bundle(bundle))
    levels = opened.forecaster.hierarchy is not None
    table = opened.forecast(horizon or None,
                            keys=_keys(keys, opened.segment_columns, levels) or None,
                            future=read_table(future) if future else None,
                            history=read_table(history) if history else None)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv":
        atomic_write_bytes(path, table.to_csv(index=False).encode())
    else:
        import io

        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue())
    series = table[opened.segment_columns].drop_duplicates().shape[0] if len(table) else 0
    console.print(f"[green]forecast[/] {series} series x {len(table) // max(series, 1)} "
                  f"periods -> {path}")


def update(
    bundle: str = typer.Argument(..., help="Forecasting bundle directory."),
    data: str = typer.Option(..., "--data", help="CSV/Parquet of new rows (keys, time, target)."),
    out: str = typer.Option("", "--out", help="New bundle directory (default: replace BUNDLE)."),
) -> None:
    """Move a forecasting bundle's origin to the newest periods, without refitting."""
    from manymodels.forecast.update import update_bundle

    result = update_bundle(bundle, data, out=out or None)
    console.print(f"[green]updated[/] {result.path} as {result.name} version {result.version}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("forecast")(forecast)
    app.command("update")(update)
