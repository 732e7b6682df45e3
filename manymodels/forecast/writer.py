"""The model files of a forecasting run: each chosen lag model refitted on every period
and each chosen statistical model, written as ONNX into the run's staging directory and
checked against its native forecast over the whole horizon, with its manifest entry.
"""

from __future__ import annotations

import functools
import hashlib
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from manymodels.errors import ExportError
from manymodels.export import ExportedModel, export_linear, export_model
from manymodels.forecast.features import RowsAtCut, SeriesScale, TrainingRows
from manymodels.forecast.learners import (
    LagMethod,
    OwnLinear,
    fit_pipeline,
    forecast_with,
    native_predict,
    own_linear_predict,
    solve_own_linear,
)
from manymodels.forecast.methods import groups_of
from manymodels.forecast.panel import Panel
from manymodels.forecast.stats import FittedStat
from manymodels.io import atomic_write_bytes
from manymodels.runtime.forecast import FeatureSpec, Predict, onnx_steps
from manymodels.runtime.manifest import ModelEntry, _parse_model
from manymodels.runtime.session import load_model, make_session_options
from manymodels.specs import SegmenterSpec, TrainerSpec, spec_hash

__all__ = ["ModelWriter", "Unexportable", "model_name"]


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "_", text)


def model_name(target: str, method: LagMethod, key: Sequence[str], key_columns: Sequence[str]
               ) -> str:
    """A lag model's file and manifest name: target, level key (or ``global``), candidate."""
    algo = _safe(method.candidate.label)
    if not method.columns:
        return f"{target}__global__{algo}"
    cols = key_columns if method.own else method.columns
    return f"{target}__" + "__".join(f"{c}={_safe(v)}" for c, v in zip(cols, key, strict=True)) \
        + f"__{algo}"


class Unexportable(Exception):
    """A method failed to export, for some series or (``None``) for all: its series
    choose again. ``reasons`` maps each series to why."""

    def __init__(self, label: str, reasons: Mapping[int | None, str]) -> None:
        super().__init__(next(iter(reasons.values()), ""))
        self.label, self.reasons = label, dict(reasons)


class ModelWriter:
    """Writes a run's chosen models into ``staging/models`` and keeps their manifest
    entries (:attr:`models`, by name); the lag models are refitted on every period."""

    def __init__(self, panel: Panel, spec: FeatureSpec, trainer: TrainerSpec,
                 segmenter: SegmenterSpec, staging: Path, run_id: str) -> None:
        self.panel, self.spec, self.trainer, self.segmenter = panel, spec, trainer, segmenter
        self.staging, self.run_id = staging, run_id
        self.cut = np.asarray([len(y) for y in panel.y])
        self._shared = RowsAtCut(panel, spec, range(len(panel)), self.cut,
                                 int(trainer.horizon or 1))
        self.scales: SeriesScale = self._shared.scales
        self.models: dict[str, dict[str, Any]] = {}
        #: Seconds spent building rows and fitting the lag models, apart from their export.
        self.fit_seconds = 0.0

    def lag(self, method: LagMethod, series: list[int], threads: int = 1) -> dict[int, str]:
        """Fit and export ``method`` for the series using it; their model names
        (``threads``: for a pooled or global fit, see :func:`fit_pipeline`).

        Raises
        ------
        ExportError
            The method cannot be exported for any series (a pooled or global model).
        Unexportable
            One series' own model cannot: that series chooses again, the others keep it.
        """
        spec = method.features(self.spec)
        if method.own:
            return self._own(method, spec, series)
        out: dict[int, str] = {}
        groups = groups_of(self.panel, method, range(len(self.panel)))
        wanted = set(series)
        for key, group in groups.items():
            if not method.columns or wanted.intersection(group):
                name = self._pooled(method, spec, group, key, threads)
                out.update({i: name for i in group})
        return out

    def _own(self, method: LagMethod, spec: FeatureSpec, series: list[int]) -> dict[int, str]:
        """Each series' own model: the closed form its backtests scored, written as its
        graph directly. One native recursion forecasts every closed form over the
        horizon first; each file is then written, checked on its rows and run through the
        recursion step by step on the same session (one per file), and the first also as
        one run (:meth:`OnnxSteps.recursion`): the files differ only in their numbers, so
        the one-run graph built around one of them is the one built around all."""
        out: dict[int, str] = {}
        failed: dict[int | None, str] = {}
        solved: list[tuple[int, str, TrainingRows, OwnLinear]] = []
        for i in series:
            name = model_name(self.trainer.target, method, self.panel.key_texts[i],
                              self.panel.key_columns)
            out[i] = name
            if name in self.models:
                continue
            started = time.perf_counter()
            try:
                rows = self._rows(spec, [i], name)
                solved.append((i, name, rows, solve_own_linear(rows, method.candidate, spec)))
            except ExportError as exc:
                failed[i] = str(exc)
                out.pop(i)
                continue
            finally:
                self.fit_seconds += time.perf_counter() - started
        sample, cut = self._parity_sample(spec, [i for i, *_ in solved], limit=None)
        at = {i: r for r, i in enumerate(sample)}
        native = forecast_with(own_linear_predict([f.folded() for i, *_, f in solved if i in at],
                                                  spec),
                               self.panel, spec, sample, cut, self.scales,
                               self._h) if sample else np.empty((0, self._h))
        whole = True  # the first file checked also runs the recursion as one graph
        for i, name, rows, fit in solved:
            # written, checked on its rows, then over the horizon on the same session
            try:
                exported = export_linear(
                    fit.mean, fit.scale, fit.coef, fit.intercept, name=name,
                    numeric=spec.numeric_names(), check_frame=check_columns(rows),
                    metadata=self._metadata(method), tolerance=self.trainer.parity_tolerance,
                    path=self._path(name), sync=False)
                entry = self._entry(method, name, exported, rows, [i], self.panel.key_texts[i])
                worst = 0.0
                if i in at:
                    loaded = load_model(_parse_model(name, entry), self._path(name),
                                        make_session_options(), exported.session)
                    onnx = forecast_with(onnx_steps(loaded, whole=whole), self.panel,
                                         spec, [i], cut, self.scales, self._h)
                    worst = self._parity_gap(native[at[i]][None], onnx, [i], name)
                    whole = False
            except ExportError as exc:
                failed[i] = str(exc)
                out.pop(i)
                continue
            entry["metrics"]["horizon_parity_max_abs_diff"] = worst
            self.models[name] = entry
        if failed:  # those series choose again; the others keep their models
            raise Unexportable(method.label, failed)
        return out

    @property
    def _h(self) -> int:
        return int(self.trainer.horizon or 1)

    def _path(self, name: str) -> Path:
        return self.staging / "models" / f"{name}.onnx"

    def _rows(self, spec: FeatureSpec, group: list[int], name: str) -> TrainingRows:
        rows = self._shared.rows(group, spec)
        if len(rows.target) < len(spec.numeric_names()) + 2:
            raise ExportError(f"model '{name}': too few periods to fit its lag features")
        return rows

    def _metadata(self, method: LagMethod) -> dict[str, str]:
        return {"manymodels_run_id": self.run_id, "method": method.label, **self._hashes}

    @functools.cached_property
    def _hashes(self) -> dict[str, str]:
        """The specs' hashes every model file is stamped with (the same for all)."""
        return {"trainer_hash": spec_hash(self.trainer),
                "segmenter_hash": spec_hash(self.segmenter)}

    def _pooled(self, method: LagMethod, spec: FeatureSpec, group: list[int],
                key: Sequence[str], threads: int = 1) -> str:
        """A pooled or global model: fitted on its group's rows, converted, checked over
        the horizon on up to 64 of its series."""
        name = model_name(self.trainer.target, method, key, self.panel.key_columns)
        if name in self.models:
            return name
        started = time.perf_counter()
        rows = self._rows(spec, group, name)
        categorical = [c for c in self.panel.key_columns if c in spec.static]
        pipeline = fit_pipeline(rows, method.candidate, spec, self.trainer.seed, threads)
        self.fit_seconds += time.perf_counter() - started
        exported = export_model(
            pipeline, name=name, numeric=spec.numeric_names(), categorical=categorical,
            task="regression", check_frame=pd.DataFrame(check_columns(rows)),
            tolerance=self.trainer.parity_tolerance, path=self._path(name),
            metadata=self._metadata(method), sync=False)
        entry = self._entry(method, name, exported, rows, group, key)
        entry["metrics"]["horizon_parity_max_abs_diff"] = self._horizon_parity(
            native_predict(pipeline), self._path(name), _parse_model(name, entry), spec, group,
            name)
        self.models[name] = entry
        return name

    def _entry(self, method: LagMethod, name: str, exported: ExportedModel, rows: TrainingRows,
               group: list[int], key: Sequence[str]) -> dict[str, Any]:
        """A lag model's manifest entry (its horizon parity is added once checked)."""
        level_key = dict(zip(self.panel.key_columns if method.own else method.columns, key,
                             strict=True))
        return {
            "file": f"models/{name}.onnx", "sha256": exported.sha256, "bytes": exported.bytes,
            "level": method.level, "key": level_key, "algorithm": method.candidate.algorithm,
            "candidate": method.candidate.label, "inputs": exported.inputs,
            "output": exported.output, "rows": int(len(rows.target)),
            "metrics": {"parity_max_abs_diff": exported.parity},
            "forecast": {"method": method.label, "series": len(group)},
            "tags": {"algorithm": method.candidate.algorithm, "method": method.label,
                     "level": str(method.level), **{f"key.{k}": v for k, v in level_key.items()}},
        }

    def stat(self, method: str, i: int, fitted: FittedStat | None) -> str:
        """Write series ``i``'s ``method``, estimated on every period, as its graph."""
        key = self.panel.key_texts[i]
        name = (f"{self.trainer.target}__"
                + "__".join(f"{c}={_safe(v)}" for c, v in zip(self.panel.key_columns, key,
                                                              strict=True)) + f"__{method}")
        y = self.panel.y[i]
        if fitted is None:
            raise ExportError(f"{method} could not be fitted to series {key}")
        data = fitted.to_onnx()
        path = self.staging / "models" / f"{name}.onnx"
        atomic_write_bytes(path, data, sync=False)  # the staging directory is flushed whole
        h = int(self.trainer.horizon or 1)
        entry: dict[str, Any] = {
            "file": f"models/{name}.onnx", "sha256": hashlib.sha256(data).hexdigest(),
            "bytes": len(data), "level": 0,
            "key": dict(zip(self.panel.key_columns, key, strict=True)),
            "algorithm": method, "candidate": method,
            "inputs": [{"name": "step", "dtype": "int64"}], "output": {"kind": "regression"},
            "rows": len(y), "metrics": {},
            "forecast": {"method": method, "form": fitted.fitted_form,
                         "fallback": fitted.fallback, "series": 1},
            "tags": {"algorithm": method, "method": method, "level": "0",
                     **{f"key.{c}": v for c, v in zip(self.panel.key_columns, key, strict=True)}},
        }
        loaded = load_model(_parse_model(name, entry), path, make_session_options())
        steps = np.arange(1, h + 1, dtype=np.int64)
        served = np.asarray(loaded.outputs({"step": steps})[0], dtype=np.float64).ravel()
        worst = float(np.max(np.abs(served - fitted.forecast(h)))) / max(1.0, float(np.std(y)))
        if not np.isfinite(worst) or worst > self.trainer.parity_tolerance:
            raise ExportError(f"model '{name}': its ONNX graph and statsforecast differ by "
                              f"{worst:.3g} over {h} steps")
        entry["metrics"]["horizon_parity_max_abs_diff"] = worst
        self.models[name] = entry
        return name

    def _horizon_parity(self, native_model: Predict, path: Path, entry: ModelEntry,
                        spec: FeatureSpec, group: list[int], name: str) -> float:
        """Native and ONNX recursions over the whole horizon, on up to 64 of the series."""
        sample, cut = self._parity_sample(spec, group)
        if not sample:
            return 0.0
        loaded = load_model(entry, path, make_session_options())
        native = forecast_with(native_model, self.panel, spec, sample, cut, self.scales,
                               self._h)
        onnx = forecast_with(onnx_steps(loaded), self.panel, spec, sample, cut, self.scales,
                             self._h)
        return self._parity_gap(native, onnx, sample, name)

    def _parity_sample(self, spec: FeatureSpec, group: list[int], limit: int | None = 64
                       ) -> tuple[list[int], np.ndarray]:
        """The series of ``group`` long enough for a horizon check, and the cutoffs it
        forecasts from (known-future covariates exist only in the past: h periods back)."""
        need = spec.window + spec.differences
        cut = self.cut - self._h if spec.known_future else self.cut
        sample = [i for i in group if len(self.panel.y[i]) >= need and cut[i] >= need]
        return sample[:limit], cut

    def _parity_gap(self, native: np.ndarray, onnx: np.ndarray, sample: list[int], name: str
                    ) -> float:
        """The largest native-ONNX gap relative to each series' spread, within
        ``parity_tolerance``."""
        spread = np.asarray([max(1.0, float(np.std(self.panel.y[i]))) for i in sample])
        diff = np.abs(native - onnx) / spread[:, None]
        worst = float(np.nanmax(diff)) if diff.size else 0.0
        if not np.isfinite(worst) or worst > self.trainer.parity_tolerance:
            raise ExportError(f"model '{name}': ONNX and native forecasts differ by {worst:.3g} "
                              f"(relative to the series' spread) over {self._h} steps, over "
                              f"parity_tolerance={self.trainer.parity_tolerance}")
        return worst


def check_columns(rows: TrainingRows) -> dict[str, np.ndarray]:
    """The training rows an export checks its graph on: the latest 256, by column."""
    last = min(len(rows.target), 256)
    return {n: v[len(v) - last:] for n, v in rows.columns.items()}
