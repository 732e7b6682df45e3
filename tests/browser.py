"""A real headless Chromium for page tests, driven over the DevTools protocol.

Debian's ``chromium`` (``.ci/run`` installs it) is started with a fresh profile and
``--remote-debugging-port=0``; the port it picked is read from ``DevToolsActivePort``.
One websocket (``websocket-client``) carries every command; each page is a target
attached in flattened mode, so its events (requests, console messages, exceptions)
arrive on the same socket, tagged with the page's session id.

Screenshots go to :func:`artifact_dir` (``test-artifacts/`` by default, git-ignored, or
``MANYMODELS_TEST_ARTIFACTS``), never into the repository's tracked files.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--disable-extensions", "--mute-audio",
                  "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"]


def chromium_path() -> str:
    """The Chromium binary; a test that needs it fails (not skips) when it is missing."""
    path = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if path is None:
        pytest.fail("headless Chromium is needed for page tests: apt-get install chromium "
                    "(.ci/run installs it)")
    return path


def artifact_dir() -> Path:
    root = Path(os.environ.get("MANYMODELS_TEST_ARTIFACTS",
                               Path(__file__).resolve().parent.parent / "test-artifacts"))
    root.mkdir(parents=True, exist_ok=True)
    return root


class Chromium:
    """One headless Chromium process and its DevTools websocket."""

    def __init__(self, timeout: float = 60.0) -> None:
        import websocket

        self.profile = Path(tempfile.mkdtemp(prefix="mm-chromium-"))
        self.proc = subprocess.Popen(
            [chromium_path(), *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError("Chromium did not open its DevTools port")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=timeout,
                                              suppress_origin=True, enable_multithread=False)
        self.ids = itertools.count(1)
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None,
             session: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
        """Send one command and wait for its answer, keeping the events that arrive meanwhile."""
        message_id = next(self.ids)
        message: dict[str, Any] = {"id": message_id, "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == message_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return dict(reply.get("result", {}))
            self.events.append(reply)
        raise TimeoutError(f"{method}: no answer in {timeout} s")

    def pump(self, seconds: float) -> None:
        """Collect events for ``seconds`` (the socket is read only while commands run)."""
        import websocket

        self.ws.settimeout(0.2)
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                try:
                    self.events.append(json.loads(self.ws.recv()))
                except websocket.WebSocketTimeoutException:
                    continue
        finally:
            self.ws.settimeout(60)

    def new_page(self, offline: bool = False) -> Page:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"]
        page = Page(self, session)
        for domain in ("Page", "Runtime", "Log", "Network"):
            page.send(f"{domain}.enable")
        if offline:
            page.send("Network.emulateNetworkConditions", {
                "offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1})
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": 1400, "height": 1800, "deviceScaleFactor": 1, "mobile": False})
        return page

    def close(self) -> None:
        try:
            if getattr(self, "ws", None) is not None:
                self.ws.close()
        finally:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=20)
            shutil.rmtree(self.profile, ignore_errors=True)


class Page:
    """One tab: navigate, evaluate JavaScript, read what it requested and logged."""

    def __init__(self, browser: Chromium, session: str) -> None:
        self.browser = browser
        self.session = session

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.browser.send(method, params, self.session)

    def _events(self, *methods: str) -> list[dict[str, Any]]:
        return [e for e in self.browser.events
                if e.get("sessionId") == self.session and e.get("method") in methods]

    def goto(self, url: str, timeout: float = 60.0) -> None:
        """Navigate and wait for the load event."""
        seen = len(self._events("Page.loadEventFired"))
        reply = self.send("Page.navigate", {"url": url})
        if reply.get("errorText"):
            raise RuntimeError(f"navigating to {url}: {reply['errorText']}")
        deadline = time.monotonic() + timeout
        while len(self._events("Page.loadEventFired")) <= seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not finish loading in {timeout} s")
            self.browser.pump(0.2)

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                               "awaitPromise": True})
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression}: {reply['exceptionDetails']}")
        return reply.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float = 60.0) -> Any:
        """Poll ``expression`` until it is truthy (generous: the machine may be loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still falsy after {timeout} s")
            self.browser.pump(0.25)

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self._events("Network.requestWillBeSent")]

    def failed_requests(self) -> list[str]:
        return [str(e["params"].get("errorText")) for e in self._events("Network.loadingFailed")]

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and error-level log entries, as text."""
        out = []
        for event in self._events("Runtime.consoleAPICalled"):
            if event["params"].get("type") in ("error", "assert"):
                out.append(" ".join(str(a.get("value", a.get("description", "")))
                                    for a in event["params"].get("args", [])))
        for event in self._events("Runtime.exceptionThrown"):
            details = event["params"].get("exceptionDetails", {})
            out.append(str(details.get("exception", {}).get("description") or details.get("text")))
        for event in self._events("Log.entryAdded"):
            entry = event["params"].get("entry", {})
            if entry.get("level") == "error":
                out.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}")
        return out

    def screenshot(self, name: str) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        path = artifact_dir() / name
        path.write_bytes(base64.b64decode(data["data"]))
        return path
