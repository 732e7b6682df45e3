"""Tests of ``manymodels image``: one serving image per bundle, built and run for real.

The slow test builds the demo bundle's image with the project's command (buildah, vfs
storage, chroot isolation, the cached Debian root filesystem), runs it with podman (runc,
host network), and compares its answers with the host's server. The fast tests check the
parts around it: the pinned serving set, the wheel, the tag, and that ``manymodels serve``
works when nothing but the serving set is importable (what the image holds).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import httpx
import pytest
from builders import NUMERIC, build_bundle
from conftest import answering, free_port
from packaging.utils import canonicalize_name

from manymodels._version import __version__
from manymodels.bundle import SERVING_PACKAGES
from manymodels.errors import BundleError, SpecError
from manymodels.image import (
    SERVE_PACKAGES,
    TRAINING_LIBRARIES,
    Storage,
    build_wheel,
    bundle_digest,
    parse_tag,
    podman_run_command,
    serving_requirements,
)
from manymodels.image._requirements import bundle_pins

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "manymodels"]
#: Import names of the training stack: none may be imported by a serving-only process.
TRAINING_MODULES = ("sklearn", "lightgbm", "skl2onnx", "onnxmltools", "onnx", "statsforecast",
                    "mlflow", "dask", "distributed", "scipy", "joblib")


def _installed_pins() -> dict[str, str]:
    return {str(canonicalize_name(p)): metadata.version(p) for p in SERVING_PACKAGES}


def test_serving_requirements_are_pinned_and_hold_no_training_library() -> None:
    """Check that the serving set pins every package and dependency, and no training one."""
    pins = _installed_pins()
    reqs = serving_requirements(pins)
    for name, version in pins.items():
        assert reqs[name] == version
    for package in ("fastapi", "uvicorn", "starlette", "pydantic-core", "typer", "orjson"):
        assert reqs[package] == metadata.version(package)
    names = set(reqs)
    assert not names & {str(canonicalize_name(t)) for t in TRAINING_LIBRARIES}
    assert "pyarrow" not in names
    assert "pyarrow" in serving_requirements(pins, (*SERVE_PACKAGES, "pyarrow"))


def test_bundle_pins_win_and_a_bundle_without_them_is_refused(tmp_path: Path) -> None:
    """Check that the bundle's own pins are used, and that missing pins are an error."""
    (tmp_path / "requirements.txt").write_text("# comment\nnumpy==1.0.0\nonnxruntime==9.9\n"
                                               "pandas == 2.0.0\n")
    pins = bundle_pins(tmp_path)
    assert pins == {"numpy": "1.0.0", "onnxruntime": "9.9", "pandas": "2.0.0"}
    assert serving_requirements(pins)["numpy"] == "1.0.0"
    (tmp_path / "requirements.txt").write_text("numpy>=1\n")
    with pytest.raises(BundleError, match="not an exact pin"):
        bundle_pins(tmp_path)
    (tmp_path / "requirements.txt").write_text("numpy==1.0\n")
    with pytest.raises(BundleError, match="does not pin onnxruntime, pandas"):
        bundle_pins(tmp_path)


def test_wheel_is_reproducible_and_holds_the_package(tmp_path: Path) -> None:
    """Check that two wheels of the same source are the same bytes, with the CLI entry."""
    first = build_wheel(tmp_path / "a")
    second = build_wheel(tmp_path / "b")
    assert first.name == f"manymodels-{__version__}-py3-none-any.whl"
    assert hashlib.sha256(first.read_bytes()).digest() == \
        hashlib.sha256(second.read_bytes()).digest()
    with zipfile.ZipFile(first) as wheel:
        names = wheel.namelist()
        entry = wheel.read(f"manymodels-{__version__}.dist-info/entry_points.txt").decode()
    assert "manymodels/serve/app.py" in names and "manymodels/serve/ui.html" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    assert "manymodels = manymodels.cli:main" in entry


@pytest.mark.parametrize(("tag", "expected"), [
    ("oj-sales", "oj-sales:7"),
    ("oj-sales:3", "oj-sales:3"),
    ("registry.example.com:5000/team/oj-sales", "registry.example.com:5000/team/oj-sales:7"),
    ("registry.example.com:5000/team/oj-sales:v1.2", "registry.example.com:5000/team/oj-sales:v1.2"),
])
def test_tag_defaults_to_the_bundle_version(tag: str, expected: str) -> None:
    """Check that NAME[:VERSION] is completed with the bundle's version."""
    assert parse_tag(tag, "7") == expected


@pytest.mark.parametrize("tag", ["OJ", "oj sales", "oj:", "oj:bad version", "-oj"])
def test_bad_tag_is_refused_with_the_form(tag: str) -> None:
    """Check that a tag that is not NAME[:VERSION] is a SpecError showing the form."""
    with pytest.raises(SpecError, match=r"is not NAME\[:VERSION\]"):
        parse_tag(tag, "7")


def test_bundle_digest_follows_the_files(tmp_path: Path) -> None:
    """Check that the digest is sha256sum's listing and changes with any file."""
    (tmp_path / "models").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "models" / "a.onnx").write_bytes(b"abc")
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {name}\n" for name, p in
                      [("manifest.json", tmp_path / "manifest.json"),
                       ("models/a.onnx", tmp_path / "models" / "a.onnx")])
    digest = bundle_digest(tmp_path)
    assert digest == hashlib.sha256(listing.encode()).hexdigest()
    (tmp_path / "models" / "a.onnx").write_bytes(b"abd")
    assert bundle_digest(tmp_path) != digest


def test_run_command_uses_runc_host_network_and_lowered_ulimits() -> None:
    """Check the podman call: runc, host network, explicit ulimits, the server's address."""
    command = podman_run_command("oj:1", port=8123, env={"MANYMODELS_WORKERS": "2"},
                                 storage=Storage(root=Path("/s")))
    text = " ".join(command)
    assert "--runtime runc" in text and "--network host" in text
    assert "--storage-driver vfs --root /s" in text
    assert "MANYMODELS_PORT=8123" in text and "MANYMODELS_HOST=127.0.0.1" in text
    assert "MANYMODELS_WORKERS=2" in text
    nofile = [command[i + 1] for i, c in enumerate(command) if c == "--ulimit"]
    assert any(v.startswith("nofile=") for v in nofile)
    assert command[-1] == "oj:1"
    with pytest.raises(SpecError, match="--port"):
        podman_run_command("oj:1", port=0)


def test_missing_tool_is_one_line_and_exit_code_7(tmp_path: Path) -> None:
    """Check that without buildah the build command says how to install it (exit code 7)."""
    bundle, _ = build_bundle(tmp_path / "oj", n_stores=1, rows_per_segment=12)
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}
    proc = subprocess.run([*CLI, "image", "build", str(bundle), "--tag", "oj"],
                          capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 7, proc.stderr
    assert "buildah is not installed" in proc.stderr and "apt-get install" in proc.stderr
    assert "Traceback" not in proc.stderr


_SERVING_ONLY = """
import importlib.abc, json, sys
allowed = set(json.loads(sys.argv[1]))
blocked = []
class ServingOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in sys.stdlib_module_names or top in allowed or top.startswith("_"):
            return None
        blocked.append(name)
        raise ModuleNotFoundError(f"No module named {name!r} (not in the serving image)")
sys.meta_path.insert(0, ServingOnly())
sys.argv = ["manymodels", "serve", *sys.argv[2:]]
from manymodels.cli import main
main()
"""


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle, _ = build_bundle(tmp_path_factory.mktemp("image") / "oj", n_stores=2,
                             rows_per_segment=12)
    (bundle / "requirements.txt").write_text(
        "".join(f"{n}=={v}\n" for n, v in _installed_pins().items()))
    return bundle


def test_serve_runs_with_only_the_serving_set_importable(small_bundle: Path,
                                                        tmp_path: Path) -> None:
    """Check that ``manymodels serve`` starts and scores when only what the image installs
    can be imported: the training stack (and joblib) is never needed to serve."""
    reqs = serving_requirements(bundle_pins(small_bundle))
    tops = {top for top, dists in metadata.packages_distributions().items()
            if any(str(canonicalize_name(d)) in reqs for d in dists)}
    assert not tops & set(TRAINING_MODULES)
    command = [sys.executable, "-c", _SERVING_ONLY, json.dumps(sorted(tops | {"manymodels"})),
               str(small_bundle), "--port", "{port}"]
    row = {c: 1.0 for c in NUMERIC} | {"store": 1, "brand": "tropicana"}
    with answering(command, "/health", "serving-only server", log=tmp_path / "log") as url:
        answer = httpx.post(f"{url}/score", json={"data": [row]}, timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["model"] == ["quantity__store=1__brand=tropicana"]
        assert httpx.get(f"{url}/docs", timeout=30).status_code == 200
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200


# ---------------------------------------------------------------------- the real image
_TOOLS = ("buildah", "podman", "mmdebstrap", "runc", "docker-registry")
_missing = [t for t in _TOOLS if shutil.which(t) is None]


@dataclass(frozen=True)
class _Store:
    """A container store of the test's own: images under ``root``, run state in a short
    path (podman refuses a runroot longer than 50 characters)."""

    root: Path
    runroot: Path

    def options(self) -> list[str]:
        return ["--storage-root", str(self.root), "--storage-runroot", str(self.runroot)]


def _podman(store: _Store, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["podman", "--storage-driver", "vfs", "--root", str(store.root),
                           "--runroot", str(store.runroot), *args], capture_output=True,
                          text=True, check=False, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.stderr}")
    return proc.stdout


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[_Store]:
    """The test's store, removed afterwards with every image and container in it."""
    made = _Store(tmp_path / "containers", Path(tempfile.mkdtemp(prefix="mm-image-")))
    try:
        yield made
    finally:
        _podman(made, "rm", "--all", "--force", "--time", "2", check=False)
        shutil.rmtree(made.root, ignore_errors=True)
        shutil.rmtree(made.runroot, ignore_errors=True)


def _demo_bundle(tmp_path: Path) -> Path:
    """The demo's bundle made by the demo's commands (the fast trainer, to stay quick)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}
    for args in (["train", "--data", str(REPO / "datasets" / "oj_sales.parquet"),
                  "--segmenter", "store_brand", "--trainer", "fast", "--run-id", "demo",
                  "--out", str(tmp_path / "runs"), "--quiet"],
                 ["package", str(tmp_path / "runs" / "demo"), "--name", "oj-sales", "--out",
                  str(tmp_path / "bundles" / "oj-sales")]):
        proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env,
                              cwd=REPO, check=False)
        assert proc.returncode == 0, proc.stderr
    return tmp_path / "bundles" / "oj-sales"


def _build(bundle: Path, tag: str, store: _Store, *options: str) -> dict[str, object]:
    proc = subprocess.run([*CLI, "image", "build", str(bundle), "--tag", tag, "--json",
                           *store.options(), *options], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@contextlib.contextmanager
def _registry(tmp_path: Path) -> Iterator[str]:
    """A real OCI registry (Debian's docker-registry) on a loopback port, plain HTTP."""
    config = tmp_path / "registry.yml"
    port = free_port()
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{tmp_path / 'registry'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(config)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v2/", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert registry.poll() is None and time.monotonic() < deadline, \
                "docker-registry did not start"
            time.sleep(0.3)
        yield f"127.0.0.1:{port}"
    finally:
        registry.terminate()
        registry.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} (.ci/run installs them)")
@pytest.mark.skipif(os.geteuid() != 0, reason="buildah with the vfs driver and chroot runs as root")
def test_demo_image_serves_like_the_host(tmp_path: Path, store: _Store) -> None:
    """Check that the demo bundle's image builds with the project's command, stays under
    500 MB, says what it serves, holds no training library, answers /health and its health
    check, scores like the host's server, and that a rebuild gives the same layers and
    pushes to a registry."""
    bundle = _demo_bundle(tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    built = _build(bundle, "oj-sales-test", store)
    tag = f"oj-sales-test:{manifest['version']}"
    assert built["tag"] == tag
    assert int(built["size_bytes"]) <= 500_000_000, built["size_bytes"]  # type: ignore[call-overload]
    labels = json.loads(_podman(store, "image", "inspect", "--format", "{{json .Labels}}", tag))
    assert labels["io.manymodels.bundle.name"] == "oj-sales"
    assert labels["io.manymodels.bundle.version"] == manifest["version"]
    assert labels["io.manymodels.bundle.sha256"] == bundle_digest(bundle)
    assert labels["io.manymodels.version"] == __version__
    assert labels["org.opencontainers.image.title"] == "oj-sales"

    port = free_port()
    proc = subprocess.run([*CLI, "image", "run", tag, "--port", str(port), "--detach", "--name",
                           "mm-image-test", *store.options()], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, _podman(store, "logs", "mm-image-test", check=False)
        time.sleep(0.5)
    assert _podman(store, "healthcheck", "run", "mm-image-test", check=False) == ""
    rows = [{"store": 2, "brand": "tropicana", "week_of_year": 17, "price": 2.6, "feat": 1,
             "income": 10.5, "age60": 0.15, "ethnic": 0.1, "hh_size": 2.6},
            {"store": 9999, "brand": "dominicks", "week_of_year": 17, "price": 1.7, "feat": 0,
             "income": 10.5, "age60": 0.15, "ethnic": 0.1, "hh_size": 2.6}]
    in_image = httpx.post(f"{url}/score", json={"data": rows}, timeout=30)
    assert in_image.status_code == 200, in_image.text
    with answering([*CLI, "serve", str(bundle), "--port", "{port}"], "/health",
                   "host server") as host_url:
        on_host = httpx.post(f"{host_url}/score", json={"data": rows}, timeout=30)
    assert in_image.json() == on_host.json()

    probe = ("import importlib.metadata as m, importlib.util as u, json;"
             f"print(json.dumps([[x for x in {list(TRAINING_MODULES)!r} if u.find_spec(x)],"
             "sorted(d.metadata['Name'] for d in m.distributions())]))")
    found, dists = json.loads(_podman(store, "exec", "mm-image-test", "python", "-c", probe))
    assert found == []
    assert "manymodels" in dists and "onnxruntime" in dists
    assert not {str(canonicalize_name(d)) for d in dists} & {
        str(canonicalize_name(t)) for t in TRAINING_LIBRARIES}
    _podman(store, "rm", "--force", "--time", "2", "mm-image-test")

    with _registry(tmp_path) as registry:
        again = _build(bundle, f"{registry}/oj-sales", store, "--push", "--no-tls-verify")
        assert again["layers"] == built["layers"]
        assert again["pushed"] == f"docker://{registry}/oj-sales:{manifest['version']}"
        accept = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        pushed = httpx.get(f"http://{registry}/v2/oj-sales/manifests/{manifest['version']}",
                           headers=accept, timeout=30).json()
        config = httpx.get(f"http://{registry}/v2/oj-sales/blobs/{pushed['config']['digest']}",
                           timeout=30).json()
    assert config["config"]["Labels"]["io.manymodels.bundle.sha256"] == bundle_digest(bundle)
    assert len(pushed["layers"]) == len(built["layers"])  # type: ignore[arg-type]
