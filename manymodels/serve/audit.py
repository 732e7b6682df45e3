"""The audit log: every admin change and every denied request, as rotated JSON lines.

Two kinds of record, one JSON object per line:

* ``{"kind": "change", "time", "who", "method", "path", "body", "status", "before",
  "after"}``: one per request that may change the endpoint (a non-GET ``/admin`` route,
  V2 model load / unload), with the endpoint's deployments, traffic and mirror before and
  after it, whatever its outcome (``status``);
* ``{"kind": "denied", "minute", "who", "route", "reason", "count"}``: refused requests
  (401, 403, 429) summed per minute, caller, route and reason, so a flood of bad
  credentials writes a few lines a minute, not one per request.

``who`` is the credential's public name (``name/key-id`` or ``token:subject``) when it
was verified, a key's public id when it was not, else the client address; a credential
itself never appears. The file rotates at ``audit_max_mb`` (``audit.jsonl.1`` ...).
:class:`AuditMiddleware` is a pure ASGI layer that only looks at admin changes; denied
requests are reported by :mod:`.auth`.
"""

from __future__ import annotations

import logging
import logging.handlers
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import orjson

__all__ = ["AuditLog", "AuditMiddleware", "changes_endpoint"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
#: Distinct (caller, route, reason) groups kept per minute; more are summed as ``other``.
MAX_GROUPS = 1000
#: Bytes of an admin body kept in a change record.
MAX_BODY = 4096


def changes_endpoint(method: str, path: str) -> bool:
    """Whether a request may change the endpoint (what the audit log records)."""
    if method in ("GET", "HEAD", "OPTIONS"):
        return False
    return path == "/admin" or path.startswith("/admin/") or (
        path.startswith("/v2/repository/models/") and path.endswith(("/load", "/unload")))


def who(scope: Scope, credential_id: str | None = None) -> str:
    """The caller of ``scope``: its verified principal, a key id, or its address."""
    user = scope.get("user")
    subject = getattr(user, "subject", None)
    if isinstance(subject, str):
        return subject
    if credential_id is not None:
        return f"key {credential_id}"
    client = scope.get("client")
    return f"client {client[0]}" if client else "client unknown"


class AuditLog:
    """Appends audit records to a rotated JSON-lines file.

    Parameters
    ----------
    path
        The file (its directory is created).
    max_bytes, backups
        Rotate past ``max_bytes``, keeping ``backups`` older files.
    """

    def __init__(self, path: str | Path, max_bytes: int = 10 * 2**20,
                 backups: int = 5) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(self.path, maxBytes=max_bytes,
                                                       backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger(f"manymodels.audit.{id(self)}")  # not in the tree
        self._logger.addHandler(handler)
        self._handler = handler
        self._minute = 0
        self._denied: dict[tuple[str, str, str], int] = {}

    def _write(self, record: dict[str, Any]) -> None:
        self._logger.info(orjson.dumps(record).decode())

    def change(self, scope: Scope, body: bytes, status: int, before: Any,
               after: Any) -> None:
        """One admin change (or attempt) and the endpoint's state around it."""
        try:
            parsed: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = body[:MAX_BODY].decode("utf-8", "replace")
        self._write({"kind": "change", "time": _now(), "who": who(scope),
                     "method": scope.get("method"), "path": scope.get("path"),
                     "body": parsed, "status": status, "before": before, "after": after})

    def denied(self, caller: str, route: str, reason: str, now: float | None = None) -> None:
        """Count one refused request; a minute's counts are written once it is over."""
        minute = int((time.time() if now is None else now) // 60)
        if minute != self._minute:
            self.flush()
            self._minute = minute
        key = (caller, route, reason)
        if key not in self._denied and len(self._denied) >= MAX_GROUPS:
            key = ("other", "other", reason)
        self._denied[key] = self._denied.get(key, 0) + 1

    def flush(self) -> None:
        """Write the current minute's denied counts."""
        if not self._denied:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%MZ", time.gmtime(self._minute * 60))
        for (caller, route, reason), count in sorted(self._denied.items()):
            self._write({"kind": "denied", "minute": stamp, "who": caller, "route": route,
                         "reason": reason, "count": count})
        self._denied = {}

    def close(self) -> None:
        self.flush()
        self._handler.close()


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class AuditMiddleware:
    """Pure ASGI: records each request that may change the endpoint (see
    :func:`changes_endpoint`) with the endpoint's state before and after; every other
    request passes with one string check."""

    def __init__(self, app: Callable[..., Awaitable[None]], audit: AuditLog,
                 state: Callable[[], Any]) -> None:
        self.app = app
        self.audit = audit
        self.state = state

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        if scope["type"] != "http" or not changes_endpoint(scope["method"], scope["path"]):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        status = [500]

        async def receive_kept() -> Message:
            message = await receive()
            if message.get("type") == "http.request" and sum(map(len, chunks)) < MAX_BODY:
                chunks.append(message.get("body", b""))
            return message

        async def send_seen(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        before = self.state()
        try:
            await self.app(scope, receive_kept, send_seen)
        finally:
            self.audit.change(scope, b"".join(chunks)[:MAX_BODY], status[0], before,
                              self.state())
