"""Forecasts over HTTP: ``POST /forecast``, and future rows on ``/score`` and ``/invocations``.

A forecasting bundle's models take lag features that the runtime builds from each
series' stored tail, so its rows do not go through routing and one session run per group
(:mod:`.dataplane`): they go, like the bodies of ``/forecast``, to the runtime's
:mod:`~manymodels.runtime.forecast_request` functions, the ones ``score.py``, the MLflow
pyfunc and batch call. What these raise (``InputSchemaError`` and the input contract's
refusals: 422 with the reason code; ``SegmentNotFound``: 404; a bundle that does not
forecast: 422) is rendered by the one error table of :mod:`.errors`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import pandas as pd

from manymodels.keys import parse_segment_key
from manymodels.runtime.forecast_request import (
    forecast_for_keys,
    forecast_future_rows,
    forecast_records,
    forecast_request_table,
    parse_forecast_request,
)
from manymodels.runtime.forecaster import Forecaster

from .dataplane import Prediction, Table
from .errors import MalformedBody
from .registry import ModelRegistry

__all__ = ["forecast_keys_reply", "forecast_reply", "forecast_table", "is_forecasting"]

T = TypeVar("T")

#: Per registry, the cache's eviction count when every model was last seen resident.
_RESIDENT: weakref.WeakKeyDictionary[ModelRegistry, int] = weakref.WeakKeyDictionary()


def _all_resident(registry: ModelRegistry) -> bool:
    """Every model of the bundle is loaded (so a forecast cannot stall on a load)."""
    cache = registry.cache
    evictions = cache.evictions
    if _RESIDENT.get(registry) == evictions:
        return True
    if len(cache) >= len(registry.bundle.manifest.models):
        _RESIDENT[registry] = evictions
        return True
    return False


async def _call(registry: ModelRegistry, rows: int, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` on the event loop when it is small and needs no model load (a
    thread hop costs more than a short forecast), else in the registry's thread pool."""
    if rows <= registry.inline_rows and _all_resident(registry):
        return func(*args)
    return await registry.run_in_thread(func, *args)  # type: ignore[no-any-return]


def _forecaster(registry: ModelRegistry) -> Forecaster:
    """The bundle's Forecaster (a ``DataError``, 422, for a bundle that does not forecast)."""
    return registry.bundle.forecaster


async def forecast_table(registry: ModelRegistry, table: Table
                         ) -> tuple[Prediction, list[str], list[bool]]:
    """Forecasts of rows naming future periods, with the method of each and no fallback
    flag: what ``/score`` and ``/invocations`` answer for a forecasting bundle."""
    started = time.perf_counter_ns()
    forecaster = _forecaster(registry)
    frame = pd.DataFrame(table.columns)
    done = await _call(registry, table.n, forecast_future_rows, forecaster, frame)
    ns = time.perf_counter_ns() - started
    telemetry = registry.telemetry
    methods = done.methods
    for method, count in zip(*np.unique(np.asarray(methods, dtype=object).astype(str),
                                         return_counts=True), strict=True):
        telemetry.scored(str(method), int(count), ns)
    fallback = [m == "fallback" for m in methods]
    telemetry.log(table.columns, table.n, done.values, methods, fallback)
    return Prediction(done.values, bands=done.bands), methods, fallback


async def forecast_reply(registry: ModelRegistry, body: Any) -> dict[str, Any]:
    """The ``/forecast`` response: one record per series and step (segment columns, the
    time column, ``forecast``, the interval bounds, ``method``)."""
    if not isinstance(body, dict):
        raise MalformedBody("the body must be a JSON object with 'horizon' and 'keys' or "
                            "'segment' (and optionally 'future' and 'history')")
    segment = body.get("segment")
    if isinstance(segment, str):
        try:
            body = {**body, "segment": parse_segment_key(segment)}
        except ValueError as exc:
            raise MalformedBody(str(exc)) from None
    forecaster = _forecaster(registry)
    request = parse_forecast_request(body)
    series = len(request.keys) if request.keys is not None else len(forecaster.keys)
    rows = series * (request.horizon or forecaster.horizon)
    started = time.perf_counter_ns()
    table = await _call(registry, rows, forecast_request_table, forecaster, request)
    ns = time.perf_counter_ns() - started
    for method, count in table.method_counts().items():
        registry.telemetry.scored(method, count, ns)
    return {"forecasts": forecast_records(table, forecaster.time_column)}


async def forecast_keys_reply(registry: ModelRegistry, table: Table, horizon: Any
                              ) -> dict[str, Any]:
    """``/invocations`` with ``params: {"horizon": H}``: the next ``H`` periods of the
    series the rows name, as the MLflow pyfunc answers them (one record per series and
    step, under ``predictions``)."""
    forecaster = _forecaster(registry)
    frame = pd.DataFrame(table.columns)
    series = len(frame) or len(forecaster.keys)
    rows = series * (horizon if isinstance(horizon, int) else 1)
    started = time.perf_counter_ns()
    done = await _call(registry, rows, forecast_for_keys, forecaster, frame, horizon)
    ns = time.perf_counter_ns() - started
    for method, count in done.method_counts().items():
        registry.telemetry.scored(method, count, ns)
    return {"predictions": forecast_records(done, forecaster.time_column)}


def is_forecasting(registry: ModelRegistry) -> bool:
    """The registry serves a ``task: forecast`` bundle."""
    return registry.task == "forecast"
