"""Build the image of a bundle with buildah: base, serving packages, manymodels, the bundle.

Four layers, each committed with a fixed time so the same inputs give the same layer:

1. the base: the cached Debian root filesystem (:mod:`._rootfs`) or ``--from IMAGE``;
2. a virtual environment at ``/opt/manymodels`` with the pinned serving requirements,
   installed from a wheelhouse on the host (no network inside the build); this image is
   kept in the store under a name made of its inputs, so the next build starts from it;
3. manymodels itself, from a wheel of the package installed here (never from PyPI);
4. the bundle at ``/bundle``, with the configuration: ``manymodels serve`` as the command,
   ``MANYMODELS_*`` variables, a health check, and labels naming what it serves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from manymodels._version import __version__
from manymodels.errors import SpecError
from manymodels.runtime import read_manifest, sha256_file

from ._requirements import SERVE_PACKAGES, build_wheel, bundle_pins, serving_requirements
from ._rootfs import RootfsSpec, base_tarball
from ._tools import Steps, Storage, require, run_tool, ulimits
from ._wheelhouse import PythonTarget, fill_wheelhouse

__all__ = ["BUNDLE_DIR", "PORT", "VENV", "ImageResult", "build_image", "bundle_digest",
           "HEALTH_COMMAND", "image_labels", "image_size", "parse_tag", "push_image"]

BUNDLE_DIR = "/bundle"
VENV = "/opt/manymodels"
PORT = 8080
#: The base layers' time: shared by every bundle's image, so it cannot be a bundle's.
_BASE_TIME = 0
_TAG = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
                  r"(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*")
_VERSION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
#: The image's health check, ``/opt/manymodels/bin/manymodels-health``: exit 0 when the
#: server's ``/health`` answers 200 (also usable as a Kubernetes exec probe).
HEALTH_SCRIPT = f"""#!{VENV}/bin/python
\"\"\"Exit 0 when the manymodels server in this container answers /health with 200.\"\"\"
import os
import ssl
import sys
import urllib.request

host = os.environ.get("MANYMODELS_HOST", "127.0.0.1")
host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
scheme = "https" if os.environ.get("MANYMODELS_SSL_CERTFILE") else "http"
url = f"{{scheme}}://{{host}}:{{os.environ.get('MANYMODELS_PORT', '8000')}}/health"
try:
    with urllib.request.urlopen(url, timeout=4,
                                context=ssl._create_unverified_context()) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError as exc:
    print(f"{{url}}: {{exc}}", file=sys.stderr)
    sys.exit(1)
"""
HEALTH_COMMAND = f"{VENV}/bin/manymodels-health"


@dataclass(frozen=True)
class ImageResult:
    """What was built: the tag, the image id, its size and labels, the time of each step."""

    tag: str
    image_id: str
    size_bytes: int
    labels: dict[str, str]
    layers: list[str]
    seconds: dict[str, float] = field(default_factory=dict)
    pushed: str | None = None


def parse_tag(tag: str, default_version: str) -> str:
    """``NAME[:VERSION]`` as a full reference; the bundle's version when none is given."""
    name, colon, version = tag.rpartition(":") if _has_version(tag) else (tag, "", "")
    version = version if colon else default_version
    if not _TAG.fullmatch(name) or not _VERSION.fullmatch(version):
        raise SpecError(f"--tag {tag!r} is not NAME[:VERSION] (lower-case name such as "
                        f"oj-sales or registry.example.com/team/oj-sales, version of "
                        f"letters, digits, '.', '_' and '-')")
    return f"{name}:{version}"


def _has_version(tag: str) -> bool:
    last = tag.rsplit("/", 1)[-1]
    return ":" in last


def bundle_digest(bundle: Path) -> str:
    """The sha256 of a bundle's contents: of the lines ``<sha256>  <path>`` of every file,
    sorted by path bytes (``find . -type f | sed 's#^\\./##' | LC_ALL=C sort | xargs sha256sum``)."""
    files = sorted((p.relative_to(bundle).as_posix(), p) for p in bundle.rglob("*") if p.is_file())
    lines = [f"{sha256_file(path)}  {rel}\n" for rel, path in files]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def image_labels(bundle: Path, digest: str) -> dict[str, str]:
    """The labels (and OCI annotations) that say what an image serves."""
    manifest = read_manifest(bundle)
    version = str(manifest.raw.get("version") or "")
    return {
        "org.opencontainers.image.title": manifest.name,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.created": str(manifest.raw.get("created_at") or ""),
        "org.opencontainers.image.description":
            f"manymodels serve: bundle {_bundle_title(manifest.name, version)}",
        "io.manymodels.bundle.name": manifest.name,
        "io.manymodels.bundle.version": version,
        "io.manymodels.bundle.sha256": digest,
        "io.manymodels.bundle.models": str(len(manifest.models)),
        "io.manymodels.version": __version__,
    }


def _bundle_title(name: str, version: str) -> str:
    return f"{name} version {version}" if version else name


def _created(bundle: Path) -> int:
    """The bundle's creation time in epoch seconds: the time of its image's top layer."""
    text = str(read_manifest(bundle).raw.get("created_at") or "")
    try:
        return int(dt.datetime.fromisoformat(text).timestamp())
    except ValueError:
        return _BASE_TIME


def build_image(bundle: Path, tag: str, *, base_image: str | None = None,
                prediction_log: bool = False, storage: Storage | None = None,
                cache: Path | None = None, image_format: str = "docker",
                report: Callable[[str], None] | None = None) -> ImageResult:
    """Build the serving image of ``bundle`` and tag it ``tag`` (``NAME[:VERSION]``).

    ``base_image`` replaces the Debian root filesystem with an image from a registry
    (it needs ``python3``). ``prediction_log`` adds pyarrow, which ``--log-predictions``
    needs. ``storage`` is where buildah keeps the layers (podman runs from the same).
    """
    storage = storage or Storage()
    require("buildah")
    manifest = read_manifest(bundle)
    reference = parse_tag(tag, str(manifest.raw.get("version") or "latest"))
    packages = (*SERVE_PACKAGES, "pyarrow") if prediction_log else SERVE_PACKAGES
    requirements = serving_requirements(bundle_pins(bundle), packages)
    steps = Steps(report)
    buildah = ["buildah", *storage.args()]
    with tempfile.TemporaryDirectory(prefix="manymodels-image-") as scratch:
        work = Path(scratch)
        with steps.timed("base"):
            base = _base(buildah, base_image, cache)
        with steps.timed("serving packages"):
            deps = _deps(buildah, base, requirements, cache, work)
        with steps.timed("manymodels and the bundle"):
            image_id = _top(buildah, deps, bundle, reference, work, image_format,
                            requirements, cache)
    info = json.loads(run_tool("buildah inspect", [*buildah, "inspect", "--type", "image",
                                                   image_id]))
    return ImageResult(tag=reference, image_id=image_id, size_bytes=image_size(storage, image_id),
                       labels=dict(info.get("OCIv1", {}).get("config", {}).get("Labels") or {}),
                       layers=list(info.get("OCIv1", {}).get("rootfs", {}).get("diff_ids") or []),
                       seconds=steps.seconds)


def image_size(storage: Storage, image: str) -> int:
    """The image's size in bytes, as podman counts it (all layers, uncompressed)."""
    out = run_tool("podman image inspect", ["podman", *storage.args(), "image", "inspect",
                                            "--format", "{{.Size}}", image])
    return int(out.strip())


def _exists(buildah: list[str], image: str) -> bool:
    out = run_tool("buildah images", [*buildah, "images", "--quiet", "--noheading", image],
                   check=False)
    return bool(out.strip())


def _from(buildah: list[str], image: str, pull: str = "never") -> str:
    return run_tool(f"buildah from {image}", [*buildah, "from", "--quiet", f"--pull={pull}",
                                              "--isolation", "chroot", *ulimits(),
                                              image]).strip()


def _commit(buildah: list[str], container: str, image: str, timestamp: int,
            image_format: str = "oci", extra: Sequence[str] = ()) -> str:
    return run_tool(f"buildah commit {image}",
                    [*buildah, "commit", "--quiet", "--rm", "--timestamp", str(timestamp),
                     "--format", image_format, *extra, container, image]).strip()


def _remove(buildah: list[str], container: str) -> None:
    run_tool("buildah rm", [*buildah, "rm", container], check=False)


def _run(buildah: list[str], container: str, step: str, command: Sequence[str],
         volumes: Sequence[str] = ()) -> str:
    return run_tool(step, [*buildah, "run", "--isolation", "chroot", "--network", "host",
                           *(f"--volume={v}" for v in volumes), container, "--",
                           *command])


def _base(buildah: list[str], base_image: str | None, cache: Path | None) -> str:
    """The base image's id: pulled (``--from``) or imported from the cached root filesystem."""
    if base_image is not None:
        container = _from(buildah, base_image, pull="missing")
        try:
            info = json.loads(run_tool("buildah inspect", [*buildah, "inspect", container]))
        finally:
            _remove(buildah, container)
        return str(info["FromImageID"])
    tarball = base_tarball(RootfsSpec(), cache)
    name = f"localhost/manymodels-base:{tarball.stem.rsplit('-', 1)[-1]}"
    if not _exists(buildah, name):
        container = run_tool("buildah from scratch", [*buildah, "from", "--quiet",
                                                      "scratch"]).strip()
        try:
            run_tool("adding the root filesystem", [*buildah, "add", "--quiet", container,
                                                    str(tarball), "/"])
            _commit(buildah, container, name, _BASE_TIME)
        except BaseException:
            _remove(buildah, container)
            raise
    return name


def _deps(buildah: list[str], base: str, requirements: dict[str, str], cache: Path | None,
          work: Path) -> str:
    """The image with the serving packages, built once per base and requirement set."""
    text = "".join(f"{name}=={version}\n" for name, version in requirements.items())
    base_id = run_tool("buildah images", [*buildah, "images", "--quiet", "--noheading",
                                          "--no-trunc", base]).split()[0]
    key = hashlib.sha256(f"{base_id}\n{text}".encode()).hexdigest()[:16]
    name = f"localhost/manymodels-serving:{key}"
    if _exists(buildah, name):
        return name
    container = _from(buildah, base)
    try:
        wheelhouse, pip = _wheelhouse(buildah, container, requirements, cache)
        (work / "requirements.txt").write_text(text)
        _run(buildah, container, "installing the serving packages", [
            "env", "SOURCE_DATE_EPOCH=0", "sh", "-c",
            f"python3 -m venv --without-pip {VENV} && {VENV}/bin/python /wheels/{pip}/pip "
            f"install {_PIP_OPTIONS} --no-index --find-links /wheels "
            f"--requirement /context/requirements.txt"],
            volumes=[f"{wheelhouse}:/wheels:ro", f"{work}:/context:ro"])
        _commit(buildah, container, name, _BASE_TIME)
    except BaseException:
        _remove(buildah, container)
        raise
    return name


#: pip's options for every install: the set is pinned and complete, nothing is fetched.
_PIP_OPTIONS = "--quiet --no-deps --no-cache-dir --disable-pip-version-check --no-input"


def _wheelhouse(buildah: list[str], container: str, requirements: dict[str, str],
                cache: Path | None) -> tuple[Path, str]:
    """The wheelhouse for the python3 of ``container`` and the name of the pip wheel in it."""
    target = PythonTarget.parse(_run(buildah, container, "reading the base's python3",
                                     ["python3", "-c", PythonTarget.PROBE]))
    return fill_wheelhouse(requirements, target, cache)


def _top(buildah: list[str], deps: str, bundle: Path, reference: str, work: Path,
         image_format: str, requirements: dict[str, str], cache: Path | None) -> str:
    """manymodels and the bundle on top of ``deps``, configured, committed as ``reference``."""
    wheel = build_wheel(work / "wheel")
    labels = image_labels(bundle, bundle_digest(bundle))
    container = _from(buildah, deps)
    try:
        wheelhouse, pip = _wheelhouse(buildah, container, requirements, cache)
        _run(buildah, container, "installing manymodels", [
            "env", "SOURCE_DATE_EPOCH=0", f"{VENV}/bin/python", f"/wheels/{pip}/pip", "install",
            *_PIP_OPTIONS.split(), f"/manymodels/{wheel.name}"],
            volumes=[f"{wheelhouse}:/wheels:ro", f"{wheel.parent}:/manymodels:ro"])
        run_tool("copying the bundle", [*buildah, "copy", "--quiet", "--chown", "0:0",
                                        container, str(bundle), BUNDLE_DIR])
        (work / "manymodels-health").write_text(HEALTH_SCRIPT)
        run_tool("adding the health check", [*buildah, "copy", "--quiet", "--chown", "0:0",
                                             "--chmod", "0755", container,
                                             str(work / "manymodels-health"), HEALTH_COMMAND])
        # the server runs as nobody; files packed through a private temp file are 0600
        _run(buildah, container, "making the bundle readable", ["chmod", "-R", "a+rX",
                                                                 BUNDLE_DIR])
        run_tool("configuring the image", [*buildah, "config", *_config(labels, image_format),
                                           container])
        previous = _image_id(buildah, reference)
        image_id = _commit(buildah, container, reference, _created(bundle), image_format)
    except BaseException:
        _remove(buildah, container)
        raise
    if previous and previous != image_id:  # the tag moved: drop the image it leaves untagged
        run_tool("removing the previous image", [*buildah, "rmi", previous], check=False)
    return image_id


def _image_id(buildah: list[str], image: str) -> str | None:
    out = run_tool("buildah images", [*buildah, "images", "--quiet", "--noheading", "--no-trunc",
                                      image], check=False).split()
    return out[0] if out else None


def _config(labels: dict[str, str], image_format: str) -> list[str]:
    """``buildah config`` options: the command, its variables, health check and labels."""
    options = [
        "--env", f"PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--env", "PYTHONDONTWRITEBYTECODE=1", "--env", "PYTHONUNBUFFERED=1",
        # the server runs as nobody, whose home does not exist; libraries write under $HOME
        "--env", "HOME=/tmp",
        "--env", f"MANYMODELS_BUNDLE={BUNDLE_DIR}", "--env", "MANYMODELS_HOST=0.0.0.0",
        "--env", f"MANYMODELS_PORT={PORT}", "--port", f"{PORT}/tcp", "--workingdir", "/",
        "--user", "65534:65534", "--entrypoint", "[]", "--cmd", '["manymodels", "serve"]',
        "--healthcheck", f"CMD {HEALTH_COMMAND}",
        "--healthcheck-interval", "30s", "--healthcheck-timeout", "5s",
        "--healthcheck-start-period", "60s", "--healthcheck-retries", "3",
        "--created-by", f"manymodels image build (manymodels {__version__})"]
    for key, value in labels.items():
        options += ["--label", f"{key}={value}"]
        if image_format == "oci":
            options += ["--annotation", f"{key}={value}"]
    return options


def push_image(reference: str, destination: str | None = None, *,
               storage: Storage | None = None, tls_verify: bool = True) -> str:
    """Push ``reference`` to its registry (or to ``destination``, a transport reference
    such as ``docker://registry.example.com/oj-sales:3``); returns where it went."""
    storage = storage or Storage()
    target = destination or f"docker://{reference}"
    run_tool(f"pushing {reference} to {target}",
             ["buildah", *storage.args(), "push", "--quiet", f"--tls-verify={str(tls_verify).lower()}",
              reference, target])
    return target
