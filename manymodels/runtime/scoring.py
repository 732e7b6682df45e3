"""Route rows to models by segment key and score them: the one scoring code path.

The MLflow flavor, the Azure ML ``score.py``, the server and batch scoring all go
through :class:`Bundle`. Rows are grouped by the model that serves them and each group
goes through one vectorised ``session.run`` call.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:  # pandas is imported where it is used: batch scoring never needs it
    import pandas as pd

    from .forecaster import Forecaster

from . import contract
from .errors import BundleError, ModelNotFound, SegmentNotFound
from .manifest import Manifest, normalise_key_value, read_manifest
from .routing import (
    Routed,
    combine_codes,
    group_rows,
    key_refusal,
    model_names_of,
    refusal_error,
    without_rows,
)
from .session import LoadedModel, SessionCache, load_model, make_session_options

__all__ = ["Bundle", "GroupLayout", "GroupRun", "Routed", "ScoreResult", "blend_outputs",
           "with_partners"]


@dataclass
class GroupLayout:
    """Routed rows laid out one model after another (:meth:`Bundle.layout`).

    ``order`` lists the rows model by model, model ``i`` owning ``bounds[i]:bounds[i+1]``;
    ``gathered`` are the input columns worth gathering whole into that order, and
    ``sorted_columns`` holds those already gathered (float32 ``(n, 1)``): batch scoring
    fills it on another thread, :meth:`Bundle.run_groups` fills the rest.
    """

    order: np.ndarray
    bounds: list[int]
    gathered: set[str]
    sorted_columns: dict[str, np.ndarray]


@dataclass
class GroupRun:
    """Outputs of :meth:`Bundle.run_groups` in model order: row ``order[i]`` got
    ``labels[i]`` (and ``probabilities[i]``)."""

    order: np.ndarray
    labels: np.ndarray | None
    probabilities: np.ndarray | None
    classes: Sequence[Any] | None


@dataclass
class ScoreResult:
    """Predictions in input row order, with the model used and whether it was a fallback."""

    prediction: np.ndarray
    model: np.ndarray
    fallback: np.ndarray
    probabilities: np.ndarray | None = None
    classes: Sequence[Any] | None = None
    #: A forecasting bundle's interval bounds per row (``lo_80``, ``hi_80``, ...).
    bands: Mapping[str, np.ndarray] | None = None

    def to_frame(self) -> pd.DataFrame:
        # pandas only on DataFrame paths: batch scoring never imports it
        import pandas as pd

        frame = pd.DataFrame({"prediction": _typed_labels(self.prediction),
                              **(self.bands or {}),
                              "model": self.model, "fallback": self.fallback})
        if self.probabilities is not None and self.classes is not None:
            for i, label in enumerate(self.classes):
                frame[f"proba_{label}"] = self.probabilities[:, i]
        return frame


def _typed_labels(prediction: np.ndarray) -> np.ndarray:
    """Class labels held as objects, as integers (or booleans) when every one is: a
    classifier trained on 0/1 answers 0/1, not Python objects."""
    if prediction.dtype != object or not len(prediction):
        return prediction
    values = prediction.tolist()
    kinds = {type(v) for v in values}
    if kinds and all(issubclass(k, int | np.integer) and not issubclass(k, bool | np.bool_)
                     for k in kinds):
        return np.asarray(values, dtype=np.int64)
    if kinds <= {bool, np.bool_}:
        return np.asarray(values, dtype=bool)
    return prediction


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
    strict_columns
        Refuse rows carrying columns that no model takes (default: ignore them, as
        MLflow's scoring server does); ``None`` reads ``MANYMODELS_STRICT_COLUMNS``.
    """

    def __init__(self, root: str | Path, max_bytes: int | None = None,
                 optimisation: str = "basic", strict_columns: bool | None = None) -> None:
        self.root = Path(root)
        if strict_columns is None:
            strict_columns = os.environ.get("MANYMODELS_STRICT_COLUMNS", "").lower() in (
                "1", "true", "yes", "on")
        self.strict_columns = strict_columns
        self._root_text = os.fspath(self.root)
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

    @property
    def allowed_columns(self) -> frozenset[str]:
        """Columns a routed row may carry under ``strict_columns``: segment columns and
        every model's inputs."""
        return frozenset(self.segment_columns).union(
            *(e.input_names for e in self.manifest.models.values()))

    def fallback_models(self) -> list[str]:
        """Models of the coarser levels (pools and global): the ones worth pinning."""
        return [n for n, e in self.manifest.models.items() if e.level > 0]

    def _load(self, name: str) -> LoadedModel:
        entry = self.manifest.models[name]
        path = os.path.join(self._root_text, entry.file)  # not pathlib: 1,000s of loads
        if not os.path.isfile(path):
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
        contract.require_segment_columns(columns, self.segment_columns,
                                         "name the model explicitly")

    def route_frame(self, frame: pd.DataFrame) -> Routed:
        """Group the rows of ``frame`` by the model that serves them (fallback chain)."""
        self._check_segment_columns(list(frame.columns))
        return self.route_columns({c: frame[c] for c in self.segment_columns}, len(frame))

    def route_columns(self, keys: Mapping[str, Any], n: int) -> Routed:
        """Group ``n`` rows by model, given their segment columns as arrays or Series.

        Each segment column is factorised once (nulls get code -1) and the codes go to
        :meth:`route_codes`. Row order inside each group is ascending, as callers expect.
        """
        self._check_segment_columns(list(keys))
        codes: list[np.ndarray] = []
        uniques: list[Sequence[Any]] = []
        if n:
            # pandas only on DataFrame paths: batch scoring never imports it
            import pandas as pd

            for column in self.segment_columns:
                code, unique = pd.factorize(keys[column], use_na_sentinel=True)
                codes.append(np.asarray(code, dtype=np.int64))
                uniques.append(list(unique))
        return self.route_codes(codes, uniques, n)

    def route_codes(self, codes: Sequence[np.ndarray], uniques: Sequence[Sequence[Any]],
                    n: int, with_names: bool = True) -> Routed:
        """Group ``n`` rows by model, given one integer code per row and segment column.

        ``codes[i][r]`` indexes ``uniques[i]`` (``-1`` = null) for segment column ``i``.
        Vectorised: the per-column codes are combined into one code per segment key,
        only the distinct keys present walk the fallback chain (memoised across calls),
        a lookup table maps every row to its model in one gather, and rows are grouped
        with one stable sort of small integer model codes. ``with_names=False`` skips
        the per-row object array of model names (:attr:`Routed.model`).
        """
        if n == 0:
            return Routed({}, np.full(0, None, dtype=object), np.zeros(0, dtype=bool), {},
                          np.full(0, -1, dtype=np.int32), [])
        cols = self.segment_columns
        if not cols:
            name, _ = self.manifest.resolve({})
            if name is None:
                raise SegmentNotFound({})
            model = np.full(n, name, dtype=object) if with_names else None
            return Routed({name: np.arange(n)}, model, np.zeros(n, dtype=bool), {},
                          np.zeros(n, dtype=np.int32), [name])
        combo, key_values, size = combine_codes(codes, uniques, n)
        names: list[str] = []
        positions: dict[str, int] = {}
        combo_model = np.full(size, -1, dtype=np.int32)
        combo_fallback = np.zeros(size, dtype=bool)
        combo_reason: dict[int, tuple[str, str]] = {}
        for k, values in key_values.items():
            problem = key_refusal(cols, values)
            if problem is not None:
                combo_reason[k] = problem
                continue
            name, used_fallback = self.resolve_key(values)
            if name is None:
                combo_reason[k] = (contract.SEGMENT_NOT_FOUND, str(SegmentNotFound(
                    dict(zip(cols, values, strict=True)))))
                continue
            if name not in positions:
                positions[name] = len(names)
                names.append(name)
            combo_model[k] = positions[name]
            combo_fallback[k] = used_fallback
        index = combo_model[combo]
        fallback = combo_fallback[combo]
        model = np.array([*names, None], dtype=object)[index] if with_names else None
        rejected: dict[int, tuple[str, str]] = {}
        if combo_reason:
            bad = np.flatnonzero(index < 0)
            reasons = [combo_reason[int(k)] for k in combo[bad]]
            rejected = dict(zip(bad.tolist(), reasons, strict=True))
        return Routed(group_rows(index, names), model, fallback, rejected, index, names)

    # -- scoring --------------------------------------------------------------------------
    def _labels_buffer(self, models: Sequence[LoadedModel], n: int) -> np.ndarray:
        """Room for ``n`` predictions in model order, every slot written by a group: float32
        when every model computes float32 (regression), else what :meth:`empty_prediction`
        gives."""
        if self.manifest.task == "classification" or not models:
            return self.empty_prediction(n)
        if all(m.float32_output for m in models):
            return np.empty(n, dtype=np.float32)
        return np.empty(n, dtype=np.float64)

    def models(self, names: Sequence[str]) -> list[LoadedModel]:
        """The loaded models called ``names`` (loading those not resident), in order."""
        for name in names:
            if name not in self.manifest.models:
                raise ModelNotFound(name, known=len(self.manifest.models))
        return self.cache.get_many(names)

    def empty_prediction(self, n: int) -> np.ndarray:
        return (np.full(n, None, dtype=object) if self.manifest.task == "classification"
                else np.full(n, np.nan))

    # -- forecasting ----------------------------------------------------------------------
    @property
    def forecaster(self) -> Forecaster:
        """The forecasting side of a ``task: forecast`` bundle (built on first use)."""
        found = self.__dict__.get("_forecaster")
        if found is None:
            from .forecaster import Forecaster  # imports pandas, which batch scoring avoids

            found = self.__dict__["_forecaster"] = Forecaster(self.manifest, self.model)
        return found

    def forecast(self, h: int | None = None, keys: Any = None, future: pd.DataFrame | None = None,
                 history: pd.DataFrame | None = None) -> pd.DataFrame:
        """The next ``h`` periods (default: the trained horizon) of every series, or of
        ``keys``: one row per series and step with the key columns, the time column,
        ``forecast`` and the ``method`` that made it. ``future`` supplies known-future
        covariates; ``history`` fresher values, which override the stored tails."""
        return self.forecaster.forecast(h, keys, future, history)

    def score_frame(self, frame: pd.DataFrame, strict: bool = True) -> ScoreResult:
        """Score every row of ``frame`` with the model its segment key routes to.

        Rows are checked by the input contract (:mod:`.contract`). With ``strict`` the
        first refused row raises :class:`~.contract.InputRefused` (or
        :class:`SegmentNotFound`) with its reason code; otherwise refused rows are left
        empty (NaN / None) and the others scored.
        """
        if self.manifest.task == "forecast":
            return self._forecast_rows(frame, strict)
        routed = self.route_frame(frame)
        if strict and routed.rejected:
            row = min(routed.rejected)
            raise refusal_error(*routed.rejected[row], row)
        checked = self.check_routed(frame, routed, len(frame))
        if checked.refusals:
            if strict:
                raise checked.first_error()
            routed = without_rows(routed, checked.refusals)
        result = self.score_routed(checked.columns, routed)
        bad = contract.check_predictions(result.prediction, result.probabilities)
        if bad is not None:
            if strict:
                raise contract.non_finite_refusal(bad, str(result.model[bad[0]])).error()
            result.prediction[bad] = None if result.prediction.dtype == object else np.nan
        return result

    def _forecast_rows(self, frame: pd.DataFrame, strict: bool = True) -> ScoreResult:
        """Rows naming future periods of a forecasting bundle's series: their forecasts
        (refused rows stay NaN unless ``strict``)."""
        from .forecast_request import forecast_future_rows  # pandas: batch scoring avoids it

        done = forecast_future_rows(self.forecaster, frame, strict)
        n = len(done.values)
        return ScoreResult(done.values, np.asarray(done.methods, dtype=object),
                           np.zeros(n, dtype=bool), bands=done.bands)

    def check_routed(self, columns: pd.DataFrame | Mapping[str, Any], routed: Routed,
                     n: int) -> contract.CheckedInputs:
        """The routed rows' model inputs checked by the input contract (row order)."""
        unexpected = contract.extra_columns(columns.keys(), self.allowed_columns) \
            if self.strict_columns else ()
        groups = with_partners(routed.groups, self.manifest.blends)
        return contract.check_inputs(cast(Mapping[str, Any], columns), n, groups,
                                     self.manifest.models,
                                     unexpected, frozenset(self.segment_columns))

    def score_routed(self, frame: pd.DataFrame | Mapping[str, Any], routed: Routed) -> ScoreResult:
        """Score pre-routed rows; ``frame`` may be a DataFrame or a mapping of column arrays."""
        prediction, probabilities, classes = self.score_groups(frame, routed)
        return ScoreResult(prediction, self.answer_models(routed), routed.fallback,
                           probabilities, classes)

    def answer_models(self, routed: Routed) -> np.ndarray:
        """What the answer's ``model`` says per row: the model's name, or for a blended
        route the blend with its members and weights (:meth:`Manifest.answer_name`)."""
        if not self.manifest.blends:
            return model_names_of(routed)
        if routed.model_index is not None and routed.model_names is not None:
            labels = [*self.manifest.answer_names(routed.model_names), None]
            return np.array(labels, dtype=object)[routed.model_index]
        names = model_names_of(routed)
        return np.array(self.manifest.answer_names(names.tolist()), dtype=object)

    def score_groups(self, frame: pd.DataFrame | Mapping[str, Any], routed: Routed
                     ) -> tuple[np.ndarray, np.ndarray | None, Sequence[Any] | None]:
        """Predictions (and class probabilities, classes) of pre-routed rows, in row order.

        What :meth:`score_routed` returns without the per-row model names, which batch
        scoring writes from :attr:`Routed.model_index` instead.
        """
        ran = self.run_groups(frame, routed)
        prediction, probabilities = self.in_row_order(ran, len(routed.fallback))
        return prediction, probabilities, ran.classes

    def in_row_order(self, ran: GroupRun, n: int, keep_float32: bool = False
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """Predictions and class probabilities of ``n`` rows back in row order (rows no
        model scored stay NaN / None). ``keep_float32`` keeps float32 labels as they are
        instead of widening them (what the models computed, half the bytes)."""
        labels = ran.labels
        if keep_float32 and labels is not None and labels.dtype == np.float32:
            prediction = (np.empty(n, dtype=np.float32) if len(ran.order) == n
                          else np.full(n, np.nan, dtype=np.float32))  # every slot written
        else:
            prediction = self.empty_prediction(n)
        if labels is not None:
            prediction[ran.order] = labels
        probabilities = None
        if ran.probabilities is not None:
            probabilities = np.full((n, ran.probabilities.shape[1]), np.nan)
            probabilities[ran.order] = ran.probabilities
        return prediction, probabilities

    def layout(self, groups: Mapping[str, np.ndarray], frame: Any) -> GroupLayout:
        """The rows of ``groups`` one model after another, where each model starts, and
        the columns worth gathering whole into that order."""
        parts = list(groups.values())
        order = parts[0] if len(parts) == 1 else np.concatenate(parts)
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(int).tolist()
        return GroupLayout(order, bounds, self.gather_plan(groups, frame, len(order)), {})

    def run_groups(self, frame: pd.DataFrame | Mapping[str, Any], routed: Routed,
                   layout: GroupLayout | None = None) -> GroupRun:
        """Run every group of pre-routed rows through its model; results in model order.

        Each input column that many rows need is gathered once into model order as a
        contiguous ``(n, 1)`` array (float inputs cast to float32 on the way), so every
        group's feed is a slice of it (no copy) and goes to one ``session.run``; columns
        only a few groups need (e.g. the fallback's categorical inputs) are taken per
        group and converted by the model. ``layout`` (from :meth:`layout`) may come with
        columns already gathered: batch scoring prepares it on another thread.
        """
        if not routed.groups:
            return GroupRun(np.zeros(0, dtype=np.int64), None, None, None)
        layout = layout or self.layout(routed.groups, frame)
        order, bounds, gathered = layout.order, layout.bounds, layout.gathered
        sorted_columns = layout.sorted_columns
        raw: dict[str, np.ndarray] = {}
        proba_sorted: np.ndarray | None = None
        classes: Sequence[Any] | None = None
        models = self.models(list(routed.groups))
        blends = self.manifest.blends
        partners = self._blend_partners(routed.groups) if blends else {}
        labels_sorted = self._labels_buffer([*models, *partners.values()], len(order))

        def feed_of(loaded: LoadedModel, rows: np.ndarray, start: int, stop: int
                    ) -> dict[str, np.ndarray]:
            feed: dict[str, np.ndarray] = {}
            columns: dict[str, Any] = {}
            for column in loaded.input_names:
                ready = sorted_columns.get(column)
                if ready is not None and column not in loaded.string_inputs \
                        and ready.dtype == np.float32:
                    feed[column] = ready[start:stop]  # the usual case: a slice, no copy
                    continue
                if column not in frame:
                    loaded.check_columns(list(frame.keys()))
                if column not in raw:
                    raw[column] = np.asarray(frame[column])
                if column in gathered and column not in loaded.string_inputs:
                    if column not in sorted_columns:
                        sorted_columns[column] = _gather_float32(raw[column], order, column,
                                                                 loaded)
                    feed[column] = sorted_columns[column][start:stop]
                elif column in gathered:
                    if column not in sorted_columns:
                        sorted_columns[column] = raw[column][order]
                    columns[column] = sorted_columns[column][start:stop]
                else:
                    columns[column] = raw[column][rows]
            if columns:
                feed.update(loaded.build_feed({**columns, **feed}))
            return feed

        for i, (name, rows) in enumerate(routed.groups.items()):
            loaded = models[i]
            start, stop = bounds[i], bounds[i + 1]
            feed = feed_of(loaded, rows, start, stop)
            if not loaded.classifier:  # float32 (n, 1) output straight into the float64 slice
                output = loaded.outputs(feed)[0].reshape(-1)
                blend = blends.get(name) if blends else None
                if blend is not None:  # a second run, with the coarser model, then the mix
                    partner = partners[blend.partner]
                    other = partner.outputs(feed_of(partner, rows, start, stop))[0].reshape(-1)
                    output = blend_outputs(output, other, blend.weight)
                labels_sorted[start:stop] = output
                continue
            labels, proba = loaded.run(feed)
            labels_sorted[start:stop] = labels
            if proba is not None:
                if proba_sorted is None:
                    classes = loaded.entry.classes
                    proba_sorted = np.full((len(order), proba.shape[1]), np.nan)
                proba_sorted[start:stop] = proba
        return GroupRun(order, labels_sorted, proba_sorted, classes)

    def _blend_partners(self, groups: Mapping[str, np.ndarray]) -> dict[str, LoadedModel]:
        """The coarser models that blended groups mix in, loaded (by name)."""
        blends = self.manifest.blends
        names = list(dict.fromkeys(blends[g].partner for g in groups if g in blends))
        return dict(zip(names, self.models(names), strict=True)) if names else {}

    def gather_plan(self, groups: Mapping[str, np.ndarray], frame: Any, total: int) -> set[str]:
        """Columns worth gathering whole into model order: needed by most routed rows."""
        need: dict[str, int] = {}
        for name, rows in groups.items():
            if name not in self.manifest.models:
                raise ModelNotFound(name, known=len(self.manifest.models))
            for column in self.manifest.inputs_of(name):
                need[column] = need.get(column, 0) + len(rows)
        return {c for c, k in need.items() if k * 4 >= total and c in frame}

    def score_model(self, name: str, columns: Mapping[str, Any] | pd.DataFrame) -> ScoreResult:
        """Score rows with the model called ``name`` (no routing), checked by the input
        contract: the first refused row raises :class:`~.contract.InputRefused`."""
        loaded = self.model(name)
        n = len(columns) if hasattr(columns, "columns") else \
            len(next(iter(columns.values()), ()))
        unexpected = contract.extra_columns(
            columns.keys(), frozenset(loaded.input_names) | set(self.segment_columns)) \
            if self.strict_columns else ()
        checked = contract.check_inputs(cast(Mapping[str, Any], columns), n, {name: None},
                                        self.manifest.models, unexpected)
        checked.raise_first()
        labels, proba = loaded.predict_columns(checked.columns)
        bad = contract.check_predictions(labels, proba)
        if bad is not None:
            raise contract.non_finite_refusal(bad, name).error()
        n = len(labels)
        return ScoreResult(labels, np.full(n, name, dtype=object), np.zeros(n, dtype=bool), proba,
                           loaded.entry.classes)

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Route and score a DataFrame; returns prediction, model and fallback per row."""
        return self.score_frame(frame).to_frame().set_axis(frame.index)


def with_partners(groups: Mapping[str, np.ndarray | None], blends: Mapping[str, Any]
                  ) -> Mapping[str, np.ndarray | None]:
    """``groups`` (model -> rows, ``None`` = every row) plus each blended group's partner
    on that group's rows: the models whose inputs a request must carry."""
    if not blends or not any(name in blends for name in groups):
        return groups
    out: dict[str, np.ndarray | None] = dict(groups)
    for name, rows in groups.items():
        blend = blends.get(name)
        if blend is None:
            continue
        known = out.get(blend.partner, np.zeros(0, dtype=np.int64))
        out[blend.partner] = None if rows is None or known is None else np.union1d(known, rows)
    return out


def blend_outputs(own: np.ndarray, partner: np.ndarray, weight: float) -> np.ndarray:
    """``weight · own + (1 − weight) · partner``: a blended route's prediction.

    Computed in the models' own precision (float32 for converted regressors), so every
    scoring path that calls this gets the same numbers; weights 0 and 1 give the
    partner's and the own predictions exactly.
    """
    own, partner = np.asarray(own), np.asarray(partner)
    dtype = np.result_type(own.dtype, partner.dtype)
    if dtype.kind != "f":
        dtype = np.dtype(np.float64)
    if weight >= 1.0:
        return own.astype(dtype, copy=True)
    if weight <= 0.0:
        return partner.astype(dtype, copy=True)
    w = dtype.type(weight)
    return own.astype(dtype, copy=False) * w + partner.astype(dtype, copy=False) * (1 - w)


def _gather_float32(values: np.ndarray, order: np.ndarray, column: str,
                    model: LoadedModel) -> np.ndarray:
    """``values[order]`` as a contiguous float32 ``(n, 1)`` array (one pass for float32)."""
    if values.dtype == np.float32:
        out = np.empty((len(order), 1), dtype=np.float32)
        np.take(values, order, out=out[:, 0])
        return out
    if values.dtype.kind in "fiub":
        return np.asarray(values[order], dtype=np.float32).reshape(-1, 1)
    return model.build_feed({column: values[order]})[column]
