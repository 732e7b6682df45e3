"""Read input tables (Parquet or CSV) with errors that name the file, and give real
tables' columns the types they mean: dates as dates, decimals as numbers.

Every reader of a user's table goes through here (training, retraining, forecasting),
so a column means the same thing to all of them.
"""

from __future__ import annotations

import decimal
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.errors import DataError
from manymodels.io import CSV_DELIMITERS, SNIFF_BYTES, sniff_delimiter

__all__ = ["CSV_DELIMITERS", "normalise_types", "parse_time_column", "read_table",
           "read_csv_keeping_codes", "sniff_delimiter", "time_order"]

#: Day-month and month-day layouts tried when a text time column is not ISO 8601.
_DAY_FIRST = ("%d/%m/%Y", "%d-%m-%Y", "%d.%m.%Y", "%d/%m/%y", "%d/%m/%Y %H:%M",
              "%d/%m/%Y %H:%M:%S")
_MONTH_FIRST = ("%m/%d/%Y", "%m-%d-%Y", "%m.%d.%Y", "%m/%d/%y", "%m/%d/%Y %H:%M",
                "%m/%d/%Y %H:%M:%S")


def _csv_delimiter(path: Path, delimiter: str | None) -> str:
    if delimiter is not None:
        if len(delimiter) != 1:
            raise DataError(f"--csv-delimiter must be one character, not {delimiter!r}")
        return delimiter
    with open(path, "rb") as handle:
        return sniff_delimiter(handle.read(SNIFF_BYTES))


def read_table(source: str | os.PathLike[str] | pd.DataFrame, *,
               csv_delimiter: str | None = None) -> pd.DataFrame:
    """A DataFrame from a DataFrame, a ``.parquet`` file/folder or a ``.csv`` file.

    A CSV's delimiter is sniffed unless ``csv_delimiter`` names it, and a byte-order mark
    is dropped. Column types are then normalised (:func:`normalise_types`).
    """
    if isinstance(source, pd.DataFrame):
        return normalise_types(source)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    try:
        if path.suffix.lower() == ".csv":
            sep = _csv_delimiter(path, csv_delimiter)
            return normalise_types(read_csv_keeping_codes(path, sep=sep,
                                                          encoding="utf-8-sig"))
        if path.suffix.lower() in (".parquet", ".pq") or path.is_dir():
            return normalise_types(pd.read_parquet(path))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    raise DataError(f"{path}: unsupported file type '{path.suffix}' (use .parquet or .csv)")


def read_csv_keeping_codes(source: str | os.PathLike[str] | bytes, **options: Any
                           ) -> pd.DataFrame:
    """``pd.read_csv(source, **options)`` (a path, or a body's bytes), with columns of
    whole numbers written with leading zeros (store ``0042``, SKU ``000123``) as the text
    they were written as: codes, not quantities. Read as numbers they become ``42``, a
    different segment key from the ``0042`` that batch scoring (which reads key columns
    as text) looks up, so every row silently took a fallback.

    Such columns are read a second time, as text, only when the table has a column of
    whole numbers, and for a body only when a scan of its bytes finds a field that starts
    like ``0042``.
    """
    def read(**extra: Any) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(source) if isinstance(source, bytes) else source,
                           **options, **extra)

    frame = read()
    if isinstance(source, bytes) and not _may_hold_zero_padded(source,
                                                               options.get("sep", ",")):
        return frame
    candidates = [str(c) for c in frame.columns if _whole_numbers(frame[c])]
    if not candidates:
        return frame
    text = read(usecols=candidates, dtype=str)
    padded = [c for c in candidates
              if text[c].str.fullmatch(r"[+-]?0\d+", na=False).any()]
    if not padded:
        return frame
    out = frame.copy(deep=False)
    for column in padded:
        out[column] = text[column].astype(object).where(text[column].notna(), np.nan)
    return out


def _may_hold_zero_padded(body: bytes, sep: str) -> bool:
    """Whether a CSV body has a field that starts like ``0042`` or ``"0042"`` (a few
    vector passes over the bytes, no parse)."""
    data = np.frombuffer(b"\n\n" + body, dtype=np.uint8)  # two bytes: every field has a start
    if data.size < 4:
        return False
    padded = (data[2:-1] == ord("0")) & (data[3:] >= ord("0")) & (data[3:] <= ord("9"))
    if not padded.any():
        return False
    before = data[1:-2]
    boundary = (before == ord(sep)) | (before == ord("\n"))
    quoted = (before == ord('"')) & ((data[:-3] == ord(sep)) | (data[:-3] == ord("\n")))
    return bool(np.any(padded & (boundary | quoted)))


def _whole_numbers(values: pd.Series) -> bool:
    if values.dtype.kind in "iu":
        return True
    if values.dtype.kind != "f":
        return False
    array = values.to_numpy()
    finite = array[np.isfinite(array)]
    return bool(finite.size) and bool(np.all(finite == np.round(finite)))


def _is_decimal_column(values: pd.Series) -> bool:
    if values.dtype.kind != "O":
        return False
    sample = values.dropna()
    return bool(len(sample)) and isinstance(sample.iloc[0], decimal.Decimal) and \
        all(isinstance(v, decimal.Decimal) for v in sample.iloc[:1000])


def normalise_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Column types as a model should see them, whatever wrote the table.

    Decimals (Parquet ``decimal``, Arrow's ``decimal128`` read as Python ``Decimal``
    objects, or a pandas ``ArrowDtype`` decimal) are numbers, not text. Column names
    become strings. The frame is copied only when something changes.
    """
    changed: dict[str, pd.Series] = {}
    for column in frame.columns:
        values = frame[column]
        dtype = values.dtype
        if isinstance(dtype, pd.ArrowDtype):
            import pyarrow as pa

            if pa.types.is_decimal(dtype.pyarrow_dtype):
                changed[column] = values.astype("float64")
        elif _is_decimal_column(values):
            changed[column] = pd.to_numeric(values.map(
                lambda v: np.nan if v is None or (isinstance(v, float) and v != v) else float(v)))
    renamed = any(not isinstance(c, str) for c in frame.columns)
    if not changed and not renamed:
        return frame
    out = frame.copy(deep=False)
    for column, values in changed.items():
        out[column] = values
    if renamed:
        out.columns = [str(c) for c in out.columns]
    return out


def _layout_parses(text: pd.Series, layout: str) -> bool:
    try:
        pd.to_datetime(text, format=layout)
    except (ValueError, TypeError):
        return False
    return True


def _tz_aware(values: pd.Series) -> bool:
    return isinstance(values.dtype, pd.DatetimeTZDtype)


def parse_time_column(frame: pd.DataFrame, column: str, date_format: str | None = None
                      ) -> pd.DataFrame:
    """``frame`` with its time ``column`` ordered as time, not as text.

    Datetimes (naive or with a time zone, which they keep) and numbers (a week index)
    are left as they are. Text is parsed: with ``date_format`` (a ``strftime`` layout
    such as ``%d/%m/%Y``, the trainer spec's ``date_format``) when given, else as ISO
    8601 (``2025-06-01``, ``2025-06-01T10:00:00+02:00``), else with the one day-first
    or month-first layout every value fits. A column both layouts fit
    (``01/06/2025``) is ambiguous and refused with a :class:`DataError` naming it, as is
    text that is no date. ISO text with several UTC offsets is converted to UTC.
    """
    values = frame[column]
    if values.dtype.kind in "iufM" or _tz_aware(values):
        return frame
    if isinstance(values.dtype, pd.ArrowDtype):
        import pyarrow as pa

        if pa.types.is_timestamp(values.dtype.pyarrow_dtype) or \
                pa.types.is_date(values.dtype.pyarrow_dtype):
            return frame.assign(**{column: pd.to_datetime(values)})
    text = values.astype("string")
    if date_format is not None:
        try:
            parsed = pd.to_datetime(text, format=date_format)
        except (ValueError, TypeError) as exc:
            raise DataError(f"time column '{column}' does not match date_format "
                            f"'{date_format}': {exc}") from None
        return frame.assign(**{column: parsed})
    non_null = text.dropna()
    if len(non_null) and pd.to_numeric(non_null, errors="coerce").notna().all():
        return frame.assign(**{column: pd.to_numeric(values)})  # numbers written as text
    iso = _iso(text)
    if iso is not None:
        return frame.assign(**{column: iso})
    day = [f for f in _DAY_FIRST if _layout_parses(text, f)]
    month = [f for f in _MONTH_FIRST if _layout_parses(text, f)]
    example = str(non_null.iloc[0]) if len(non_null) else ""
    if day and month:
        raise DataError(
            f"time column '{column}' is ambiguous: its dates (e.g. '{example}') read "
            f"as both {day[0]} and {month[0]}; set date_format in the trainer spec "
            f"(date_format: '{day[0]}')")
    if not day and not month:
        raise DataError(
            f"time column '{column}' holds text that is not a date (e.g. '{example}'); "
            f"write ISO dates (2025-06-01) or set date_format in the trainer spec")
    parsed = pd.to_datetime(text, format=(day or month)[0])
    return frame.assign(**{column: parsed})


def _iso(text: pd.Series) -> pd.Series | None:
    """ISO 8601 text as datetimes (several UTC offsets -> UTC), or None if it is not."""
    try:
        with warnings.catch_warnings():  # pandas warns before it returns mixed offsets
            warnings.simplefilter("ignore", FutureWarning)
            parsed = pd.to_datetime(text, format="ISO8601")
        if parsed.dtype == object:  # one Timestamp per offset: not one column of times
            parsed = pd.to_datetime(text, format="ISO8601", utc=True)
    except (ValueError, TypeError):
        return None
    return parsed


def time_order(values: pd.Series | np.ndarray) -> np.ndarray:
    """A time column as numpy values that sort in time order (zoned times as UTC)."""
    if isinstance(values, pd.Series) and _tz_aware(values):
        return values.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
    return np.asarray(values)
