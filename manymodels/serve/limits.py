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
* past ``max_concurrency`` requests being answered, a request gets 503 at once (uvicorn's
  own answer) without reaching the application.

Deadlines are not timers per request: each connection notes its deadline (a float) as
the parser reaches each stage, and one sweep per server and half second closes the
connections past theirs. The request path pays a clock read and a comparison.
"""

from __future__ import annotations

import asyncio
import logging
import math
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
    """uvicorn's httptools protocol with header and body deadlines, a connection limit
    and a concurrency limit (see the module docstring)."""

    _from_environment: ClassVar[ConnectionLimits | None] = None

    def __init__(self, config: Any, server_state: Any, app_state: dict[str, Any],
                 _loop: asyncio.AbstractEventLoop | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(config, LIMITS_ATTRIBUTE, None)
        if limits is None:  # worker processes: the settings come from MANYMODELS_* variables
            limits = GuardedHttpTools._environment_limits()
        self._limits: ConnectionLimits = limits
        self._deadline = math.inf

    @staticmethod
    def _environment_limits() -> ConnectionLimits:
        if GuardedHttpTools._from_environment is None:
            GuardedHttpTools._from_environment = ConnectionLimits.of(ServeSettings())
        return GuardedHttpTools._from_environment

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self._limits.max_connections:
            transport.abort()  # no lingering close: the socket is freed now
            return
        self._deadline = self.loop.time() + self._limits.header_seconds
        _Sweeper.start(self.server_state, self.loop)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._deadline = self.loop.time() + self._limits.header_seconds

    def on_headers_complete(self) -> None:
        self._deadline = self.loop.time() + self._limits.body_seconds
        # uvicorn answers 503 itself when ``limit_concurrency`` is reached; it counts open
        # connections as well, so the limit is set per request from the requests alone
        self.limit_concurrency = 0 if len(self.tasks) >= self._limits.max_concurrency \
            else None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._deadline = math.inf  # answering, then uvicorn's keep-alive timeout
        super().on_message_complete()


class _Sweeper:
    """Closes, twice a second, the connections of one server that are past their
    deadline; runs while the server has connections."""

    INTERVAL = 0.5
    ATTRIBUTE = "manymodels_sweeper"

    def __init__(self, server_state: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.server_state = server_state
        self.loop = loop
        self.handle: asyncio.TimerHandle | None = None

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
        connections = self.server_state.connections
        for protocol in [p for p in connections
                         if getattr(p, "_deadline", math.inf) < now]:
            protocol._deadline = math.inf
            if not protocol.transport.is_closing():
                protocol.transport.abort()
        if connections:
            self.handle = self.loop.call_later(self.INTERVAL, self.sweep)
