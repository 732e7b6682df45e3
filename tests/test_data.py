"""Tests of reading input tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from manymodels.data import read_table
from manymodels.errors import DataError


def test_reads_parquet_and_csv(tmp_path: Path) -> None:
    """Check that Parquet and CSV files come back as the same frame."""
    frame = pd.DataFrame({"store": [1, 2], "y": [0.5, 1.5]})
    frame.to_parquet(tmp_path / "a.parquet")
    frame.to_csv(tmp_path / "a.csv", index=False)
    pd.testing.assert_frame_equal(read_table(tmp_path / "a.parquet"), frame)
    pd.testing.assert_frame_equal(read_table(tmp_path / "a.csv"), frame)
    assert read_table(frame) is frame


@pytest.mark.parametrize(("name", "content", "message"), [
    ("missing.parquet", None, "does not exist"),
    ("broken.parquet", b"not parquet", "cannot read"),
    ("table.xlsx", b"x", "unsupported file type '.xlsx'"),
])
def test_bad_files_name_the_file(tmp_path: Path, name: str, content: bytes | None,
                                 message: str) -> None:
    """Check that unreadable inputs give a DataError naming the file."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        read_table(path)
    assert name in str(info.value)
