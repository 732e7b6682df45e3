"""Route rows to models by segment key and score them: the one scoring code path.

The MLflow flavor, the Azure ML ``score.py``, the server and batch scoring all go
through :class:`Bundle`. Rows are grouped by the model that serves them and each group
goes through one vectorised ``session.run`` call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd

from .errors import BundleError, DataError, InputSchemaError, ModelNotFound, SegmentNotFound
from .manifest import Manifest, normalise_key_value, read_manifest
from .session import LoadedModel, SessionCache, load_model, make_session_options

__all__ = ["Bundle", "Routed", "ScoreResult"]


@dataclass
class Routed:
    """Where each row goes: a model name per row (None = rejected) and a fallback flag."""

    groups: dict[str, np.ndarray]  # model name -> row positions
    model: np.ndarray  # object array of model names (None where rejected)
    fallback: np.ndarray  # bool
    rejected: dict[int, str]  # row position -> reason
    #: Per row, the position of its model in :attr:`model_names` (-1 where rejected): lets
    #: batch scoring write a dictionary-encoded model column without touching the names.
    model_index: np.ndarray | None = None
    model_names: list[str] | None = None


@dataclass
class ScoreResult:
    """Predictions in input row order, with the model used and whether it was a fallback."""

    prediction: np.ndarray
    model: np.ndarray
    fallback: np.ndarray
    probabilities: np.ndarray | None = None
    classes: Sequence[Any] | None = None

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame({"prediction": self.prediction, "model": self.model,
                              "fallback": self.fallback})
        if self.probabilities is not None and self.classes is not None:
            for i, label in enumerate(self.classes):
                frame[f"proba_{label}"] = self.probabilities[:, i]
        return frame


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class Bundle:
    """A run or bundle directory opened for scoring.

    Parameters
    ----------
    root
        Directory holding ``manifest.json`` and ``models/*.onnx``.
    max_bytes
        Budget of the session cache in estimated resident bytes (``None``: unbounded).
    optimisation
        onnxruntime graph optimisation level: ``none``, ``basic`` or ``all``.
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None,
                 optimisation: str = "basic") -> None:
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self._options = make_session_options(optimisation)
        self.cache = SessionCache(self._load, max_bytes=max_bytes)
        self._route_memo: dict[tuple[str, ...], tuple[str | None, bool]] = {}

    # -- models ---------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.manifest.models)

    @property
    def segment_columns(self) -> list[str]:
        return self.manifest.segment_columns

    def fallback_models(self) -> list[str]:
        """Models of the coarser levels (pools and global): the ones worth pinning."""
        return [n for n, e in self.manifest.models.items() if e.level > 0]

    def _load(self, name: str) -> LoadedModel:
        entry = self.manifest.models[name]
        path = self.root / entry.file
        if not path.is_file():
            raise BundleError(
                f"model file {entry.file} of model '{name}' is missing in {self.root}")
        return load_model(entry, path, self._options)

    def model(self, name: str) -> LoadedModel:
        """The loaded model called ``name`` (loaded on first use)."""
        if name not in self.manifest.models:
            raise ModelNotFound(name, known=len(self.manifest.models))
        return self.cache.get(name)

    # -- routing --------------------------------------------------------------------------
    def resolve_key(self, values: Sequence[Any]) -> tuple[str | None, bool]:
        """Model for one segment key given as values in segment-column order."""
        norm = tuple(normalise_key_value(v) for v in values)
        hit = self._route_memo.get(norm)
        if hit is None:
            hit = self.manifest.resolve(dict(zip(self.segment_columns, norm, strict=True)))
            if len(self._route_memo) < 1_000_000:
                self._route_memo[norm] = hit
        return hit

    def _check_segment_columns(self, columns: Sequence[str]) -> None:
        missing = [c for c in self.segment_columns if c not in set(columns)]
        if missing:
            raise InputSchemaError(
                f"rows lack the segment column(s) {', '.join(missing)} needed to pick a model "
                f"(segment columns: {', '.join(self.segment_columns)}); "
                f"or name the model explicitly"
            )

    def route_frame(self, frame: pd.DataFrame) -> Routed:
        """Group the rows of ``frame`` by the model that serves them (fallback chain)."""
        self._check_segment_columns(list(frame.columns))
        return self.route_columns({c: frame[c] for c in self.segment_columns}, len(frame))

    def route_columns(self, keys: Mapping[str, Any], n: int) -> Routed:
        """Group ``n`` rows by model, given their segment columns as arrays or Series.

        Vectorised: each segment column is factorised once, the codes are combined into
        one code per distinct segment key, only the distinct keys walk the fallback chain,
        and rows are grouped with one stable sort on small integer model codes. Row order
        inside each group is ascending, as callers expect.
        """
        self._check_segment_columns(list(keys))
        if n == 0:
            return Routed({}, np.full(0, None, dtype=object), np.zeros(0, dtype=bool), {},
                          np.full(0, -1, dtype=np.int32), [])
        cols = self.segment_columns
        if not cols:
            name, _ = self.manifest.resolve({})
            if name is None:
                raise SegmentNotFound({})
            return Routed({name: np.arange(n)}, np.full(n, name, dtype=object),
                          np.zeros(n, dtype=bool), {}, np.zeros(n, dtype=np.int32), [name])
        combo, key_values = _factorise_keys([keys[c] for c in cols], n)
        names: list[str] = []
        positions: dict[str, int] = {}
        combo_model = np.full(len(key_values), -1, dtype=np.int32)
        combo_fallback = np.zeros(len(key_values), dtype=bool)
        combo_reason: dict[int, str] = {}
        for k, values in enumerate(key_values):
            nulls = [c for c, v in zip(cols, values, strict=True) if _is_null(v)]
            if nulls:
                combo_reason[k] = "null segment key in " + ", ".join(nulls)
                continue
            name, used_fallback = self.resolve_key(values)
            if name is None:
                combo_reason[k] = str(SegmentNotFound(dict(zip(cols, values, strict=True))))
                continue
            if name not in positions:
                positions[name] = len(names)
                names.append(name)
            combo_model[k] = positions[name]
            combo_fallback[k] = used_fallback
        index = combo_model[combo]
        fallback = combo_fallback[combo]
        model = np.array([*names, None], dtype=object)[index]
        rejected: dict[int, str] = {}
        if combo_reason:
            bad = np.flatnonzero(index < 0)
            reasons = [combo_reason[int(k)] for k in combo[bad]]
            rejected = dict(zip(bad.tolist(), reasons, strict=True))
        return Routed(_group_rows(index, names), model, fallback, rejected, index, names)

    # -- scoring --------------------------------------------------------------------------
    def _empty_prediction(self, n: int) -> np.ndarray:
        return (np.full(n, None, dtype=object) if self.manifest.task == "classification"
                else np.full(n, np.nan))

    def score_frame(self, frame: pd.DataFrame, strict: bool = True) -> ScoreResult:
        """Score every row of ``frame`` with the model its segment key routes to.

        With ``strict`` a row that cannot be routed (null key, no fallback) raises
        :class:`DataError`; otherwise its prediction is left empty (NaN / None).
        """
        routed = self.route_frame(frame)
        if strict and routed.rejected:
            row, reason = next(iter(routed.rejected.items()))
            raise DataError(f"{len(routed.rejected)} row(s) cannot be scored; row {row}: {reason}")
        return self.score_routed(frame, routed)

    def score_routed(self, frame: pd.DataFrame | Mapping[str, Any], routed: Routed) -> ScoreResult:
        """Score pre-routed rows; ``frame`` may be a DataFrame or a mapping of column arrays.

        Each input column that many rows need is gathered once into model order, so every
        group is a contiguous slice (no copy) fed to one ``session.run``; columns only a
        few groups need (e.g. the fallback's categorical inputs) are taken per group.
        """
        n = len(routed.model)
        prediction = self._empty_prediction(n)
        probabilities: np.ndarray | None = None
        classes: Sequence[Any] | None = None
        if not routed.groups:
            return ScoreResult(prediction, routed.model, routed.fallback, None, None)
        parts = list(routed.groups.values())
        order = parts[0] if len(parts) == 1 else np.concatenate(parts)
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
        gathered = self._gather_plan(routed.groups, frame, len(order))
        sorted_columns: dict[str, np.ndarray] = {}
        raw: dict[str, np.ndarray] = {}
        labels_sorted: np.ndarray | None = None
        proba_sorted: np.ndarray | None = None
        for i, (name, rows) in enumerate(routed.groups.items()):
            loaded = self.model(name)
            start, stop = int(bounds[i]), int(bounds[i + 1])
            columns: dict[str, Any] = {}
            for column in loaded.input_names:
                if column not in frame:
                    loaded.check_columns(list(frame.keys()))
                if column not in raw:
                    raw[column] = np.asarray(frame[column])
                if column in gathered:
                    if column not in sorted_columns:
                        sorted_columns[column] = raw[column][order]
                    columns[column] = sorted_columns[column][start:stop]
                else:
                    columns[column] = raw[column][rows]
            labels, proba = loaded.predict_columns(columns)
            if labels_sorted is None:
                labels_sorted = self._empty_prediction(len(order))
            labels_sorted[start:stop] = labels
            if proba is not None:
                if proba_sorted is None:
                    classes = loaded.entry.classes
                    proba_sorted = np.full((len(order), proba.shape[1]), np.nan)
                proba_sorted[start:stop] = proba
        if labels_sorted is not None:
            prediction[order] = labels_sorted
        if proba_sorted is not None:
            probabilities = np.full((n, proba_sorted.shape[1]), np.nan)
            probabilities[order] = proba_sorted
        return ScoreResult(prediction, routed.model, routed.fallback, probabilities, classes)

    def _gather_plan(self, groups: Mapping[str, np.ndarray], frame: Any, total: int) -> set[str]:
        """Columns worth gathering whole into model order: needed by most routed rows."""
        need: dict[str, int] = {}
        for name, rows in groups.items():
            entry = self.manifest.models.get(name)
            if entry is None:
                raise ModelNotFound(name, known=len(self.manifest.models))
            for column in entry.input_names:
                need[column] = need.get(column, 0) + len(rows)
        return {c for c, k in need.items() if k * 4 >= total and c in frame}

    def score_model(self, name: str, columns: Mapping[str, Any] | pd.DataFrame) -> ScoreResult:
        """Score rows with the model called ``name`` (no routing)."""
        loaded = self.model(name)
        loaded.check_columns(list(columns.keys()))
        labels, proba = loaded.predict_columns(cast(Mapping[str, Any], columns))
        n = len(labels)
        return ScoreResult(labels, np.full(n, name, dtype=object), np.zeros(n, dtype=bool), proba,
                           loaded.entry.classes)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Route and score a DataFrame; returns prediction, model and fallback per row."""
        return self.score_frame(frame).to_frame().set_axis(frame.index)


def _is_null(value: Any) -> bool:
    return value is None or bool(pd.isna(value))


def _factorise_keys(columns: Sequence[Any], n: int) -> tuple[np.ndarray, list[tuple[Any, ...]]]:
    """One code per row for its segment key, and the key values of each code.

    Nulls get their own code (they are rejected later, with a reason naming the column).
    When the product of the per-column cardinalities is small (the usual case: stores ×
    brands), codes are combined arithmetically and compacted with one ``bincount``;
    otherwise column by column with a re-factorisation, so they never overflow.
    """
    per_column: list[tuple[np.ndarray, Any]] = []
    for values in columns:
        codes, uniques = pd.factorize(values, use_na_sentinel=False)
        per_column.append((np.asarray(codes, dtype=np.int64), uniques))
    radices = [max(len(u), 1) for _, u in per_column]
    space = int(np.prod(radices, dtype=np.float64))
    if space <= max(4 * n, 1 << 16) and space <= 1 << 24:
        combo = np.zeros(n, dtype=np.int64)
        for (codes, _), radix in zip(per_column, radices, strict=True):
            combo = combo * radix + codes
        present = np.flatnonzero(np.bincount(combo, minlength=space))
        remap = np.full(space, -1, dtype=np.int64)
        remap[present] = np.arange(len(present))
        digits: list[np.ndarray] = []
        rest = present.copy()
        for radix in reversed(radices):
            digits.append(rest % radix)
            rest //= radix
        digits.reverse()
        picked = [(d, u) for d, (_, u) in zip(digits, per_column, strict=True)]
        combo = remap[combo]
    else:
        combo = per_column[0][0]
        for codes, uniques in per_column[1:]:
            combo = np.asarray(pd.factorize(combo * len(uniques) + codes)[0], dtype=np.int64)
        k = int(combo.max()) + 1
        first = np.empty(k, dtype=np.int64)
        first[combo[::-1]] = np.arange(n - 1, -1, -1)  # last write wins: first occurrence
        picked = [(codes[first], uniques) for codes, uniques in per_column]
    k = len(picked[0][0])
    key_values = [tuple(u[int(c[j])] for c, u in picked) for j in range(k)]
    return combo, key_values


def _group_rows(index: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Row positions per model from one stable sort of the (small integer) model codes."""
    if not names:
        return {}
    small = index.astype(np.int16) if len(names) < 32_000 else index
    order = np.argsort(small, kind="stable")
    counts = np.bincount(index + 1, minlength=len(names) + 1)
    bounds = np.cumsum(counts)
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(names)}
