"""Reading the prediction logs that ``manymodels serve --log-predictions DIR`` writes.

Only complete files are named ``predictions-*.parquet``; the file being written is
hidden (``.predictions-….tmp``), so whatever this reads is whole.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from manymodels.errors import DataError

__all__ = ["PREFIX", "SUFFIX", "log_files", "read_prediction_logs"]

PREFIX = "predictions-"
SUFFIX = ".parquet"


def log_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The complete prediction-log files of ``directory``, oldest first."""
    return sorted(Path(directory).glob(f"{PREFIX}*{SUFFIX}"))


def read_prediction_logs(directory: str | os.PathLike[str],
                         unreadable: list[str] | None = None) -> pa.Table:
    """Every complete prediction-log file of ``directory`` as one table.

    A file that cannot be read (a disk that filled up under an older server, a copy cut
    short) is skipped, not fatal: its name and reason are appended to ``unreadable``.
    """
    path = Path(directory)
    if not path.is_dir():
        raise DataError(f"prediction log directory {path} does not exist; pass the DIR given "
                        f"to `manymodels serve --log-predictions DIR`")
    files = log_files(path)
    if not files:
        raise DataError(f"{path} holds no prediction-log files ({PREFIX}*{SUFFIX}); files "
                        f"appear when the server completes one (size, age or shutdown)")
    tables, bad = [], []
    for file in files:
        try:
            tables.append(pq.read_table(file))
        except (OSError, pa.ArrowInvalid) as exc:
            bad.append(f"{file.name}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}")
    if unreadable is not None:
        unreadable.extend(bad)
    if not tables:
        raise DataError(f"none of the {len(files)} prediction-log files in {path} can be "
                        f"read ({bad[0]})")
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except pa.ArrowInvalid as exc:
        raise DataError(f"prediction logs in {path} cannot be combined: {exc}") from exc
