"""Connection limits, so that slow or numerous clients cannot exhaust the server.

uvicorn closes a keep-alive connection that stays idle after a response, but not one
that never sends a request, nor one that sends its headers (or body) a byte at a time:
each holds a socket for as long as the client likes, and a few hundred of them exhaust
the process's open-file limit, after which every request fails. :class:`GuardedHttpTools`
is uvicorn's httptools protocol with four more rules:

* a connection must deliver a request's complete headers within ``header_timeout_seconds``
  of opening (or of the first byte of its next request), else it is closed;
* a request's body must arrive within ``body_timeout_seconds`` of its headers;
* past ``max_connections`` open connections, a new one is closed at once;
* past ``max_concurrency`` open connections or requests in flight, a request gets 503 at
  once without reaching the application (uvicorn's ``limit_concurrency``, passed as it
  is; with the default connection limit below it, only requests count).

Deadlines are not timers per request: one sweep per server and half second looks at
what each connection waits for (headers, or the rest of a body) and closes those that
have waited too long. A request pays nothing for it.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .settings import ServeSettings

__all__ = ["LIMITS_ATTRIBUTE", "ConnectionLimits", "GuardedHttpTools", "default_max_connections"]

log = logging.getLogger("manymodels.serve")

#: Attribute of the uvicorn ``Config`` that carries the limits of one server.
LIMITS_ATTRIBUTE = "manymodels_limits"
#: Upper bound of the default connection limit.
MAX_DEFAULT_CONNECTIONS = 4096


def default_max_connections() -> int:
    """Half the process's open-file limit (the rest is for model files, logs, threads),
    at most :data:`MAX_DEFAULT_CONNECTIONS`."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_DEFAULT_CONNECTIONS
    return max(16, min(MAX_DEFAULT_CONNECTIONS, soft // 2))


@dataclass(frozen=True)
class ConnectionLimits:
    """The limits of one server process."""

    header_seconds: float
    body_seconds: float
    max_connections: int
    max_concurrency: int

    @classmethod
    def of(cls, settings: ServeSettings) -> ConnectionLimits:
        return cls(settings.header_timeout_seconds, settings.body_timeout_seconds,
                   settings.max_connections or default_max_connections(),
                   settings.max_concurrency)


class GuardedHttpTools(HttpToolsProtocol):
    """uvicorn's httptools protocol with header and body deadlines and a connection
    limit (see the module docstring)."""

    _from_environment: ClassVar[ConnectionLimits | None] = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(config, LIMITS_ATTRIBUTE, None)
        if limits is None:  # worker processes: the settings come from MANYMODELS_* variables
            limits = GuardedHttpTools._environment_limits()
        self.limits: ConnectionLimits = limits

    @staticmethod
    def _environment_limits() -> ConnectionLimits:
        if GuardedHttpTools._from_environment is None:
            GuardedHttpTools._from_environment = ConnectionLimits.of(ServeSettings())
        return GuardedHttpTools._from_environment

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            transport.abort()  # no lingering close: the socket is freed now
            return
        _Sweeper.start(self.server_state, self.loop)

    def stage(self) -> tuple[tuple[str, int], float] | None:
        """What the connection waits for from its client, and for how long it may: the
        headers of a request (a new connection, or the first bytes of the next request
        arrived), or the rest of a body; ``None`` while it answers, or while it is idle
        under uvicorn's own keep-alive timeout."""
        if self.timeout_keep_alive_task is not None:
            return None
        cycle = self.cycle
        if cycle is None or cycle.response_complete:
            return ("headers", id(cycle)), self.limits.header_seconds
        if cycle.more_body:
            return ("body", id(cycle)), self.limits.body_seconds
        return None


class _Sweeper:
    """Twice a second, closes the connections of one server that have waited for the
    same headers or body longer than allowed; runs while the server has connections.

    A stage is timed from the first sweep that sees it, so a connection is closed between
    its deadline and a second after it, never before, and requests pay nothing."""

    INTERVAL = 0.5
    ATTRIBUTE = "manymodels_sweeper"

    def __init__(self, server_state: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.server_state = server_state
        self.loop = loop
        self.handle: asyncio.TimerHandle | None = None
        self.seen: dict[GuardedHttpTools, tuple[tuple[str, int], float]] = {}

    @classmethod
    def start(cls, server_state: Any, loop: asyncio.AbstractEventLoop) -> None:
        sweeper = getattr(server_state, cls.ATTRIBUTE, None)
        if sweeper is None:
            sweeper = cls(server_state, loop)
            setattr(server_state, cls.ATTRIBUTE, sweeper)
        if sweeper.handle is None:
            sweeper.handle = loop.call_later(cls.INTERVAL, sweeper.sweep)

    def sweep(self) -> None:
        self.handle = None
        now = self.loop.time()
        seen: dict[GuardedHttpTools, tuple[tuple[str, int], float]] = {}
        connections = self.server_state.connections
        for protocol in list(connections):
            if not isinstance(protocol, GuardedHttpTools) or protocol.transport.is_closing():
                continue
            stage = protocol.stage()
            if stage is None:
                continue
            marker, allowed = stage
            before = self.seen.get(protocol)
            since = before[1] if before is not None and before[0] == marker else now
            if now - since >= allowed:
                protocol.transport.abort()
            else:
                seen[protocol] = (marker, since)
        self.seen = seen
        if connections:
            self.handle = self.loop.call_later(self.INTERVAL, self.sweep)
