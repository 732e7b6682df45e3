"""Routes that carry their key outside the body, so a proxy can route by it.

A fleet of replicas behind nginx (``hash $key consistent``) keeps each model resident on
about one replica, but only if the proxy can see which model a request is for without
reading its body. Two routes carry it:

- ``POST /models/{name}/score``: rows scored by the model ``name`` (the key is the path);
- ``POST /segments/score?key=store=42,brand=tropicana`` (or the same key in the header
  ``x-manymodels-key``): rows of one segment, routed down its fallback chain.

Both take the ``/score`` body (``data`` or ``dataframe_split``) and answer what
``/score`` answers, through the same :class:`~.scorer.Scorer` (one data plane). A segment
key is ``column=value`` pairs joined by ``,``, in any order; a value holding ``,``,
``=`` or ``%`` is percent-encoded (:func:`manymodels.keys.format_segment_key` does it). Rows may leave
the segment columns out (the key fills them in); rows that carry them must match the
key, because a row of another segment sent there would load its model on the wrong
replica.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from manymodels.errors import InputSchemaError
from manymodels.keys import KEY_HEADER, parse_segment_key
from manymodels.runtime.manifest import normalise_key_value

from .dataplane import Table
from .errors import MalformedBody

__all__ = ["fill_segment_key", "key_of_scope"]

_KEY_HEADER_BYTES = KEY_HEADER.encode()
_INTEGER = re.compile(r"^-?\d+$")


def key_of_scope(scope: Mapping[str, Any]) -> str | None:
    """The segment key of a request: ``?key=`` first, else the ``x-manymodels-key`` header."""
    query = scope.get("query_string", b"")
    if query:
        for name, value in urllib.parse.parse_qsl(query.decode("latin-1"),
                                                  keep_blank_values=True):
            if name == "key":
                return value
    for name, value in scope.get("headers", ()):
        if name == _KEY_HEADER_BYTES:
            return urllib.parse.unquote(value.decode("latin-1"))
    return None


def _typed(value: str) -> Any:
    """A key value as JSON would have carried it: integers as numbers, the rest as text
    (the bundle's routing normalises both the same way)."""
    return int(value) if _INTEGER.match(value) else value


def fill_segment_key(table: Table, segment_columns: Sequence[str], text: str | None) -> Table:
    """``table`` with the key's segment columns filled in, after checking that the key
    names exactly the segment columns and that rows carrying them agree with it."""
    if text is None:
        raise MalformedBody(f"give the segment key as ?key=column=value,... or in the "
                            f"{KEY_HEADER} header (segment columns: "
                            f"{', '.join(segment_columns)})")
    try:
        key = parse_segment_key(text)
    except ValueError as exc:
        raise MalformedBody(str(exc)) from None
    if set(key) != set(segment_columns):
        raise InputSchemaError(f"segment key {text!r} must name exactly the segment columns "
                               f"{', '.join(segment_columns)}")
    columns = dict(table.columns)
    for column in segment_columns:
        want = key[column]
        values = columns.get(column)
        if values is None:
            columns[column] = [_typed(want)] * table.n
            continue
        for row, value in enumerate(values):
            if value is None or normalise_key_value(value) != want:
                raise InputSchemaError(
                    f"row {row} has {column}={value!r} but the request's segment key says "
                    f"{column}={want}: send each segment's rows with its own key")
    return Table(columns, table.n)
