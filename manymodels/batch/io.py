"""Read input pieces in bounded chunks and write Parquet parts, with pyarrow only.

Files are never read whole: Parquet pieces are read a few row groups at a time (up to
``chunk_rows``), CSV files are streamed block by block. Only the columns scoring needs
are read. Hive partition values are added as constant columns when the file lacks them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from .arrow import dictionary_of, numpy_of

__all__ = ["Chunk", "PartWriter", "read_chunks"]

#: Bytes per CSV block read by the streaming reader.
CSV_BLOCK_BYTES = 8 << 20


class Chunk:
    """Rows of one piece: the table and the input row number of its first row."""

    __slots__ = ("file_columns", "offset", "prepared", "table")

    def __init__(self, table: pa.Table, offset: int,
                 file_columns: Sequence[str] | None = None) -> None:
        self.table = table
        self.offset = offset
        #: Every column of the file (and its hive partitions), read or not: what
        #: ``strict_columns`` checks for columns no model takes.
        self.file_columns = tuple(file_columns if file_columns is not None
                                  else table.column_names)
        #: Set by a pipelined reader that validated and routed the chunk already.
        self.prepared: Any = None


def _with_partitions(table: pa.Table, partitions: dict[str, str]) -> pa.Table:
    """Add each hive ``key=value`` of the path as a constant (dictionary) column."""
    for key, value in partitions.items():
        if key not in table.column_names:
            codes = np.zeros(table.num_rows, dtype=np.int32)
            table = table.append_column(key, dictionary_of(codes, [value]))
    return table


def read_parquet_chunks(path: Path, start: int, stop: int, columns: Sequence[str],
                        partitions: dict[str, str], chunk_rows: int,
                        dictionary_columns: Sequence[str] = ()) -> Iterator[Chunk]:
    """Row groups ``[start, stop)`` of a Parquet file, a few groups per chunk.

    ``dictionary_columns`` that hold text are read as Arrow dictionaries: no string per
    row is built, and the router takes the dictionary indices as segment codes.
    """
    handle = pq.ParquetFile(path)
    schema = handle.schema_arrow
    text = [c for c in dictionary_columns if c in schema.names
            and (pa.types.is_string(schema.field(c).type)
                 or pa.types.is_large_string(schema.field(c).type))]
    if text:  # pyarrow takes this only at opening, and refuses columns the file lacks
        handle = pq.ParquetFile(path, read_dictionary=text, metadata=handle.metadata)
    meta = handle.metadata
    present = [c for c in columns if c in set(handle.schema_arrow.names)]
    offset = sum(meta.row_group(i).num_rows for i in range(start))
    group: list[int] = []
    rows = 0
    for i in range(start, stop):
        group.append(i)
        rows += meta.row_group(i).num_rows
        if rows >= chunk_rows or i == stop - 1:
            table = handle.read_row_groups(group, columns=present)
            yield Chunk(_with_partitions(table, partitions), offset,
                        [*schema.names, *partitions])
            offset += table.num_rows
            group, rows = [], 0


def read_csv_chunks(path: Path, text_columns: Sequence[str], partitions: dict[str, str],
                    chunk_rows: int, delimiter: str = ",") -> Iterator[Chunk]:
    """A CSV file streamed in blocks, regrouped into chunks of about ``chunk_rows``.

    ``text_columns`` (segment keys and model inputs) are read as strings: scoring
    validates and converts them row by row, so one bad value rejects one row instead of
    failing the whole file half-way. Other columns (the id column) keep inferred types.
    """
    convert = pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns},
                                   strings_can_be_null=True)
    reader = pacsv.open_csv(path, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES),
                            parse_options=pacsv.ParseOptions(delimiter=delimiter),
                            convert_options=convert)
    offset = 0
    pending: list[pa.RecordBatch] = []
    rows = 0
    for batch in reader:
        pending.append(batch)
        rows += batch.num_rows
        if rows >= chunk_rows:
            table = pa.Table.from_batches(pending)
            yield Chunk(_with_partitions(table, partitions), offset)
            offset += rows
            pending, rows = [], 0
    if pending:
        yield Chunk(_with_partitions(pa.Table.from_batches(pending), partitions), offset)


def read_chunks(path: Path, fmt: str, start: int, stop: int, columns: Sequence[str],
                text_columns: Sequence[str], partitions: dict[str, str],
                chunk_rows: int, dictionary_columns: Sequence[str] = (), delimiter: str = ","
                ) -> Iterator[Chunk]:
    """The rows of one piece in chunks of about ``chunk_rows`` (bounded memory).

    Parquet reads only ``columns`` (text ``dictionary_columns`` as dictionaries); CSV
    reads every column, ``text_columns`` as strings.
    """
    if fmt == "parquet":
        return read_parquet_chunks(path, start, stop, columns, partitions, chunk_rows,
                                   dictionary_columns)
    return read_csv_chunks(path, text_columns, partitions, chunk_rows, delimiter)


def _writer_options(table: pa.Table) -> dict[str, object]:
    """Parquet encodings chosen per column for speed at equal or smaller size.

    Dictionary encoding only for dictionary columns (model names, file names, reasons):
    trying it on float predictions or row numbers costs time and is abandoned anyway.
    Row numbers are delta-encoded (ascending: a few bits per row). Statistics only on
    plain numeric columns: on a dictionary column Arrow compares the strings of every
    row, which cost more than writing the rest of the file.
    """
    dictionary = [f.name for f in table.schema if pa.types.is_dictionary(f.type)]
    plain = [f.name for f in table.schema if not pa.types.is_dictionary(f.type)]
    encoding = {f.name: "PLAIN" for f in table.schema
                if pa.types.is_floating(f.type) or pa.types.is_boolean(f.type)}
    if "row_number" in table.column_names:
        encoding["row_number"] = "DELTA_BINARY_PACKED"
    return {"use_dictionary": dictionary, "write_statistics": plain,
            "column_encoding": encoding}


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` cast to the schema of the part being written, refusing a lossy cast.

    A part's prediction column is float32 when its first chunk's models all compute in
    float32; a later chunk routed to a float64 model must not be rounded silently.
    """
    cast = table.cast(schema)
    for name in table.column_names:
        before, after = table.schema.field(name).type, schema.field(name).type
        if pa.types.is_float64(before) and pa.types.is_float32(after):
            wide = numpy_of(table[name].combine_chunks().fill_null(0.0))
            if not np.array_equal(wide.astype(np.float32).astype(np.float64), wide,
                                  equal_nan=True):
                raise ValueError(f"column '{name}' holds float64 values that float32 would "
                                 f"round; score this input with a smaller --mini-batch-size")
    return cast


class PartWriter:
    """Write one Parquet part chunk by chunk, fsynced on close (opened lazily)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self._writer: pq.ParquetWriter | None = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, table.schema, **_writer_options(table))
        elif table.schema != self._writer.schema:
            table = _conform(table, self._writer.schema)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> Path | None:
        """Finish the file and make it durable; ``None`` when nothing was written."""
        if self._writer is None:
            return None
        self._writer.close()
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return self.path

    def abort(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - the file is discarded anyway
                pass
        self.path.unlink(missing_ok=True)
