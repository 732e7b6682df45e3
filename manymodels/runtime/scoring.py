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
from typing import Any

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
            raise BundleError(f"model file {entry.file} of model '{name}' is missing in {self.root}")
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
        n = len(frame)
        model = np.full(n, None, dtype=object)
        fallback = np.zeros(n, dtype=bool)
        rejected: dict[int, str] = {}
        groups: dict[str, list[np.ndarray]] = {}
        if n == 0:
            return Routed({}, model, fallback, rejected)
        cols = self.segment_columns
        if not cols:
            name, _ = self.manifest.resolve({})
            if name is None:
                raise SegmentNotFound({})
            model[:] = name
            return Routed({name: np.arange(n)}, model, fallback, rejected)
        indices = frame.groupby(cols if len(cols) > 1 else cols[0], sort=False,
                                dropna=False).indices
        for key, rows in indices.items():
            values = key if isinstance(key, tuple) else (key,)
            if any(pd.isna(v) for v in values):
                reason = "null segment key in " + ", ".join(
                    c for c, v in zip(cols, values, strict=True) if pd.isna(v))
                for r in rows:
                    rejected[int(r)] = reason
                continue
            name, used_fallback = self.resolve_key(values)
            if name is None:
                reason = str(SegmentNotFound(dict(zip(cols, values, strict=True))))
                for r in rows:
                    rejected[int(r)] = reason
                continue
            model[rows] = name
            fallback[rows] = used_fallback
            groups.setdefault(name, []).append(rows)
        merged = {k: (v[0] if len(v) == 1 else np.sort(np.concatenate(v))) for k, v in groups.items()}
        return Routed(merged, model, fallback, rejected)

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
        """Score pre-routed rows; ``frame`` may be a DataFrame or a mapping of column arrays."""
        n = len(routed.model)
        prediction = self._empty_prediction(n)
        probabilities: np.ndarray | None = None
        classes: Sequence[Any] | None = None
        arrays: dict[str, np.ndarray] = {}
        for name, rows in routed.groups.items():
            loaded = self.model(name)
            for column in loaded.input_names:
                if column not in arrays:
                    if column not in frame:
                        loaded.check_columns(list(frame.keys()))
                    arrays[column] = np.asarray(frame[column])
            columns = {c: arrays[c][rows] for c in loaded.input_names}
            labels, proba = loaded.predict_columns(columns)
            prediction[rows] = labels
            if proba is not None:
                if probabilities is None:
                    classes = loaded.entry.classes
                    probabilities = np.full((n, proba.shape[1]), np.nan)
                probabilities[rows] = proba
        return ScoreResult(prediction, routed.model, routed.fallback, probabilities, classes)

    def score_model(self, name: str, columns: Mapping[str, Any]) -> ScoreResult:
        """Score rows with the model called ``name`` (no routing)."""
        loaded = self.model(name)
        loaded.check_columns(list(columns.keys()))
        labels, proba = loaded.predict_columns(columns)
        n = len(labels)
        return ScoreResult(labels, np.full(n, name, dtype=object), np.zeros(n, dtype=bool), proba,
                           loaded.entry.classes)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Route and score a DataFrame; returns prediction, model and fallback per row."""
        return self.score_frame(frame).to_frame().set_axis(frame.index)
