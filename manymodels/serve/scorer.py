"""The scorer of one deployment: a parsed request body in, the reply's payload out.

:class:`Scorer` holds the two ways to address a model (by name, or routed by segment
key) and the reply of every scoring route, so the FastAPI routes, the raw-ASGI fast lane
and the mirror's replays all answer through the same functions.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from functools import partial
from typing import Any

from .dataplane import Prediction, Table, parse_table, route_rows, score_groups, score_model
from .errors import MalformedBody
from .forecasting import forecast_keys_reply, forecast_reply, forecast_table, is_forecasting
from .keyed import fill_segment_key, key_of_scope
from .paths import (
    FORECAST,
    MODEL_SCORE,
    SCORE,
    SEGMENT_SCORE,
    V2_INFER,
    V2_INFER_VERSION,
    split_infer_path,
    split_model_score_path,
)
from .registry import ModelRegistry, ServedModel
from .v2 import infer_reply

__all__ = ["ReplyFunction", "Scorer", "models_for"]

SCORE_FIELDS = ("data", "dataframe_split", "dataframe_records")
INVOCATION_FIELDS = ("dataframe_split", "dataframe_records", "instances")
#: A route's reply to a parsed body.
ReplyFunction = Callable[[Any], Awaitable[dict[str, Any]]]


async def models_for(registry: ModelRegistry, names: Iterable[str]) -> dict[str, ServedModel]:
    """The served models ``names``: hits at once, misses loaded in parallel off the loop."""
    out: dict[str, ServedModel] = {}
    misses = []
    for name in names:
        hit = registry.cached(name)
        if hit is None:
            misses.append(name)
        else:
            out[name] = hit
    if misses:
        loaded = await asyncio.gather(*(registry.get(n) for n in misses))
        out.update(zip(misses, loaded, strict=True))
    return out


class Scorer:
    """The two ways to address a model, shared by ``/score`` and ``/invocations``."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.inline_rows = registry.inline_rows

    async def named(self, name: Any, table: Table) -> Prediction:
        if not isinstance(name, str):
            raise MalformedBody(f"'model' must be a model name (a string), not {name!r}")
        started = time.perf_counter_ns()
        registry = self.registry
        try:
            served = await registry.get(name)
            if table.n > self.inline_rows:
                prediction: Prediction = await registry.run_in_thread(
                    score_model, registry, served, table)
            else:
                prediction = score_model(registry, served, table)
        except Exception:
            registry.telemetry.named_failed(name, registry.knows(name), started)
            raise
        registry.telemetry.named(name, table.columns, table.n, prediction.prediction, started)
        return prediction

    async def routed(self, table: Table) -> tuple[Prediction, list[str], list[bool]]:
        registry = self.registry
        if is_forecasting(registry):  # rows name future periods: their forecasts
            return await forecast_table(registry, table)
        started = time.perf_counter_ns()
        routing = route_rows(registry, table)
        models = await models_for(registry, routing.needed())
        if table.n > self.inline_rows:
            prediction = await registry.run_in_thread(score_groups, registry, models, routing,
                                                      table)
        else:
            prediction = score_groups(registry, models, routing, table)
        ns = time.perf_counter_ns() - started
        telemetry = registry.telemetry
        fallback = routing.fallback
        any_fallback = any(fallback)
        for name, rows in routing.groups.items():
            fell_back = sum(fallback[r] for r in rows) if any_fallback else 0
            telemetry.scored(name, len(rows), ns, fell_back, models[name].loaded.entry.level)
        telemetry.log(table.columns, table.n, prediction.prediction, routing.model, fallback)
        if routing.blends:  # the answer names a blended row's blend, not one member
            answer = registry.bundle.manifest.answer_name
            return prediction, [answer(n) for n in routing.model], fallback
        return prediction, routing.model, fallback

    async def score_reply(self, body: Any) -> dict[str, Any]:
        """The ``/score`` response for a parsed body."""
        if not isinstance(body, dict):
            raise MalformedBody("the body must be a JSON object with 'data' or "
                                "'dataframe_split' (and optionally 'model')")
        table = parse_table(body, SCORE_FIELDS)
        name = body.get("model")
        if name is not None:
            prediction = await self.named(name, table)
            payload = {"model": name, "predictions": prediction.prediction}
        else:
            prediction, models, fallback = await self.routed(table)
            payload = {"predictions": prediction.prediction, "model": models,
                       "fallback": fallback}
        return _with_classes(payload, prediction)

    async def model_reply(self, name: str, body: Any) -> dict[str, Any]:
        """The ``/models/{name}/score`` response: ``/score`` with the model in the path."""
        if not isinstance(body, dict):
            raise MalformedBody("the body must be a JSON object with 'data' or "
                                "'dataframe_split'")
        if body.get("model") not in (None, name):
            raise MalformedBody(f"the body names model {body['model']!r}, the path {name!r}")
        return await self.score_reply({**body, "model": name})

    async def segment_reply(self, key: str | None, body: Any) -> dict[str, Any]:
        """The ``/segments/score`` response: ``/score`` routed for one segment key."""
        if not isinstance(body, dict):
            raise MalformedBody("the body must be a JSON object with 'data' or "
                                "'dataframe_split'")
        if body.get("model") is not None:
            raise MalformedBody("/segments/score routes by the segment key; to name the "
                                "model use /models/{name}/score")
        table = fill_segment_key(parse_table(body, SCORE_FIELDS), self.registry.segment_columns,
                                 key)
        prediction, models, fallback = await self.routed(table)
        return _with_classes({"predictions": prediction.prediction, "model": models,
                              "fallback": fallback}, prediction)

    async def forecast_reply(self, body: Any) -> dict[str, Any]:
        """The ``/forecast`` response for a parsed body."""
        return await forecast_reply(self.registry, body)

    async def invocations_reply(self, body: Any, table: Table | None = None,
                                name: Any = None) -> dict[str, Any]:
        """The ``/invocations`` (MLflow) response for a parsed JSON body, or for a
        ``table`` read from CSV (``name`` then comes from the ``model`` query parameter)."""
        if table is None:
            if not isinstance(body, dict):
                raise MalformedBody("the body must be a JSON object with 'dataframe_split' "
                                    "or 'dataframe_records'")
            table = parse_table(body, INVOCATION_FIELDS)
            params = body.get("params") or {}
            name = params.get("model") if isinstance(params, dict) else None
            horizon = params.get("horizon") if isinstance(params, dict) else None
            if horizon and is_forecasting(self.registry):  # as the MLflow pyfunc's param
                return await forecast_keys_reply(self.registry, table, horizon)
        if name is not None:
            prediction = await self.named(name, table)
            models, fallback = [name] * table.n, [False] * table.n
        else:
            prediction, models, fallback = await self.routed(table)
        values = prediction.prediction.tolist()
        if not prediction.bands:
            return {"predictions": [{"prediction": p, "model": m, "fallback": f}
                                    for p, m, f in zip(values, models, fallback, strict=True)]}
        bands = {band: bound.tolist() for band, bound in prediction.bands.items()}
        return {"predictions": [{"prediction": p, **{b: v[i] for b, v in bands.items()},
                                 "model": m, "fallback": f}
                                for i, (p, m, f) in enumerate(zip(values, models, fallback,
                                                                  strict=True))]}

    def reply_for(self, scope: Any) -> tuple[ReplyFunction, str] | None:
        """The reply function and the route template of a fast-lane ``POST`` route
        (``None``: FastAPI routes the request). The mirror asks it too, so a shadow
        answers a copied body through the same function as the live deployment."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        if path == SCORE:
            return self.score_reply, SCORE
        target = split_infer_path(path)
        if target is not None:
            return (partial(infer_reply, self.registry, target[0], target[1]),
                    V2_INFER if target[1] is None else V2_INFER_VERSION)
        name = split_model_score_path(path)
        if name is not None:
            return partial(self.model_reply, name), MODEL_SCORE
        if path == SEGMENT_SCORE:
            return partial(self.segment_reply, key_of_scope(scope)), SEGMENT_SCORE
        if path == FORECAST:
            return self.forecast_reply, FORECAST
        return None


def _with_classes(payload: dict[str, Any], prediction: Prediction) -> dict[str, Any]:
    """``payload`` with the class probabilities, or a forecast's interval bounds."""
    for band, bound in (prediction.bands or {}).items():
        payload[band] = bound
    if prediction.probabilities is not None:
        payload["probabilities"] = prediction.probabilities
        payload["classes"] = list(prediction.classes or [])
    return payload
