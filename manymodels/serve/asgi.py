"""The ASGI application: a deployment chosen per request, and a fast lane for hot routes.

Before any route runs, :class:`ManyModelsAPI` asks the :class:`~.endpoint.Endpoint`
which deployment answers the request (pinned by header, else by weight), puts it in the
ASGI scope's state (``state["deployment"]`` is its name, for logs and metrics) and adds
the ``x-manymodels-deployment`` header to the answer; handlers take the deployment from
the request (:func:`deployment_of`) and never branch on which one it is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request

from .dataplane import check_headers, dumps, parse_json, receive_body
from .endpoint import Deployment, Endpoint
from .errors import render_exception
from .mirror import SCORE_SECONDS, Canary, Mirror
from .paths import DATA_PLANE, FAST_ROUTES
from .scorer import ReplyFunction

__all__ = ["DEPLOYMENT_STATE", "ManyModelsAPI", "deployment_of"]

log = logging.getLogger("manymodels.serve")

JSON_BYTES = b"application/json"
#: Scope-state key of the :class:`~.endpoint.Deployment` answering a request.
DEPLOYMENT_STATE = "manymodels.deployment"


def deployment_of(request: Request) -> Deployment:
    """The deployment the endpoint chose for ``request``."""
    return request.scope["state"][DEPLOYMENT_STATE]  # type: ignore[no-any-return]


class ManyModelsAPI(FastAPI):
    """FastAPI with a deployment chosen per request and a fast lane for the hot routes.

    ``POST /score``, ``POST /v2/models/{name}/infer``, ``POST /forecast`` and the
    key-carrying routes ``POST /models/{name}/score`` and ``POST /segments/score`` are
    answered straight from the ASGI call: same body checks, same data plane, same error table as the declared
    routes (which stay, for the OpenAPI page and for any caller that mounts the router),
    but without routing, dependency solving and the middleware stack, which cost more
    than the scoring itself. Every other route goes through
    FastAPI as usual. Both lanes get their deployment from :meth:`serve`. Cross-cutting
    checks (credentials: :mod:`.auth`) are pure ASGI middlewares put around
    :meth:`dispatch` with :meth:`wrap`, so neither lane can skip them.
    """

    def __init__(self, endpoint: Endpoint, mirror_queue: int, body_limit: int,
                 canary: Canary | None = None, **kwargs: Any) -> None:
        """``kwargs`` go to FastAPI; ``mirror_queue`` bounds the mirrored copies waiting;
        ``canary`` is a rollout's own comparisons (see :class:`~.mirror.Canary`)."""
        super().__init__(**kwargs)
        self.endpoint = endpoint
        self.mirror = Mirror(endpoint, self.serve, mirror_queue, canary)
        self.body_limit = body_limit
        self._entry: Any = self._dispatch
        self._fast_routes: dict[str, Any] = {}

    def wrap(self, layer: Callable[[Any], Any]) -> None:
        """Wrap the whole application, fast lane included, in the ASGI middleware that
        ``layer(inner)`` returns; the layer wrapped last is the outermost."""
        self._entry = layer(self._entry)

    def bind_fast_routes(self, *routers: APIRouter) -> None:
        """Remember the declared routes the fast lane answers for (here or in an included
        ``routers``), so that it sets ``scope["route"]`` as FastAPI does; outer layers
        label requests by it."""
        for route in [*self.routes, *(r for router in routers for r in router.routes)]:
            path = getattr(route, "path", "")
            if path in FAST_ROUTES:
                self._fast_routes[path] = route

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(DATA_PLANE):
            await self._starlette(scope, receive, send)
            return
        try:
            choice = self.endpoint.choose(scope["headers"])
        except Exception as exc:  # an unknown pinned deployment, no live traffic
            await _send_error(send, scope["path"], exc, ())
            return
        shadow = None if choice.pinned else self.mirror.sample(scope["method"], scope["path"],
                                                                choice.deployment)
        if shadow is None:
            await self.serve(scope, receive, send, choice.deployment)
        else:
            await self.mirror.serve(scope, receive, send, choice.deployment, shadow)

    async def serve(self, scope: Any, receive: Any, send: Any,
                    deployment: Deployment) -> tuple[Any, dict[str, Any]] | None:
        """Answer one request on ``deployment`` (live, pinned, or a mirrored copy).

        On the fast lane, returns the parsed body and the reply that was sent (``None``
        if the request failed), so the mirror reuses them instead of parsing again."""
        state = scope.get("state")
        if state is None:
            state = scope["state"] = {}
        state["deployment"] = deployment.name
        state[DEPLOYMENT_STATE] = deployment
        deployment.inflight += 1
        try:
            fast = deployment.scorer.reply_for(scope)
            if fast is not None:
                reply_to, route = fast
                scope["route"] = self._fast_routes.get(route)
                return await self._fast(scope, receive, send, reply_to, deployment)
            header = deployment.header

            async def send_named(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), header]
                await send(message)

            await self._starlette(scope, receive, send_named)
            return None
        finally:
            deployment.inflight -= 1

    async def _starlette(self, scope: Any, receive: Any, send: Any) -> None:
        """FastAPI's own handling (routing, dependencies, the error handlers)."""
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        try:
            await super().__call__(scope, receive, send)
        except Exception:  # noqa: S110
            # Starlette answers 500 through our handler (which logs one line), then
            # re-raises so that servers can log it too; uvicorn would print the stack trace
            pass

    async def _fast(self, scope: Any, receive: Any, send: Any, reply_to: ReplyFunction,
                    deployment: Deployment) -> tuple[Any, dict[str, Any]] | None:
        status, media = 200, JSON_BYTES
        try:
            check_headers(scope["headers"], self.body_limit)
            body = parse_json(await receive_body(receive, self.body_limit))
            started = time.perf_counter()
            reply = await reply_to(body)
            scope["state"][SCORE_SECONDS] = time.perf_counter() - started
            content = dumps(reply)
        except Exception as exc:  # every failure becomes one mapped answer, never a crash
            await _send_error(send, scope["path"], exc, (deployment.header,))
            return None
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", media),
                                (b"content-length", str(len(content)).encode()),
                                deployment.header]})
        await send({"type": "http.response.body", "body": content})
        return body, reply


async def _send_error(send: Any, path: str, exc: Exception,
                      extra: tuple[tuple[bytes, bytes], ...]) -> None:
    status, content, media = render_exception(path, exc)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media.encode()),
                            (b"content-length", str(len(content)).encode()), *extra]})
    await send({"type": "http.response.body", "body": content})
