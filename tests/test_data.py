"""Tests of reading input tables."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from manymodels.data import parse_time_column, read_table, time_order
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


@pytest.mark.parametrize("sep", [",", ";", "\t", "|"])
@pytest.mark.parametrize("bom", [False, True])
def test_csv_delimiters_are_sniffed_and_a_bom_dropped(tmp_path: Path, sep: str, bom: bool
                                                       ) -> None:
    """Check that a CSV written with any usual delimiter, with or without a byte-order
    mark, reads as the same frame with the same column names."""
    frame = pd.DataFrame({"store id": [1, 2, 3], "brand": ["a", "b", "c"],
                          "y": [0.5, 1.5, 2.5]})
    path = tmp_path / "t.csv"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"")
                     + frame.to_csv(index=False, sep=sep).encode())
    pd.testing.assert_frame_equal(read_table(path), frame)


def test_an_explicit_csv_delimiter_wins_over_sniffing(tmp_path: Path) -> None:
    """Check that csv_delimiter is used as given, and a bad one is one clear error."""
    path = tmp_path / "t.csv"
    path.write_text("a;b\n1;2\n")
    assert list(read_table(path, csv_delimiter=",").columns) == ["a;b"]
    with pytest.raises(DataError, match="one character"):
        read_table(path, csv_delimiter=";;")


def test_decimals_are_numbers_and_categories_stay(tmp_path: Path) -> None:
    """Check that a Parquet decimal column reads as float64 and a categorical one keeps
    its values."""
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"price": pa.array([decimal.Decimal("2.50"), None, decimal.Decimal("100")],
                                        pa.decimal128(10, 2)),
                      "promo": pa.array(["tv", None, "tv"]).dictionary_encode()})
    pq.write_table(table, tmp_path / "t.parquet")
    frame = read_table(tmp_path / "t.parquet")
    assert frame["price"].dtype == "float64"
    assert frame["price"].iloc[[0, 2]].tolist() == [2.5, 100.0]
    assert frame["price"].isna().iloc[1]
    assert frame["promo"].astype(object).iloc[[0, 2]].tolist() == ["tv", "tv"]


@pytest.mark.parametrize(("values", "date_format", "first", "last"), [
    (["2024-03-31", "2025-06-01", "2023-01-02"], None, "2023-01-02", "2025-06-01"),
    (["31/03/2024", "01/06/2025", "02/01/2023"], None, "2023-01-02", "2025-06-01"),
    (["01/06/2025", "02/06/2025"], "%d/%m/%Y", "2025-06-01", "2025-06-02"),
    (["01/06/2025", "02/06/2025"], "%m/%d/%Y", "2025-01-06", "2025-02-06"),
    (["2024-03-31T10:00:00", "2024-03-30 09:00"], None, "2024-03-30 09:00", "2024-03-31 10:00"),
])
def test_text_dates_are_parsed_as_dates(values: list[str], date_format: str | None,
                                        first: str, last: str) -> None:
    """Check that a text time column orders as time (ISO, a fitting day-first layout, or
    date_format), not as text."""
    frame = parse_time_column(pd.DataFrame({"date": values}), "date", date_format)
    assert frame["date"].dtype.kind == "M"
    assert frame["date"].min() == pd.Timestamp(first)
    assert frame["date"].max() == pd.Timestamp(last)


def test_an_ambiguous_date_column_is_refused_by_name() -> None:
    """Check that dates reading both day-first and month-first are one clear error that
    names the column and the setting."""
    with pytest.raises(DataError, match=r"time column 'sold on' is ambiguous.*date_format"):
        parse_time_column(pd.DataFrame({"sold on": ["01/06/2025", "02/06/2025"]}), "sold on")
    with pytest.raises(DataError, match="time column 'sold on' holds text that is not a date"):
        parse_time_column(pd.DataFrame({"sold on": ["soon", "later"]}), "sold on")
    with pytest.raises(DataError, match="does not match date_format"):
        parse_time_column(pd.DataFrame({"sold on": ["2025-06-01"]}), "sold on", "%d/%m/%Y")


def test_zoned_times_keep_their_zone_and_order_in_utc() -> None:
    """Check that tz-aware times keep their zone, mixed offsets become UTC, and
    time_order sorts zoned times by the instant."""
    zoned = pd.DataFrame({"t": pd.to_datetime(["2024-01-01 10:00", "2024-01-01 09:00"])
                          .tz_localize("Europe/Paris")})
    assert str(parse_time_column(zoned, "t")["t"].dt.tz) == "Europe/Paris"
    mixed = parse_time_column(pd.DataFrame({"t": ["2024-01-05T10:00:00+02:00",
                                                  "2024-01-05T09:30:00+01:00"]}), "t")
    assert str(mixed["t"].dt.tz) == "UTC"
    assert time_order(mixed["t"]).argsort().tolist() == [0, 1]
    assert time_order(zoned["t"]).argsort().tolist() == [1, 0]


def test_numbers_stay_numbers() -> None:
    """Check that a numeric time column (a week index), also written as text, is kept as
    numbers."""
    frame = pd.DataFrame({"week": [3, 1, 2]})
    assert parse_time_column(frame, "week") is frame
    assert parse_time_column(pd.DataFrame({"week": ["3", "10"]}), "week")["week"].tolist() \
        == [3, 10]
