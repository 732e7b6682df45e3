"""CLI commands: ``manymodels datasets make oj|churn|mixed`` write sample tables.

The tables come from the deterministic generators of :mod:`manymodels.datasets`; bad
options raise :class:`~manymodels.errors.SpecError` there, which the CLI shell turns
into one line and exit code 2.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import typer
from rich.console import Console

if TYPE_CHECKING:
    import pandas as pd

_console = Console(highlight=False)

_OUT_HELP = "Parquet (.parquet) or CSV (.csv) file to write; parent folders are created."
_SEED_HELP = "Seed of the random generator: the same options give the same table."


def _ds() -> ModuleType:
    """The generators, imported on use: other commands should not pay for pandas."""
    from manymodels import datasets

    return datasets


def _report(frame: pd.DataFrame, kind: str, path: Path) -> None:
    """Print rows and segments written, naming the segment columns to train on."""
    columns = list(_ds().SEGMENT_COLUMNS[kind])
    segments = len(frame.drop_duplicates(columns))
    _console.print(
        f"wrote {len(frame):,} rows, {segments:,} segments ({', '.join(columns)}) to {path}"
    )


def make_oj(
    stores: int = typer.Option(100, help="Number of stores; each sells 3 brands."),
    weeks: int = typer.Option(120, help="Weeks per store and brand."),
    seed: int = typer.Option(0, help=_SEED_HELP),
    out: Path | None = typer.Option(
        None, help=f"{_OUT_HELP} [default: datasets/oj_sales_<stores>.parquet]"
    ),
) -> None:
    """Orange-juice sales per store and brand; the target quantity is log units sold."""
    ds = _ds()
    frame = ds.make_oj(stores=stores, weeks=weeks, seed=seed)
    path = ds.write_dataset(frame, out or Path("datasets") / f"oj_sales_{stores}.parquet")
    _report(frame, "oj", path)


def make_churn(
    regions: int = typer.Option(8, help="Number of regions (1..16)."),
    customers_per_region: int = typer.Option(400, help="Customers (rows) per region."),
    seed: int = typer.Option(0, help=_SEED_HELP),
    out: Path | None = typer.Option(
        None, help=f"{_OUT_HELP} [default: datasets/churn_<regions>x<customers>.parquet]"
    ),
) -> None:
    """Customers per region with a 0/1 churned target."""
    ds = _ds()
    frame = ds.make_churn(regions=regions, customers_per_region=customers_per_region, seed=seed)
    default = Path("datasets") / f"churn_{regions}x{customers_per_region}.parquet"
    path = ds.write_dataset(frame, out or default)
    _report(frame, "churn", path)


def make_mixed(
    segments: int = typer.Option(40, help="Number of segments."),
    rows_per_segment: int = typer.Option(120, help="Rows (weeks) per segment."),
    own_fraction: float = typer.Option(
        0.5, help="Share of segments with a pattern of their own; the rest share one."
    ),
    seed: int = typer.Option(0, help=_SEED_HELP),
    out: Path | None = typer.Option(
        None, help=f"{_OUT_HELP} [default: datasets/mixed_<segments>.parquet]"
    ),
) -> None:
    """Segments with their own pattern mixed with segments that share one pattern."""
    ds = _ds()
    frame = ds.make_mixed(segments=segments, rows_per_segment=rows_per_segment,
                          own_fraction=own_fraction, seed=seed)
    path = ds.write_dataset(frame, out or Path("datasets") / f"mixed_{segments}.parquet")
    _report(frame, "mixed", path)
    own = ds.mixed_own_segments(segments, own_fraction)
    _console.print(f"{len(own)} segments follow their own pattern"
                   + (f" ({own[0]}..{own[-1]})" if own else ""))


def register(app: typer.Typer) -> None:
    """Add ``datasets make oj|churn|mixed`` to ``app``."""
    group = typer.Typer(help="Generate the bundled sample tables.", no_args_is_help=True)
    make = typer.Typer(help="Write a generated table to Parquet or CSV.", no_args_is_help=True)
    make.command("oj")(make_oj)
    make.command("churn")(make_churn)
    make.command("mixed")(make_mixed)
    group.add_typer(make, name="make")
    app.add_typer(group, name="datasets")
