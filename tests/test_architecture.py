"""Tests of the import rules and module sizes in ``pyproject.toml`` ([tool.importlinter])."""

from __future__ import annotations

import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import manymodels

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(manymodels.__file__).resolve().parent
MAX_LINES = 600
#: Top-level modules no layer needs to name: the demo script and the bundle's score.py
#: template import nothing of manymodels; monitor is layered by its modules.
UNLAYERED = {"demo", "templates", "monitor"}


def _contracts() -> list[dict[str, object]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return list(config["tool"]["importlinter"]["contracts"])


def test_import_contracts_are_kept() -> None:
    """Check that lint-imports finds every contract kept (no circle, no arrow up a layer)."""
    command = shutil.which("lint-imports", path=os.path.dirname(sys.executable))
    if command is None:
        pytest.fail("lint-imports is missing: pip install -e '.[dev]' installs import-linter")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([command, "--no-cache"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert re.search(r"Contracts: \d+ kept, 0 broken", done.stdout), done.stdout[-2000:]


def test_every_top_level_module_has_a_layer() -> None:
    """Check that the layers contract places every module and package of manymodels."""
    layers = next(c for c in _contracts() if c["type"] == "layers")
    named = {tail.strip().strip("()").split(".")[0]
             for layer in layers["layers"]  # type: ignore[attr-defined]
             for tail in re.split(r"[|:]", str(layer))}
    present = {m.name for m in pkgutil.iter_modules([str(PACKAGE)])}
    assert present - named - UNLAYERED == set()


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.name))
def test_modules_stay_under_the_size_limit(path: Path) -> None:
    """Check that no module is over 600 lines (split it by concern instead)."""
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"
