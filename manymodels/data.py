"""Read input tables (Parquet or CSV) with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from manymodels.errors import DataError

__all__ = ["read_table"]


def read_table(source: str | os.PathLike[str] | pd.DataFrame) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a ``.parquet`` file/folder or a ``.csv`` file."""
    if isinstance(source, pd.DataFrame):
        return source
    path = Path(source)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path)
        if path.suffix.lower() in (".parquet", ".pq") or path.is_dir():
            return pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .parquet or .csv)")
