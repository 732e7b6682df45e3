"""Tests of manymodels.serve.limits: a real ``manymodels serve`` and raw sockets on 127.0.0.1.

Idle, slow-header and slow-body connections must be closed within the configured
deadlines, connections past the limit at once, requests past the concurrency limit
answered 503, while normal requests keep succeeding; the server's whole log holds no
traceback.
"""

from __future__ import annotations

import os
import selectors
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from builders import build_bundle
from conftest import answering, assert_clean_log

from manymodels.serve import ServeSettings
from manymodels.serve.limits import ConnectionLimits, default_max_connections

SEG = "quantity__store=1__brand=tropicana"
BODY = {"model": SEG, "data": [{"price": 2.0, "feat": 1.0}]}
HEADER_SECONDS, BODY_SECONDS, KEEP_ALIVE_SECONDS = 1.0, 1.5, 1.0
#: Sweep interval plus scheduling delay on a shared, loaded two-core machine.
SLACK = 3.0


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bundle(tmp_path_factory.mktemp("limits") / "oj", n_stores=1,
                        rows_per_segment=6)[0]


def _serving(bundle: Path, log: Path, **env: str) -> Any:
    command = [sys.executable, "-m", "manymodels", "serve", str(bundle), "--port", "{port}",
               "--log-level", "info"]
    settings = {"MANYMODELS_HEADER_TIMEOUT_SECONDS": str(HEADER_SECONDS),
                "MANYMODELS_BODY_TIMEOUT_SECONDS": str(BODY_SECONDS),
                "MANYMODELS_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE_SECONDS), **env}
    return answering(command, "/ping", "manymodels serve", log=log,
                     env={**os.environ, "PYTHONUNBUFFERED": "1", **settings})


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _closed_after(sock: socket.socket, limit: float) -> float | None:
    """Seconds until the server closes ``sock`` (EOF or reset), ``None`` if it did not
    within ``limit``."""
    started = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - started < limit:
        try:
            if sock.recv(4096) == b"":
                return time.monotonic() - started
        except TimeoutError:
            continue
        except OSError:  # reset: closed as well
            return time.monotonic() - started
    return None


def _score(url: str) -> int:
    with httpx.Client(base_url=url, timeout=30) as client:  # a new connection each time
        return client.post("/score", json=BODY).status_code


def _watch_closes(socks: dict[str, socket.socket], until: float) -> dict[str, float]:
    """When (monotonic time) the server closed each socket, watched all at once."""
    closed: dict[str, float] = {}
    with selectors.DefaultSelector() as selector:
        for name, sock in socks.items():
            selector.register(sock, selectors.EVENT_READ, name)
        while len(closed) < len(socks) and time.monotonic() < until:
            for key, _ in selector.select(timeout=0.05):
                try:
                    data = key.fileobj.recv(4096)  # type: ignore[union-attr]
                except OSError:  # reset: closed as well
                    data = b""
                if data == b"":
                    closed[key.data] = time.monotonic()
                    selector.unregister(key.fileobj)
    return closed


def test_idle_and_slow_sockets_are_closed_while_requests_succeed(bundle: Path,
                                                                tmp_path: Path) -> None:
    """Check that connections that never send, send headers a byte at a time, stop in the
    middle of a body, or stay idle after a response are each closed within their deadline
    (plus the sweep interval and a loaded machine's delay), never before it, while
    normal requests from other clients all succeed."""
    log = tmp_path / "server.log"
    with _serving(bundle, log) as url:
        port = _port(url)
        socks: dict[str, socket.socket] = {}
        since: dict[str, tuple[float, float]] = {}  # name -> (reference time, deadline)
        for i in range(30):
            socks[f"idle {i}"] = socket.create_connection(("127.0.0.1", port))
            since[f"idle {i}"] = (time.monotonic(), HEADER_SECONDS)
        slow = []
        for i in range(5):
            sock = socks[f"slow header {i}"] = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\n")
            since[f"slow header {i}"] = (time.monotonic(), HEADER_SECONDS)
            slow.append(sock)
        body = socks["slow body"] = socket.create_connection(("127.0.0.1", port))
        body.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                     b"\r\nContent-Length: 1000\r\n\r\n{\"model\":")
        since["slow body"] = (time.monotonic(), BODY_SECONDS)
        kept = socks["keep-alive"] = socket.create_connection(("127.0.0.1", port))
        kept.sendall(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        since["keep-alive"] = (time.monotonic(), KEEP_ALIVE_SECONDS)
        stop = threading.Event()

        def dribble() -> None:  # one header byte every 0.2 s: never a complete header
            while not stop.is_set():
                for sock in slow:
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        pass
                time.sleep(0.2)

        closed: dict[str, float] = {}
        watcher = threading.Thread(target=lambda: closed.update(
            _watch_closes(socks, time.monotonic() + 20)))
        watcher.start()
        threading.Thread(target=dribble, daemon=True).start()
        statuses = [_score(url) for _ in range(20)]
        watcher.join()
        stop.set()
        assert statuses == [200] * 20
        assert _score(url) == 200
    assert set(closed) == set(socks), sorted(set(socks) - set(closed))
    for name, when in closed.items():
        opened, deadline = since[name]
        assert deadline - 0.2 <= when - opened <= deadline + SLACK, (name, when - opened)
    for sock in socks.values():
        sock.close()
    assert_clean_log(log)


def test_connections_past_the_limit_are_closed_at_once(bundle: Path, tmp_path: Path) -> None:
    """Check that past max_connections a new connection is closed at once, that requests
    past max_concurrency get 503 without reaching the models, and that the server serves
    normally once the silent connections are gone."""
    log = tmp_path / "server.log"
    with _serving(bundle, log, MANYMODELS_MAX_CONNECTIONS="20",
                  MANYMODELS_MAX_CONCURRENCY="2") as url:
        port = _port(url)
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        quick = [_closed_after(s, 0.5) for s in held]
        assert sum(w is not None for w in quick) >= 20, quick  # the ones past the limit
        for sock in held:
            sock.close()
        deadline = time.monotonic() + 10
        while _score(url) != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        waiting = []
        for _ in range(2):  # two requests in flight, each waiting for the rest of its body
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                         b"\r\nContent-Length: 1000\r\n\r\n{")
            waiting.append(sock)
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/score", json=BODY).status_code == 503
        for sock in waiting:  # closed at the body deadline; then requests are served again
            assert _closed_after(sock, BODY_SECONDS + SLACK + 5) is not None
            sock.close()
        assert _score(url) == 200
    assert_clean_log(log)


def test_default_limits_follow_the_open_file_limit() -> None:
    """Check that the default connection limit is half the open-file limit (at most 4096)
    and that settings override it."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 4096 if soft == resource.RLIM_INFINITY else max(16, min(4096, soft // 2))
    assert default_max_connections() == expected
    assert ConnectionLimits.of(ServeSettings()).max_connections == expected
    assert ConnectionLimits.of(ServeSettings(max_connections=7)).max_connections == 7
