"""Routing rows to models by segment key: the codes of each key, the model of each row
down the fallback chain, and the rows a key refuses (null, or not a value).

:class:`~.scoring.Bundle` routes through these functions; they work on integer codes
per segment column, so a batch of a million rows routes without a Python object per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import contract
from .errors import SegmentNotFound

__all__ = ["Routed", "combine_codes", "group_rows", "key_refusal", "model_names_of",
           "refusal_error", "without_rows"]


@dataclass
class Routed:
    """Where each row goes: a model name per row (None = rejected) and a fallback flag."""

    groups: dict[str, np.ndarray]  # model name -> row positions
    #: Object array of model names (None where rejected); ``None`` when the router was
    #: asked not to build it (batch scoring uses :attr:`model_index` instead).
    model: np.ndarray | None
    fallback: np.ndarray  # bool
    rejected: dict[int, tuple[str, str]]  # row position -> (reason code, message)
    #: Per row, the position of its model in :attr:`model_names` (-1 where rejected): lets
    #: batch scoring write a dictionary-encoded model column without touching the names.
    model_index: np.ndarray | None = None
    model_names: list[str] | None = None


def key_refusal(columns: Sequence[str], values: Sequence[Any]) -> tuple[str, str] | None:
    """(reason code, message) when a segment key cannot route (null or not a value)."""
    problems = [(c, p) for c, v in zip(columns, values, strict=True)
                if (p := contract.key_problem(v)) is not None]
    if not problems:
        return None
    code = problems[0][1]
    named = ", ".join(c for c, p in problems if p == code)
    if code == contract.NULL_SEGMENT_KEY:
        return code, f"null segment key in {named}; every row needs a segment key"
    return code, f"segment column(s) {named} must hold a string or a number"


def refusal_error(code: str, message: str, row: int | None = None) -> Exception:
    """The exception an online path raises for a row refused by routing."""
    text = message if row is None else f"row {row}: {message}"
    if code == contract.SEGMENT_NOT_FOUND:
        return SegmentNotFound({}, message=text)
    return contract.InputRefused(code, text, row)


def without_rows(routed: Routed, refusals: Sequence[contract.Refusal]) -> Routed:
    """``routed`` with the refused rows taken out of their groups (left unscored)."""
    refused = np.zeros(len(routed.fallback), dtype=bool)
    for refusal in refusals:
        refused[refusal.rows] = True
    groups = {name: rows[~refused[rows]] for name, rows in routed.groups.items()}
    return Routed({n: r for n, r in groups.items() if len(r)}, routed.model, routed.fallback,
                  routed.rejected, routed.model_index, routed.model_names)


def model_names_of(routed: Routed) -> np.ndarray:
    """The per-row model names of ``routed``, built from its codes when it has none."""
    if routed.model is not None:
        return routed.model
    names = [*(routed.model_names or []), None]
    index = routed.model_index if routed.model_index is not None else \
        np.full(len(routed.fallback), -1)
    return np.array(names, dtype=object)[index]


def combine_codes(codes: Sequence[np.ndarray], uniques: Sequence[Sequence[Any]], n: int
                   ) -> tuple[np.ndarray, dict[int, tuple[Any, ...]], int]:
    """One code per row for its segment key, the key values of each code present, and
    the size of the code space (for lookup tables indexed by code).

    Code ``-1`` (null) becomes its own digit, whose value is ``None`` (rejected later,
    with a reason naming the column). When the product of the per-column cardinalities
    is small (the usual case: stores × brands) the digits are combined arithmetically
    and the combined code indexes lookup tables directly; otherwise the combination is
    compacted column by column with ``np.unique``, so it never overflows.
    """
    radices = [len(u) + 1 for u in uniques]  # + 1: the null digit
    digits = [np.where(c < 0, len(u), c) if c.size and c.min() < 0 else c
              for c, u in zip(codes, uniques, strict=True)]
    space = int(np.prod(radices, dtype=np.float64))
    if space <= max(4 * n, 1 << 16) and space <= 1 << 24:
        combo = digits[0].astype(np.int64, copy=len(digits) > 1)
        for d, radix in zip(digits[1:], radices[1:], strict=True):
            combo *= radix
            combo += d
        present = np.flatnonzero(np.bincount(combo, minlength=space))
        rest = present.copy()
        picked: list[np.ndarray] = []
        for radix in reversed(radices):
            picked.append(rest % radix)
            rest //= radix
        picked.reverse()
        values = [[*u, None] for u in uniques]
        keys = {int(k): tuple(values[i][int(p[j])] for i, p in enumerate(picked))
                for j, k in enumerate(present)}
        return combo, keys, space
    combo = digits[0].astype(np.int64)
    for d, radix in zip(digits[1:], radices[1:], strict=True):
        _, combo = np.unique(combo * radix + d, return_inverse=True)
        combo = combo.astype(np.int64).ravel()
    k = int(combo.max()) + 1
    first = np.empty(k, dtype=np.int64)
    first[combo[::-1]] = np.arange(n - 1, -1, -1)  # last write wins: first occurrence
    values = [[*u, None] for u in uniques]
    keys = {j: tuple(values[i][int(d[first[j]])] for i, d in enumerate(digits))
            for j in range(k)}
    return combo, keys, k


def group_rows(index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Row positions per model from one stable sort of the (small integer) model codes."""
    if not names:
        return {}
    small = index.astype(np.int16) if len(names) < 32_000 else index
    order = np.argsort(small, kind="stable")
    counts = np.bincount(index + 1, minlength=len(names) + 1)
    bounds = np.cumsum(counts)
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
