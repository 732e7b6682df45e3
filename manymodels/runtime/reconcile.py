"""Coherent levels when forecasting: the linear map training fitted, applied to point forecasts.

A forecasting bundle trained with ``forecast.hierarchy`` holds, besides its segments (the
*bottom* series), aggregate series: sums of the segments sharing the values of a coarser
level's columns. An aggregate's key holds :data:`AGGREGATE` in the columns it sums over
(``store=7, brand=*``). With ``forecast.reconcile`` the bundle also holds the map ``P``
from every series' base forecast to the bottom series' reconciled forecasts, and each
series' reconciled forecast is the sum of the reconciled bottom series it holds
(``S · P · base``), so every level adds up by construction. Bottom-up needs no ``P``: the
bottom series keep their base forecasts.

:meth:`Hierarchy.inputs` says which series' base forecasts a request needs besides the
ones asked for, :meth:`Hierarchy.apply` turns base forecasts into reconciled ones; the
:class:`~.forecaster.Forecaster` calls both around its recursion. numpy only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import DataError

__all__ = ["AGGREGATE", "RECONCILE_METHODS", "Hierarchy"]

#: Key value of an aggregate series in the columns it sums over.
AGGREGATE = "*"
#: ``forecast.reconcile`` values; ``none`` forecasts each level on its own.
RECONCILE_METHODS = ("none", "bottom_up", "mint_shrink")


@dataclass(frozen=True)
class Hierarchy:
    """The levels of a forecasting bundle and its reconciliation map."""

    #: Segment columns first, then each coarser level's columns.
    levels: tuple[tuple[str, ...], ...]
    #: ``none``, ``bottom_up`` or ``mint_shrink``.
    method: str
    #: Series index (in the bundle's series order) of each bottom position.
    bottom: np.ndarray
    #: For each series, the bottom positions it sums (a bottom series: itself).
    members: tuple[np.ndarray, ...]
    #: (bottom, series) map from base forecasts to reconciled bottom forecasts;
    #: ``None`` for bottom-up and ``none``.
    P: np.ndarray | None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], n_series: int) -> Hierarchy:
        """Read the manifest's ``forecast.hierarchy`` section, checking its shapes."""
        method = str(raw.get("reconcile", "none"))
        if method not in RECONCILE_METHODS:
            raise DataError(f"forecast.hierarchy.reconcile is {method!r}; this runtime knows "
                            f"{', '.join(RECONCILE_METHODS)}")
        bottom = np.asarray(raw["bottom"], dtype=np.int64)
        members = tuple(np.asarray(m, dtype=np.int64) for m in raw["members"])
        matrix = raw.get("P")
        P = None if matrix is None else np.asarray(matrix, dtype=np.float64)
        if len(members) != n_series or (P is not None and P.shape != (len(bottom), n_series)):
            raise DataError("forecast.hierarchy does not match the bundle's series: the "
                            "manifest was edited or written by another version; retrain")
        if method == "mint_shrink" and P is None:
            raise DataError("forecast.hierarchy: mint_shrink without its map P; retrain")
        levels = tuple(tuple(str(c) for c in level) for level in raw["levels"])
        return cls(levels, method, bottom, members, P)

    def inputs(self, rows: Sequence[int]) -> list[int]:
        """Series (other than ``rows``) whose base forecasts the reconciled forecasts of
        ``rows`` need; negative rows (series the bundle does not hold) need none."""
        if self.method == "none":
            return []
        known = [r for r in rows if r >= 0]
        if not known:
            return []
        wanted = np.unique(np.concatenate([self.members[r] for r in known]))
        if self.P is None:
            needed = self.bottom[wanted]
        else:
            needed = np.flatnonzero(np.any(self.P[wanted] != 0.0, axis=0))
        have = set(rows)
        return [int(i) for i in needed if int(i) not in have]

    def apply(self, rows: Sequence[int], values: np.ndarray) -> np.ndarray:
        """Reconciled forecasts of ``rows`` from their base forecasts ``values`` (rows ×
        steps); ``rows`` holds every series :meth:`inputs` named."""
        if self.method == "none":
            return values
        where = {r: k for k, r in enumerate(rows) if r >= 0}
        if not where:
            return values
        wanted = np.unique(np.concatenate([self.members[r] for r in where]))
        if self.P is None:
            bottom = values[[where[int(i)] for i in self.bottom[wanted]]]
        else:
            columns = np.flatnonzero(np.any(self.P[wanted] != 0.0, axis=0))
            base = values[[where[int(i)] for i in columns]]
            bottom = self.P[np.ix_(wanted, columns)] @ base
        position = np.full(len(self.bottom), -1, dtype=np.int64)
        position[wanted] = np.arange(len(wanted))
        out = values.copy()
        for r, k in where.items():
            out[k] = bottom[position[self.members[r]]].sum(axis=0)
        return out
