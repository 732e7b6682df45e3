"""Segment keys as one line of text: ``store=42,brand=tropicana``.

The form a key takes where a proxy can see it (a query parameter, the
``x-manymodels-key`` header), shared by the server's key-carrying routes, the client
that sends them and the fleet's proxy configuration, so the three cannot drift apart.
Columns keep their order; a column or value holding ``,``, ``=`` or ``%`` (or anything
outside printable ASCII) is percent-encoded, so any key survives a header.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

from manymodels.errors import DataError
from manymodels.runtime.manifest import normalise_key_value

__all__ = ["KEY_HEADER", "format_segment_key", "normalised_keys", "parse_segment_key"]

#: Header that carries a segment key (the ``?key=`` query parameter is the other way).
KEY_HEADER = "x-manymodels-key"


def format_segment_key(key: Mapping[str, Any]) -> str:
    """``{"store": 42, "brand": "tropicana"}`` -> ``"store=42,brand=tropicana"``."""
    return ",".join(f"{urllib.parse.quote(str(column), safe='')}="
                    f"{urllib.parse.quote(normalise_key_value(value), safe='')}"
                    for column, value in key.items())


def parse_segment_key(text: str) -> dict[str, str]:
    """The inverse of :func:`format_segment_key`; ``ValueError`` for anything else."""
    key: dict[str, str] = {}
    for pair in text.split(","):
        column, sep, value = pair.partition("=")
        column = urllib.parse.unquote(column.strip())
        if not sep or not column:
            raise ValueError(f"segment key {text!r} is not column=value pairs joined by ',' "
                             f"(e.g. store=42,brand=tropicana)")
        if column in key:
            raise ValueError(f"segment key {text!r} names {column!r} twice")
        key[column] = urllib.parse.unquote(value.strip())
    return key


def normalised_keys(columns: Sequence[str], keys: Sequence[tuple[Any, ...]]
                    ) -> list[tuple[str, ...]]:
    """Each key's values as the bundle stores them (`normalise_key_value`), refusing two
    keys that differ in the table but read alike (``7`` and ``7.0``): they would share one
    name in the bundle, and one segment would be served the other's model."""
    texts = [tuple(normalise_key_value(v) for v in key) for key in keys]
    if len(set(texts)) == len(texts):
        return texts
    first: dict[tuple[str, ...], tuple[Any, ...]] = {}
    for raw, text in zip(keys, texts, strict=True):
        if text in first:
            both = " and ".join(", ".join(f"{c}={v!r}" for c, v in zip(columns, key, strict=True))
                                for key in (first[text], raw))
            shared = format_segment_key(dict(zip(columns, text, strict=True)))
            raise DataError(f"segments {both} have the same key once read as text "
                            f"({shared}); make their key values distinct")
        first[text] = raw
    return texts
