"""Tests of manymodels.serve.docs: /docs renders in a real browser with no network."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from builders import build_bundle
from test_serve import Running

from manymodels.serve import ServeSettings


def test_docs_render_with_the_network_unreachable(tmp_path: Path) -> None:
    """Check that headless Chromium renders /docs (every route listed) from the server's
    own assets while every host but 127.0.0.1 is unresolvable."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "headless Chromium is needed (.ci/run installs the Debian package)"
    root, _ = build_bundle(tmp_path / "b", n_stores=1, rows_per_segment=6)
    running = Running(ServeSettings(bundle=str(root)))
    try:
        page = running.client.get("/docs").text
        sources = re.findall(r"""(?:src|href)=["']([^"']+)""", page)
        assert sources and all(s.startswith("/docs/assets/") for s in sources), sources
        assert running.client.get("/docs/assets/swagger-ui-bundle.js").status_code == 200
        profile = tmp_path / "profile"
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND, "
             "EXCLUDE 127.0.0.1", "--virtual-time-budget=15000", "--dump-dom",
             f"{running.url}/docs"],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        running.stop()
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'class="swagger-ui' in dom.stdout, dom.stdout[:2000]
    for route in ("/score", "/invocations", "/v2/models/{name}/infer"):
        assert route in dom.stdout, f"{route} not rendered"
