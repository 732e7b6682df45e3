"""What an image installs: the serving requirement set, pinned, and a wheel of manymodels.

The image runs ``manymodels serve`` and nothing else, so it gets the packages serving
imports (the bundle's own ``requirements.txt`` and the web stack), each pinned with every
dependency it pulls in to the version installed here, where the bundle was built and
checked. The training stack (scikit-learn, LightGBM, MLflow, Dask) never enters it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import zipfile
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

import manymodels
from manymodels._version import __version__
from manymodels.bundle import SERVING_PACKAGES
from manymodels.errors import BundleError, ImageError

__all__ = ["SERVE_PACKAGES", "TRAINING_LIBRARIES", "build_wheel", "bundle_pins",
           "serving_requirements"]

#: What ``manymodels serve`` needs besides the bundle's own requirements: the web stack,
#: the command line and token checks. pyarrow (the prediction log) is left out unless asked for.
SERVE_PACKAGES = ("fastapi", "uvicorn[standard]", "pydantic", "pydantic-settings", "orjson",
                  "prometheus-client", "psutil", "typer", "rich", "pyyaml", "PyJWT[crypto]",
                  "cryptography", "swagger-ui-py")

#: Distributions that must never be in a serving image (the test imports check the same).
TRAINING_LIBRARIES = ("scikit-learn", "lightgbm", "skl2onnx", "onnxmltools", "onnx",
                      "statsforecast", "mlflow", "dask", "distributed", "scipy")

#: A fixed time for the wheel's entries (1980-01-01, zip's earliest), so it is reproducible.
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def bundle_pins(bundle: Path) -> dict[str, str]:
    """The exact serving pins a bundle recorded in its ``requirements.txt``."""
    path = bundle / "requirements.txt"
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise BundleError(f"{bundle} has no readable requirements.txt ({exc}); repack it "
                          f"with `manymodels package`") from exc
    pins: dict[str, str] = {}
    for line in lines:
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*==\s*([^\s;]+)", text)
        if match is None:
            raise BundleError(f"{path}: {text!r} is not an exact pin (name==version)")
        pins[canonicalize_name(match.group(1))] = match.group(2)
    missing = [p for p in SERVING_PACKAGES if canonicalize_name(p) not in pins]
    if missing:
        raise BundleError(f"{path} does not pin {', '.join(missing)}; repack the bundle with "
                          f"`manymodels package`")
    return pins


def serving_requirements(pins: Mapping[str, str],
                         packages: Iterable[str] = SERVE_PACKAGES) -> dict[str, str]:
    """Every distribution serving needs, name → exact version, dependencies included.

    ``pins`` (the bundle's) win; everything else takes the version installed here, so
    the same bundle and the same installed versions always give the same list.
    """
    env = {key: str(value) for key, value in default_environment().items()}
    wanted = [Requirement(p) for p in (*pins, *packages)]
    chosen: dict[str, str] = {}
    while wanted:
        req = wanted.pop()
        name = canonicalize_name(req.name)
        if name in chosen and not req.extras:
            continue
        version = pins.get(name) or _installed(req.name)
        chosen[name] = version
        for dep in _dependencies(req.name, req.extras, env):
            if canonicalize_name(dep.name) not in chosen or dep.extras:
                wanted.append(dep)
    banned = sorted(set(chosen) & {canonicalize_name(t) for t in TRAINING_LIBRARIES})
    if banned:
        raise ImageError(f"the serving requirements pull in training libraries: "
                         f"{', '.join(banned)}")
    return dict(sorted(chosen.items()))


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError as exc:
        raise ImageError(f"{name} is not installed here, so its version for the image is "
                         f"unknown: pip install {name}") from exc


def _dependencies(name: str, extras: Iterable[str], env: dict[str, str]) -> list[Requirement]:
    """The requirements of installed ``name`` (with ``extras``) that apply on Linux."""
    found: list[Requirement] = []
    for text in metadata.requires(name) or []:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None:
            found.append(req)
            continue
        for extra in ("", *extras):
            if req.marker.evaluate({**env, "sys_platform": "linux",
                                    "platform_system": "Linux", "extra": extra}):
                found.append(req)
                break
    return found


def build_wheel(out_dir: Path) -> Path:
    """A wheel of the manymodels installed here, written into ``out_dir``.

    Built from the package's own files (an editable checkout or an installed copy alike),
    with fixed entry times and sorted names: the same source gives the same bytes. It
    declares no dependencies: the image installs the pinned serving set beside it.
    """
    source = Path(manymodels.__file__).parent
    version = __version__
    if version.startswith("0+"):
        raise ImageError("manymodels has no installed version (a source tree on PYTHONPATH); "
                         "pip install -e . first")
    dist = f"manymodels-{version}.dist-info"
    files: dict[str, bytes] = {}
    for path in sorted(source.rglob("*")):
        rel = path.relative_to(source)
        if path.is_file() and "__pycache__" not in rel.parts and path.suffix != ".pyc":
            files[f"manymodels/{rel.as_posix()}"] = path.read_bytes()
    files[f"{dist}/METADATA"] = (f"Metadata-Version: 2.1\nName: manymodels\nVersion: {version}"
                                 f"\nSummary: manymodels, built for a serving image\n").encode()
    files[f"{dist}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: manymodels.image\n"
                              b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    files[f"{dist}/entry_points.txt"] = b"[console_scripts]\nmanymodels = manymodels.cli:main\n"
    record = [f"{name},sha256={_b64(hashlib.sha256(data).digest())},{len(data)}"
              for name, data in files.items()]
    files[f"{dist}/RECORD"] = ("\n".join([*record, f"{dist}/RECORD,,"]) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, _ZIP_TIME)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    out_dir.mkdir(parents=True, exist_ok=True)
    wheel = out_dir / f"manymodels-{version}-py3-none-any.whl"
    wheel.write_bytes(buffer.getvalue())
    return wheel


def _b64(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
