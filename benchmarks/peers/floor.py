"""The HTTP floor: a bare ASGI app (no framework) that reads the body, answers fixed JSON.

Run under the same uvicorn settings as ``manymodels serve``; no server can answer a
request over HTTP with less work than this, so it bounds what a framework can reach.
"""

from __future__ import annotations

from typing import Any

ANSWER = b'{"predictions":[1.0]}'
HEADERS = [(b"content-type", b"application/json"),
           (b"content-length", str(len(ANSWER)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    more = True
    while more:  # read the whole body, as any real handler must
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})
