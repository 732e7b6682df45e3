"""What every request passes: request ids, Prometheus counts, the access log.

:class:`ObserveMiddleware` is a pure ASGI middleware wrapping the whole application as
its outermost layer, so the raw-ASGI fast lane of :class:`~.app.ManyModelsAPI` is
measured and logged exactly like the FastAPI routes (Starlette's ``BaseHTTPMiddleware``
would add a task and a body copy per request). Inner layers (authentication,
deployments) find the request id in ``scope["state"]["request_id"]``; the deployment
that answered is read back from ``scope["state"]["deployment"]``.

Below the routes, the data plane and the registry report through :class:`Telemetry`
(per-model counts, fallbacks, cache events, prediction log), one object per registry
that also knows its deployment. A registry built without one gets a ``Telemetry()``
that keeps only the exact per-model figures.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson

from .metrics import Metrics, ModelStats

if TYPE_CHECKING:
    from .predlog import PredictionLog

__all__ = ["ObserveMiddleware", "RequestRecord", "Telemetries", "Telemetry", "current_request",
           "new_request_id"]

AccessLog = Literal["json", "plain", "off"]
REQUEST_ID = b"x-request-id"
CLIENT_REQUEST_ID = b"x-ms-client-request-id"
#: A caller's request id is echoed only when it is short and harmless in a log line.
_SAFE_ID = re.compile(rb"[A-Za-z0-9._:/+=@-]{1,128}")
access_log = logging.getLogger("manymodels.access")


_ID_PREFIX = os.urandom(8).hex()
_ids = itertools.count(1)


def _reseed_ids() -> None:
    global _ID_PREFIX
    _ID_PREFIX = os.urandom(8).hex()  # a forked worker must not repeat its parent's ids


os.register_at_fork(after_in_child=_reseed_ids)


def new_request_id() -> str:
    """A fresh request id: 32 hex digits, like a UUID without dashes: a random prefix per
    process and a counter (unique without a system call per request)."""
    return f"{_ID_PREFIX}{next(_ids):016x}"


class RequestRecord:
    """What the layers below the middleware tell it about one request."""

    __slots__ = ("request_id", "rows", "models", "first_model")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.rows = 0
        self.models = 0
        self.first_model = ""


_current: ContextVar[RequestRecord | None] = ContextVar("manymodels_request", default=None)


def current_request() -> RequestRecord | None:
    """The record of the request being handled (``None`` outside a request)."""
    return _current.get()


class ObserveMiddleware:
    """Request id in and out, one count and latency per request, an access-log line.

    Parameters
    ----------
    app
        The ASGI application (the whole endpoint, fast lane included).
    metrics
        Where to count requests; ``None`` counts nothing.
    access
        ``json`` (one JSON object per line), ``plain`` (one readable line) or ``off``.
        No header value other than the request id is ever logged.
    logging_rows
        Whether the prediction log is on (then the data plane needs the request id).
    """

    def __init__(self, app: Any, metrics: Metrics | None, access: AccessLog = "off",
                 logging_rows: Callable[[], bool] | None = None) -> None:
        self.app = app
        self.observe = metrics.observe_request if metrics is not None else None
        self.access = access
        self.logging = access != "off"
        self.logging_rows = logging_rows or (lambda: False)
        if self.logging and not access_log.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(logging.Formatter("%(message)s"))
            access_log.addHandler(handler)
            access_log.setLevel(logging.INFO)
            access_log.propagate = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        # Every line here runs on every request: it is written for speed (no helper
        # calls, closure variables rather than a dict).
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = client_id = None
        for key, value in scope["headers"]:
            if key == REQUEST_ID:
                request_id = value
            elif key == CLIENT_REQUEST_ID:
                client_id = value
        given = request_id or client_id
        rid = given.decode() if given and _SAFE_ID.fullmatch(given) else new_request_id()
        state = scope.get("state")
        if state is None:
            scope["state"] = {"request_id": rid}
        else:
            state["request_id"] = rid
        record = token = None
        if self.logging or self.logging_rows():
            record = RequestRecord(rid)
            token = _current.set(record)
        status = 500
        extra = [(b"x-request-id", rid.encode())]
        if client_id is not None and _SAFE_ID.fullmatch(client_id):
            extra.append((CLIENT_REQUEST_ID, client_id))

        async def send_observed(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            seconds = time.perf_counter() - start
            route = getattr(scope.get("route"), "path", "unmatched")
            deployment = scope["state"].get("deployment", "")
            if self.observe is not None:
                self.observe(route, status, deployment, seconds)
            if token is not None:
                _current.reset(token)
                if self.logging:
                    self._log(scope, record, route, status, deployment, seconds)  # type: ignore[arg-type]

    def _log(self, scope: Any, record: RequestRecord, route: str, status: int,
             deployment: str, seconds: float) -> None:
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        if self.access == "json":
            line = orjson.dumps({
                "time": now, "request_id": record.request_id, "deployment": deployment,
                "method": scope["method"], "route": route, "path": scope["path"],
                "status": status, "rows": record.rows, "models": record.models,
                "model": record.first_model or None,
                "latency_ms": round(seconds * 1e3, 3)}).decode()
        else:
            first = f" model={record.first_model}" if record.first_model else ""
            line = (f"{now} {record.request_id} {scope['method']} {scope['path']} {status} "
                    f"rows={record.rows} models={record.models}{first} "
                    f"{seconds * 1e3:.3f}ms" + (f" deployment={deployment}" if deployment
                                                 else ""))
        access_log.info(line)


class Telemetry:
    """The data plane's and the registry's reports, for one registry (one deployment).

    Parameters
    ----------
    metrics
        Prometheus metrics (``None``: none).
    stats
        Exact per-model figures for ``/v2/models/{name}/stats``.
    predictions
        Where sampled rows are logged (``None``: not logged).
    deployment
        Name of the deployment this registry serves (``""`` for a single bundle).
    """

    def __init__(self, metrics: Metrics | None = None, stats: ModelStats | None = None,
                 predictions: PredictionLog | None = None, deployment: str = "") -> None:
        self.metrics = metrics
        self.stats = stats if stats is not None else ModelStats()
        self.deployment = deployment
        self.predictions: PredictionLog | None = None
        self._sample = 0.0
        self.attach_log(predictions)
        self._shared = metrics.shared if metrics is not None else None
        if metrics is not None:
            metrics.watch(deployment, self.stats)
        if self._shared is None:  # bound once: these run on every request
            self.hit = self.stats.count_hit  # type: ignore[method-assign]
            self.miss = self.stats.count_miss  # type: ignore[method-assign]

    def attach_log(self, predictions: PredictionLog | None) -> None:
        """Start (or, with ``None``, stop) handing scored rows to ``predictions``."""
        self.predictions = predictions
        self._sample = predictions.sample if predictions is not None else 0.0

    # -- registry ----------------------------------------------------------------------------
    def hit(self) -> None:
        """A model lookup answered from the cache."""
        self.stats.count_hit()
        if self._shared is not None:
            self._shared.hit()

    def miss(self) -> None:
        """A model lookup that waits for a load."""
        self.stats.count_miss()
        if self._shared is not None:
            self._shared.miss()

    def model_loaded(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.model_loaded(seconds)

    def load_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.load_failures.inc()

    def cache_state(self, models: int, resident: int, budget: int | None,
                    new_evictions: int) -> None:
        if self.metrics is not None:
            self.metrics.cache_state(models, resident, budget, new_evictions)

    # -- data plane --------------------------------------------------------------------------
    def scored(self, name: str, rows: int, ns: int, fallback_rows: int = 0,
               level: int = 0) -> None:
        """``rows`` rows of one request scored by model ``name`` in ``ns`` nanoseconds;
        ``fallback_rows`` of them reached it down the fallback chain (it is at ``level``)."""
        self.stats.success(name, rows, fallback_rows, ns, level)
        if self._shared is not None:
            self._shared.count_model(self.deployment, name, rows, fallback_rows, level, ns)
        record = _current.get()
        if record is not None:
            if not record.models:
                record.first_model = name
            record.models += 1
            record.rows += rows

    def failed(self, name: str, ns: int) -> None:
        """A request naming model ``name`` failed (bad input or a scoring error)."""
        self.stats.failure(name, ns)
        if self._shared is not None:
            self._shared.count_failure(self.deployment, name)

    def named(self, name: str, columns: Mapping[str, Sequence[Any]], n: int, prediction: Any,
              started_ns: int) -> None:
        """A request naming model ``name`` (started at ``started_ns``) was scored."""
        self.scored(name, n, time.perf_counter_ns() - started_ns)
        self.log(columns, n, prediction, name, False)

    def named_failed(self, name: str, known: bool, started_ns: int) -> None:
        """A request naming model ``name`` failed; only models of the bundle are counted."""
        if known:
            self.failed(name, time.perf_counter_ns() - started_ns)

    def log(self, columns: Mapping[str, Sequence[Any]], n: int, prediction: Any,
            model: str | Sequence[str], fallback: bool | Sequence[bool]) -> None:
        """Hand the rows of one scored request to the prediction log (sampled)."""
        log = self.predictions
        if log is None:
            return
        if self._sample < 1.0 and n == 1 and random.random() >= self._sample:
            return
        record = _current.get()
        log.submit(time.time_ns(), record.request_id if record else "", self.deployment,
                   columns, n, prediction, model, fallback)



class Telemetries:
    """Makes each deployment's :class:`Telemetry`: one metrics registry and one
    prediction log for every deployment (rows name theirs). The log is opened when the
    server starts, so deployments added later get it at once."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.log: PredictionLog | None = None

    def __call__(self, deployment: str) -> Telemetry:
        return Telemetry(self.metrics, predictions=self.log, deployment=deployment)
