"""Mirrored (shadow) traffic: copies of live requests answered by a deployment that takes
no live traffic, and the two answers compared per model.

A mirrored request is answered by its live deployment exactly as it would be without
mirroring; only then is a copy (the request body and the live answer, both already in
memory) put on a bounded queue. One task on the event loop replays each copy through
the same app, pinned to the shadow deployment, and compares the answers. A full queue
drops the copy and counts it, and every failure of the shadow is caught and counted, so
a shadow can neither slow a live request beyond the enqueue nor fail one.

For each mirrored request the answers are paired row by row with the model the live
deployment used: per model the rows compared, how many differ, mean and max absolute
difference (regression) or the disagreement rate (class labels), and how many rows the
shadow sent to another model; per deployment the shadow's errors by status, the
latency of both sides and the event-loop time each copy took.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from .endpoint import Deployment, Endpoint
from .errors import render_exception
from .paths import is_mirrored_route

__all__ = ["SCORE_SECONDS", "Canary", "Mirror", "MirrorStats", "ServeOn", "paired_rows",
           "reply_models", "reply_rows"]

#: Answers one ASGI request (scope, receive, send) on a deployment: the app's own
#: ``serve``, which returns the fast lane's parsed body and reply (``None`` otherwise).
ServeOn = Callable[[Any, Any, Any, Deployment], Awaitable[tuple[Any, dict[str, Any]] | None]]

log = logging.getLogger("manymodels.serve")

#: Scope-state key of the seconds the fast lane spent computing a reply (parsing and
#: sending excluded): the live side of a rollout's latency comparison, measured as the
#: replay of the copy is.
SCORE_SECONDS = "manymodels.score_seconds"
#: Latencies kept per side for the percentiles (a sliding window of recent copies).
LATENCY_WINDOW = 4096


class Canary(Protocol):
    """A rollout's own comparisons (:mod:`.rollout`): which answers are copied to which
    deployment, and what to do with both answers. While one is set it decides first."""

    def shadow_for(self, live: Deployment) -> Deployment | None:
        """The deployment a request answered by ``live`` is copied to, if any."""

    def wants(self, path: str, reply: Any) -> bool:
        """Whether a fast-lane ``reply`` (``None``: the request failed) is worth replaying."""

    def watches(self, live: Deployment, shadow: Deployment) -> bool:
        """Whether a copy from ``live`` to ``shadow`` is the canary's."""

    def observe(self, path: str, live: Deployment, live_status: int, live_reply: Any,
                shadow_status: int, shadow_reply: Any, live_seconds: float,
                shadow_seconds: float) -> None:
        """Count one replayed copy (replies are dicts or JSON bytes)."""


def reply_rows(path: str, reply: Any) -> list[tuple[str, Any]]:
    """``(model, value)`` per row of a scoring route's answer (a dict or JSON bytes)."""
    if isinstance(reply, bytes):
        reply = orjson.loads(reply)
    if path == "/invocations":
        return [(p["model"], p["prediction"]) for p in reply["predictions"]]
    if "outputs" in reply:  # V2 inference: the first output holds the predictions (or labels)
        return [(reply["model_name"], v) for v in _plain(reply["outputs"][0]["data"])]
    return _score_rows(reply)


def reply_models(reply: Any) -> list[str]:
    """The models a fast-lane answer (a dict) names, without reading its rows."""
    if "outputs" in reply:
        return [reply["model_name"]]
    models = reply.get("model")
    return [models] if isinstance(models, str) else list(models or ())


def paired_rows(path: str, live: Any, shadow: Any) -> list[tuple[str, Any, str, Any]]:
    """``(live model, live value, shadow model, shadow value)`` per row of two answers of
    the same route; ``ValueError`` if the shadow's answer does not have the live shape."""
    sides = [reply_rows(path, live), reply_rows(path, shadow)]
    if len(sides[0]) != len(sides[1]):
        raise ValueError(f"{len(sides[1])} rows in the shadow's answer, {len(sides[0])} live")
    return [(lm, lv, sm, sv) for (lm, lv), (sm, sv) in zip(sides[0], sides[1], strict=True)]


def _plain(values: Any) -> Any:
    """Python values of a reply's array (fast-lane replies hold numpy arrays)."""
    return values.tolist() if hasattr(values, "tolist") else values


def _score_rows(reply: dict[str, Any]) -> list[tuple[str, Any]]:
    values = _plain(reply["predictions"])
    models = reply["model"]
    if isinstance(models, str):
        models = [models] * len(values)
    return list(zip(models, values, strict=True))


@dataclass
class ModelDiff:
    """Differences between the live and the shadow answers of one model."""

    rows: int = 0
    differing: int = 0
    rerouted: int = 0
    abs_sum: float = 0.0
    abs_max: float = 0.0

    def add(self, live_value: Any, shadow_value: Any, labels: bool, rerouted: bool) -> None:
        self.rows += 1
        self.rerouted += rerouted
        if live_value == shadow_value:
            return
        self.differing += 1
        if not labels and isinstance(live_value, int | float) \
                and isinstance(shadow_value, int | float):
            gap = abs(float(live_value) - float(shadow_value))
            self.abs_sum += gap
            self.abs_max = max(self.abs_max, gap)

    def as_dict(self, labels: bool) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "differing": self.differing,
                               "rerouted": self.rerouted}
        if labels:
            out["disagreement_rate"] = self.differing / self.rows if self.rows else 0.0
        else:
            out["mean_abs_diff"] = self.abs_sum / self.rows if self.rows else 0.0
            out["max_abs_diff"] = self.abs_max
        return out


def _latency(values: deque[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3, 4)  # noqa: E731
    return {"mean": round(sum(ordered) / len(ordered) * 1e3, 4), "p50": pick(0.5),
            "p99": pick(0.99)}


@dataclass
class MirrorStats:
    """What mirroring to one deployment has seen since that deployment was added."""

    labels: bool = False
    mirrored: int = 0
    compared: int = 0
    dropped: int = 0
    errors: int = 0
    mismatched: int = 0
    live_errors: int = 0
    errors_by_status: Counter[int] = field(default_factory=Counter)
    shadow_busy_seconds: float = 0.0
    live_latency: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    shadow_latency: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    models: dict[str, ModelDiff] = field(default_factory=dict)

    def as_dict(self, name: str) -> dict[str, Any]:
        replayed = self.compared + self.errors + self.mismatched + self.live_errors
        return {
            "deployment": name, "mirrored": self.mirrored, "compared": self.compared,
            "dropped": self.dropped, "errors": self.errors, "mismatched": self.mismatched,
            "live_errors": self.live_errors,
            "errors_by_status": {str(k): v for k, v in sorted(self.errors_by_status.items())},
            "latency_ms": {"live": _latency(self.live_latency),
                           "shadow": _latency(self.shadow_latency)},
            "shadow_loop_ms_per_request": round(self.shadow_busy_seconds / replayed * 1e3, 4)
            if replayed else None,
            "models": {m: d.as_dict(self.labels) for m, d in sorted(self.models.items())},
        }


@dataclass
class _Copy:
    """One mirrored request: what the shadow replays and the live answer to compare."""

    scope: dict[str, Any]
    body: bytes
    live_status: int
    live_body: bytes
    live_seconds: float
    shadow: Deployment
    parsed: tuple[Any, dict[str, Any]] | None = None
    """Fast lane: the parsed body and the live reply, reused instead of parsed again."""
    live: Deployment | None = None
    """The deployment that answered the live request."""


class _Recorder:
    """Passes a live request through while keeping its body and its answer."""

    def __init__(self, receive: Any, send: Any) -> None:
        self._receive, self._send = receive, send
        self.body: list[bytes] = []
        self.reply: list[bytes] = []
        self.status = 0

    async def receive(self) -> Any:
        message = await self._receive()
        if message["type"] == "http.request":
            self.body.append(message.get("body", b""))
        return message

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.reply.append(message.get("body", b""))
        await self._send(message)


class _Capture:
    """The ASGI ``send`` of a replay: keeps the shadow's answer, sends nothing."""

    def __init__(self) -> None:
        self.status = 0
        self.body: list[bytes] = []

    async def send(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body":
            self.body.append(message.get("body", b""))


class Mirror:
    """The queue of mirrored copies and the task that replays and compares them."""

    def __init__(self, endpoint: Endpoint, serve: ServeOn, queue_size: int,
                 canary: Canary | None = None) -> None:
        self.endpoint = endpoint
        self._serve = serve
        self.queue_size = queue_size
        self.canary = canary
        self.stats: dict[str, MirrorStats] = {}
        self._queue: asyncio.Queue[_Copy] | None = None
        self._worker: asyncio.Task[None] | None = None

    def sample(self, method: str, path: str, live: Deployment) -> Deployment | None:
        """The shadow deployment if this (unpinned) request answered by ``live`` is to be
        copied: the canary's choice while a rollout runs, else the endpoint's mirror."""
        canary = self.canary
        if canary is not None:
            shadow = canary.shadow_for(live)
            if shadow is not None:
                return shadow if is_mirrored_route(method, path) else None
        target = self.endpoint.mirror_target()
        if target is None or random.random() * 100 >= target[1] \
                or not is_mirrored_route(method, path):
            return None
        return target[0]

    def stats_for(self, deployment: Deployment) -> MirrorStats:
        stats = self.stats.get(deployment.name)
        if stats is None:
            labels = deployment.registry.bundle.manifest.task == "classification"
            stats = self.stats[deployment.name] = MirrorStats(labels=labels)
        return stats

    def forget(self, name: str) -> None:
        self.stats.pop(name, None)

    async def serve(self, scope: Any, receive: Any, send: Any, live: Deployment,
                    shadow: Deployment) -> None:
        """Answer the request on ``live`` as usual, then queue a copy for ``shadow``.

        Fast-lane routes hand over the body they parsed and the reply they sent; the
        FastAPI routes are recorded on the way through (body and answer bytes)."""
        started = time.perf_counter()
        if live.scorer.reply_for(scope) is not None:
            answer = await self._serve(scope, receive, send, live)
            elapsed = time.perf_counter() - started
            canary = self.canary
            if canary is not None and canary.watches(live, shadow):
                if not canary.wants(scope["path"], answer[1] if answer else None):
                    return  # no changed model: both versions answer with the same session
                elapsed = scope["state"].get(SCORE_SECONDS, elapsed)
            # the shadow's fast lane reads only the method, path, headers and query of the
            # scope, which nothing changes once the live answer is sent: no copy needed
            self.offer(_Copy(scope, b"", 200 if answer else 400, b"", elapsed, shadow,
                             answer, live))
            return
        copy_scope = {k: v for k, v in scope.items() if k not in ("state", "app", "router",
                                                                 "endpoint", "route")}
        recorder = _Recorder(receive, send)
        await self._serve(scope, recorder.receive, recorder.send, live)
        elapsed = time.perf_counter() - started
        self.offer(_Copy(copy_scope, b"".join(recorder.body), recorder.status,
                         b"".join(recorder.reply), elapsed, shadow, live=live))

    def offer(self, copy: _Copy) -> None:
        stats = self.stats_for(copy.shadow)
        stats.mirrored += 1
        if self._queue is None:
            self._queue = asyncio.Queue(self.queue_size)
        try:
            self._queue.put_nowait(copy)
        except asyncio.QueueFull:
            stats.dropped += 1
            return
        if self._worker is None or self._worker.done():
            # a fresh context: replays must not report into the request that started it
            self._worker = asyncio.get_running_loop().create_task(
                self._work(), context=contextvars.Context())

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            copy = await self._queue.get()
            try:
                await self._replay(copy)
            except Exception:  # a shadow must never take the mirror down
                log.exception("mirrored request to %s failed to replay", copy.shadow.name)
            if not self._queue.empty():
                await asyncio.sleep(0)  # let live requests in between two queued copies

    async def _replay(self, copy: _Copy) -> None:
        stats = self.stats_for(copy.shadow)
        if self.endpoint.deployments.get(copy.shadow.name) is not copy.shadow:
            stats.dropped += 1  # removed while the copy waited
            return
        started = time.perf_counter()
        if copy.parsed is not None:
            status, reply = await self._answer_parsed(copy)
        else:
            status, reply = await self._answer_recorded(copy)
        answered = time.perf_counter()
        live = copy.parsed[1] if copy.parsed is not None else copy.live_body
        canary = self.canary
        if canary is not None and copy.live is not None and canary.watches(copy.live,
                                                                           copy.shadow):
            try:
                canary.observe(copy.scope["path"], copy.live, copy.live_status, live, status,
                               reply, copy.live_seconds, answered - started)
                stats.compared += 1
            except (ValueError, KeyError, TypeError, IndexError):
                stats.mismatched += 1
            stats.shadow_busy_seconds += time.perf_counter() - started
            return
        self._compare(stats, copy.scope["path"], copy.live_status, live, status, reply)
        stats.shadow_latency.append(answered - started)
        stats.live_latency.append(copy.live_seconds)
        # wall time on the loop: a copy of a small request never suspends, so this is its
        # CPU time (a per-copy thread_time() is a system call that cost more than the copy)
        stats.shadow_busy_seconds += time.perf_counter() - started

    @staticmethod
    async def _answer_parsed(copy: _Copy) -> tuple[int, Any]:
        """The shadow's reply to a fast-lane body, straight from its data plane."""
        shadow = copy.shadow
        fast = shadow.scorer.reply_for(copy.scope)
        assert copy.parsed is not None and fast is not None
        body = copy.parsed[0]
        shadow.inflight += 1
        try:
            return 200, await fast[0](body)
        except Exception as exc:  # the shadow's failure is counted, never raised
            return render_exception(copy.scope["path"], exc)[0], None
        finally:
            shadow.inflight -= 1

    async def _answer_recorded(self, copy: _Copy) -> tuple[int, Any]:
        """The shadow's reply to a recorded request, replayed through the app."""
        capture = _Capture()
        sent = {"done": False}

        async def receive() -> dict[str, Any]:
            if sent["done"]:
                return {"type": "http.disconnect"}
            sent["done"] = True
            return {"type": "http.request", "body": copy.body, "more_body": False}

        await self._serve({**copy.scope, "state": {}}, receive, capture.send, copy.shadow)
        return capture.status, b"".join(capture.body)

    @staticmethod
    def _compare(stats: MirrorStats, path: str, live_status: int, live: Any,
                 shadow_status: int, shadow: Any) -> None:
        """Count one copy: replies are dicts (fast lane) or JSON bytes (recorded)."""
        if live_status != 200:
            stats.live_errors += 1
            return
        if shadow_status != 200:
            stats.errors += 1
            stats.errors_by_status[shadow_status] += 1
            return
        try:
            rows = paired_rows(path, orjson.loads(live) if isinstance(live, bytes) else live,
                               orjson.loads(shadow) if isinstance(shadow, bytes) else shadow)
        except (ValueError, KeyError, TypeError, IndexError):
            stats.mismatched += 1
            return
        stats.compared += 1
        labels = stats.labels
        for live_model, live_value, shadow_model, shadow_value in rows:
            diff = stats.models.get(live_model)
            if diff is None:
                diff = stats.models[live_model] = ModelDiff()
            diff.add(live_value, shadow_value, labels, live_model != shadow_model)

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
