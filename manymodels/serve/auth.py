"""Authentication and authorization of every request: one pure ASGI middleware.

:class:`AuthMiddleware` wraps the whole application (:meth:`ManyModelsAPI.wrap`), so
the raw-ASGI fast lane of ``POST /score`` and V2 ``infer`` passes the same checks as
the FastAPI routes; there is no per-route dependency to forget. It is not Starlette's
``BaseHTTPMiddleware``, which adds a task and a body copy per request.

The scope a request needs is decided by its path alone (:func:`required_scope`), with
**default deny**: the health routes and the static page shell ``/ui`` are open, the
scoring routes need ``score``, the batch jobs API (``/batch/...``) needs ``batch``, admin
routes and model load/unload need ``admin``, and
every other path — including any route added later and unknown paths, which would answer
404 — needs ``read``. No credentials
(or bad ones) → 401 with ``WWW-Authenticate: Bearer``; valid but without the scope →
403; over the credential's request budget → 429 with ``Retry-After``.

Credentials travel as ``Authorization: Bearer <key or token>``. Nothing here logs or
returns a credential: messages name the problem and, for keys, the public key id.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manymodels.credentials import (
    KeyVerifier,
    Principal,
    TokenVerifier,
    default_key_file,
    default_token_secret_file,
)
from manymodels.errors import AuthError, Forbidden, MissingCredentials, RateLimited, SpecError

from .errors import render_error
from .paths import (
    OPEN_PATHS,
    SCORE_PATHS,
    is_batch_path,
    is_model_score_path,
    is_repository_change,
    split_infer_path,
)
from .settings import ServeSettings

__all__ = [
    "AuthMiddleware",
    "Guard",
    "RateLimiter",
    "auth_mode",
    "build_guard",
    "document_security",
    "is_loopback",
    "required_scope",
]

log = logging.getLogger("manymodels.serve")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
                   Awaitable[None]]

REALM = 'Bearer realm="manymodels"'


# -- which scope a path needs --------------------------------------------------------------
def required_scope(path: str) -> str | None:
    """The scope ``path`` needs, ``None`` for the open health routes; ``read`` by default.

    Starlette matches routes on the decoded path exactly, so a path is classified as the
    route that would answer it: ``/score/`` is not ``/score`` (it answers a redirect,
    under ``read``), and ``/v2/models/a/b/infer`` matches no infer route.
    """
    if path in OPEN_PATHS or path.startswith("/v2/health/"):
        return None
    if path in SCORE_PATHS or split_infer_path(path) is not None or is_model_score_path(path):
        return "score"
    if path == "/admin" or path.startswith("/admin/") or is_repository_change(path):
        return "admin"
    if is_batch_path(path):
        return "batch"
    return "read"


# -- rate limits ---------------------------------------------------------------------------
@dataclass
class RateLimiter:
    """A token bucket per credential subject: ``rate`` requests/s, bursts of ``burst``.

    Buckets live in this process (each uvicorn worker limits on its own). Idle buckets
    are dropped once there are ``max_subjects`` of them, so unknown callers cannot grow
    memory without bound (only verified credentials ever get a bucket).
    """

    rate: float | None
    burst: float | None = None
    max_subjects: int = 100_000
    _buckets: dict[str, list[float]] = field(default_factory=dict, repr=False)

    def check(self, principal: Principal, now: float) -> None:
        """Spend one request of ``principal``'s budget, or raise :class:`RateLimited`."""
        rate = principal.rate_limit or self.rate
        if rate is None:
            return
        burst = self.burst if self.burst is not None and principal.rate_limit is None \
            else max(1.0, rate)
        bucket = self._buckets.get(principal.subject)
        if bucket is None:
            if len(self._buckets) >= self.max_subjects:
                self._drop_idle(now)
            bucket = self._buckets[principal.subject] = [burst, now]
        tokens = min(burst, bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise RateLimited(max(1, math.ceil((1.0 - tokens) / rate)))
        bucket[0] = tokens - 1.0

    def _drop_idle(self, now: float) -> None:
        rate = self.rate or 1.0
        for subject in [s for s, (_, last) in self._buckets.items() if now - last > 60 / rate]:
            del self._buckets[subject]
        if len(self._buckets) >= self.max_subjects:
            self._buckets.clear()


# -- the guard: credentials → principal → allowed or not -----------------------------------
@dataclass
class Guard:
    """Checks one request's credentials; what the middleware calls per request."""

    mode: str
    verify: Callable[[bytes, float], Principal]
    limiter: RateLimiter

    def authorize(self, headers: list[tuple[bytes, bytes]], needed: str) -> Principal:
        """The caller's principal if it may use a route needing ``needed``, else raise."""
        credential = bearer(headers)
        if credential is None:
            raise MissingCredentials(f"this route needs credentials: send 'Authorization: "
                                     f"Bearer <{'API key' if self.mode == 'key' else 'token'}>'")
        now = time.time()
        try:
            principal = self.verify(credential, now)
        except AuthError as exc:
            key_id = _key_id(credential)
            exc.caller = None if key_id is None else f"key {key_id}"
            raise
        try:
            if needed not in principal.scopes:
                raise Forbidden(needed, principal.scopes)
            if principal.rate_limit is not None or self.limiter.rate is not None:
                self.limiter.check(principal, now)
        except AuthError as exc:
            exc.caller = principal.subject
            raise
        return principal


def _key_id(credential: bytes) -> str | None:
    """The public id of an API key (``mmk_<id>_<secret>``), never any secret part."""
    if len(credential) == 60 and credential[:4] == b"mmk_" and credential[16:17] == b"_":
        key_id = credential[4:16]
        if all(c in b"0123456789abcdef" for c in key_id):
            return key_id.decode()
    return None


def bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The credential of an ``Authorization: Bearer ...`` header, if there is one."""
    for name, value in headers:
        if name == b"authorization":
            if value[:7].lower() != b"bearer ":
                return None
            return value[7:].strip() or None
    return None


class AuthMiddleware:
    """Pure ASGI middleware: every HTTP and WebSocket request passes :class:`Guard`."""

    def __init__(self, app: ASGIApp, guard: Guard,
                 on_denied: Callable[[Scope, str, AuthError], None] | None = None) -> None:
        self.app = app
        self.guard = guard
        self.on_denied = on_denied

    async def __call__(self, scope: Scope, receive: Callable[[], Awaitable[Message]],
                       send: Callable[[Message], Awaitable[None]]) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":  # lifespan
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        needed = required_scope(path)
        if needed is not None:
            try:
                scope["user"] = self.guard.authorize(scope["headers"], needed)
            except AuthError as exc:
                await self._refuse(scope, send, path, exc)
                return
        await self.app(scope, receive, send)

    async def _refuse(self, scope: Scope, send: Callable[[Message], Awaitable[None]],
                      path: str, exc: AuthError) -> None:
        status, headers = challenge(exc)
        log.info("%s %s -> %d %s", scope.get("method", "WS"), path, status, exc.code)
        if self.on_denied is not None:
            self.on_denied(scope, path, exc)
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body, media = render_error(path, status, exc.code, exc.message)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media.encode()),
                                (b"content-length", str(len(body)).encode()), *headers]})
        await send({"type": "http.response.body", "body": body})


def challenge(exc: AuthError) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Status and headers of a refusal (RFC 6750 ``WWW-Authenticate``, ``Retry-After``)."""
    if isinstance(exc, RateLimited):
        return 429, [(b"retry-after", str(exc.retry_after).encode())]
    if isinstance(exc, Forbidden):
        return 403, [(b"www-authenticate",
                      f'{REALM}, error="insufficient_scope", scope="{exc.needed}"'.encode())]
    if isinstance(exc, MissingCredentials):
        return 401, [(b"www-authenticate", REALM.encode())]
    return 401, [(b"www-authenticate", f'{REALM}, error="invalid_token"'.encode())]


# -- from settings -------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether ``host`` accepts connections from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def auth_mode(settings: ServeSettings) -> str:
    """The effective ``auth.mode``: as set, else ``none`` on loopback and ``key`` elsewhere.

    ``none`` on an address other machines can reach is refused unless
    ``auth.allow_unauthenticated`` says a gateway in front does the authentication.
    """
    auth = settings.auth
    mode = auth.mode or ("none" if is_loopback(settings.host) else "key")
    if mode == "none" and not is_loopback(settings.host) and not auth.allow_unauthenticated:
        raise SpecError(f"refusing to serve {settings.host} without authentication: anyone "
                        f"who can reach it could score and unload models. Use --auth key or "
                        f"--auth token, or --allow-unauthenticated if a gateway in front "
                        f"authenticates every request")
    return mode


def build_guard(settings: ServeSettings) -> Guard | None:
    """The guard for ``settings`` (``None`` when ``auth.mode`` is ``none``)."""
    mode = auth_mode(settings)
    auth = settings.auth
    if mode == "none":
        return None
    verify: Callable[[bytes, float], Principal]
    if mode == "key":
        keys = KeyVerifier(Path(auth.key_file or default_key_file()), auth.key_reload_seconds)
        if keys.active_keys == 0:
            log.warning("auth mode 'key' but %s holds no active key: every request "
                        "except health checks will get 401; create one with "
                        "`manymodels keys create --name NAME --scope score`", keys.path)
        verify = keys.verify
    else:
        public = auth.token_public_key_file
        secret = auth.token_secret_file or (None if public else str(default_token_secret_file()))
        tokens = TokenVerifier.from_files(
            Path(secret) if secret else None, Path(public) if public else None,
            audience=auth.token_audience, issuer=auth.token_issuer,
            leeway=auth.token_leeway_seconds, cache_size=auth.token_cache_size)
        verify = tokens.verify
    return Guard(mode=mode, verify=verify,
                 limiter=RateLimiter(auth.rate_limit, auth.rate_burst))


def document_security(openapi: Callable[[], dict[str, Any]],
                      mode: str) -> Callable[[], dict[str, Any]]:
    """``openapi`` with a Bearer security scheme and, per operation, the scope it needs
    (so ``/docs`` gets an *Authorize* button and generated clients send the header)."""
    done: dict[str, Any] = {}

    def secured() -> dict[str, Any]:
        document = openapi()
        if done.get("id") == id(document):
            return document
        what = "an API key (`manymodels keys create`)" if mode == "key" else \
            "a JWT (`manymodels token create`)"
        document.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer",
            "description": f"`Authorization: Bearer <{mode}>`: {what}. Scopes: read, score, "
                           f"batch, admin (admin implies the others)."}
        for path, operations in document.get("paths", {}).items():
            needed = required_scope(path.replace("{", "").replace("}", ""))
            for operation in operations.values():
                if not isinstance(operation, dict):
                    continue
                if needed is None:
                    operation["security"] = []
                else:
                    operation["security"] = [{"bearer": []}]
                    operation["x-required-scope"] = needed
                    operation.setdefault("responses", {}).update({
                        "401": {"description": "No, unknown, expired or tampered credentials"},
                        "403": {"description": f"The credentials lack scope '{needed}'"}})
        done["id"] = id(document)
        return document

    return secured
