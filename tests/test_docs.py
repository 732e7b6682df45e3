"""Tests of the documentation: /docs of a running server renders with no network
(manymodels.serve.docs), and the documentation site (docs/, mkdocs.yml) has a generated
reference that lists every command, setting, route and error of the code."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import typer.main
import yaml
from builders import build_bundle
from test_serve import Running

import manymodels.errors as mm_errors
from manymodels.cli import app as cli_app
from manymodels.cli import exit_code_for
from manymodels.serve import ServeSettings, create_app
from manymodels.serve import errors as serve_errors
from manymodels.serve.settings import AuthSettings, BatchDefaults, BatchSettings

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    """docs/gen_reference.py, the script mkdocs-gen-files runs at every build."""
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _headings(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("## ")]


def _typer_commands() -> list[tuple[str, Any]]:
    found = []

    def walk(name: str, command: Any) -> None:
        found.append((name, command))
        for sub, child in getattr(command, "commands", {}).items():
            walk(f"{name} {sub}", child)

    walk("manymodels", typer.main.get_command(cli_app))
    return found


def test_cli_reference_lists_every_command_and_option(gen: ModuleType) -> None:
    """Check that the CLI reference has a section per command of the Typer app and names
    every option and argument of each."""
    page = gen.cli_markdown()
    sections = re.split(r"^## ", page, flags=re.M)[1:]
    by_name = {section.split("`")[1]: section for section in sections}
    commands = _typer_commands()
    assert len(commands) > 30
    missing = [name for name, _ in commands if name not in by_name]
    assert not missing, f"commands missing from reference/cli.md: {missing}"
    for name, command in commands:
        for param in command.params:
            names = [f"`{opt}`" for opt in param.opts] if param.param_type_name == "option" \
                else [f"`{param.human_readable_name}`"]
            assert any(n in by_name[name] for n in names), f"{name}: {param.name} not documented"


def test_settings_reference_lists_every_field_and_variable(gen: ModuleType) -> None:
    """Check that the settings reference has a row per field of ServeSettings and its
    sections (AuthSettings, BatchSettings and its defaults), with its environment variable
    and its docstring."""
    page = gen.settings_markdown()
    expected = [(name, f"MANYMODELS_{name.upper()}") for name in ServeSettings.model_fields
                if name not in ("auth", "rollout", "batch")]
    expected += [("rollout.poll_seconds", "MANYMODELS_ROLLOUT__POLL_SECONDS"),
                 ("rollout.mirror.min_requests", "MANYMODELS_ROLLOUT__MIRROR__MIN_REQUESTS")]
    expected += [(f"auth.{name}", f"MANYMODELS_AUTH__{name.upper()}")
                 for name in AuthSettings.model_fields]
    expected += [(f"batch.{name}", f"MANYMODELS_BATCH__{name.upper()}")
                 for name in BatchSettings.model_fields if name != "defaults"]
    expected += [(f"batch.defaults.{name}", f"MANYMODELS_BATCH__DEFAULTS__{name.upper()}")
                 for name in BatchDefaults.model_fields]
    assert len(expected) > 35
    rows = {line.split("`")[1]: line for line in page.splitlines() if line.startswith("| `")}
    for field, variable in expected:
        assert field in rows, f"setting {field} missing from reference/settings.md"
        assert f"`{variable}`" in rows[field], rows[field]
        assert rows[field].rstrip(" |").split("|")[-1].strip(), f"{field} has no description"


def test_http_reference_lists_every_route_of_a_served_bundle(gen: ModuleType,
                                                               tmp_path: Path) -> None:
    """Check that the HTTP reference has a section per operation of the OpenAPI document
    of an application serving a real bundle."""
    root, _ = build_bundle(tmp_path / "b", n_stores=1, rows_per_segment=6)
    document = create_app(ServeSettings(bundle=str(root))).openapi()  # type: ignore[attr-defined]
    operations = {(method.upper(), path) for path, ops in document["paths"].items()
                  for method in ops}
    assert len(operations) > 25
    page = gen.http_markdown()
    documented = {tuple(line[3:].replace("`", "").split(" ", 1)) for line in _headings(page)}
    documented = {(method, path.split(" {#")[0]) for method, path in documented}
    assert operations - documented == set(), "routes missing from reference/http.md"
    assert documented - operations == set(), "reference/http.md lists routes the app lacks"


def test_errors_reference_gives_each_class_its_exit_code_and_status(gen: ModuleType) -> None:
    """Check that every public error class is in the errors reference with the exit code
    the CLI uses and the status the server answers."""
    page = gen.errors_markdown()
    classes = [getattr(module, name) for module in (mm_errors, serve_errors)
               for name in module.__all__ if isinstance(getattr(module, name), type)
               and issubclass(getattr(module, name), mm_errors.ManyModelsError)]
    assert len(classes) > 20
    for cls in classes:
        row = next((line for line in page.splitlines() if f"`{cls.__name__}`" in line), None)
        assert row is not None, f"{cls.__name__} missing from reference/errors.md"
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        instance = cls.__new__(cls)
        assert cells[1] == f"`{cls.code}`", row
        assert cells[2] == str(exit_code_for(instance)), row
        assert cells[3] == str(serve_errors.status_for(instance)), row


def _nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return [page for item in nav for page in _nav_pages(item)]


def test_site_nav_has_the_guide_reference_and_design_pages(gen: ModuleType) -> None:
    """Check that mkdocs.yml's nav holds a guide page per stage, every generated reference
    page, the design pages, and only pages that exist or are generated."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = _nav_pages(config["nav"])
    for stage in ("segment", "train", "forecast", "package", "serve", "rollout", "auth",
                  "observe", "batch", "retrain", "fleet"):
        assert f"guide/{stage}.md" in pages, stage
    generated = set(gen.PAGES) | set(gen.python_pages())
    assert generated <= set(pages), generated - set(pages)
    assert {"design/architecture.md", "design/performance.md"} <= set(pages)
    missing = [p for p in pages if p not in generated and not (ROOT / "docs" / p).is_file()]
    assert not missing, missing


def test_readme_is_a_front_door() -> None:
    """Check that README.md stays short, opens with the two set-up commands, shows the six
    commands, and links only to files that exist."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    first_block = text.split("```bash", 1)[1].split("```", 1)[0]
    assert re.findall(r"^make (\w+)", first_block, flags=re.M) == ["demo", "test"]
    for command in ("train", "package", "validate", "inspect", "serve", "batch"):
        assert f"manymodels {command} " in text, command
    links = re.findall(r"\]\(([^)#]+)", text)
    assert links and all((ROOT / link).exists() for link in links), \
        [link for link in links if not (ROOT / link).exists()]


@pytest.mark.slow
def test_site_builds_with_strict_checks(tmp_path: Path) -> None:
    """Check that `mkdocs build --strict` (broken links, anchors, pages left out of the
    nav, docstring warnings) passes and writes the generated reference pages."""
    mkdocs = Path(sys.executable).with_name("mkdocs")
    if not mkdocs.exists():
        pytest.skip("mkdocs is not installed (the dev extra brings it)")
    done = subprocess.run([str(mkdocs), "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False,
                          env={"PATH": str(mkdocs.parent), "PYTHONPATH": str(ROOT),
                               "NO_MKDOCS_2_WARNING": "1", "DISABLE_MKDOCS_2_WARNING": "true",
                               "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr[-3000:]
    for page in ("reference/cli", "reference/settings", "reference/http", "reference/errors",
                 "reference/python/manymodels.runtime"):
        html = (tmp_path / "site" / page / "index.html").read_text()
        assert "manymodels" in html, page


def test_serving_readme_names_only_real_settings() -> None:
    """Check that every setting serving/README.md's table names is a field of
    ServeSettings (or its auth section), so the short page cannot drift from the code."""
    table = [line for line in (ROOT / "serving" / "README.md").read_text().splitlines()
             if line.startswith("| `")]
    named = {name for line in table for name in re.findall(r"`([a-z_.]+)`", line.split("|")[1])}
    assert len(named) > 20
    fields = set(ServeSettings.model_fields) | {f"auth.{n}" for n in AuthSettings.model_fields}
    assert named <= fields, named - fields
