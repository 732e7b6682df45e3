"""The base of an image when no registry is reachable: a Debian root filesystem with python3.

``mmdebstrap`` builds it from the Debian package repository (the minbase variant plus
python3, documentation and translations left out) as a tar file, kept in the cache under
a name made of everything that shapes it, so the next build reuses it. Files carry a
fixed time (``SOURCE_DATE_EPOCH``), so the same packages give the same tar.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

from manymodels.errors import ImageError
from manymodels.storage import cache_root

from ._tools import run_tool

__all__ = ["DEFAULT_MIRROR", "DEFAULT_SUITE", "RootfsSpec", "base_tarball"]

DEFAULT_SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

#: What a serving image leaves out of every Debian package (the copyright files stay).
_DPKG_OPTIONS = ("path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
                 "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
                 "path-exclude=/usr/share/locale/*",
                 "path-include=/usr/share/locale/locale.alias")


class RootfsSpec:
    """The inputs of a base root filesystem; its cache name is their digest."""

    def __init__(self, suite: str = DEFAULT_SUITE, mirror: str = DEFAULT_MIRROR,
                 packages: tuple[str, ...] = ("python3",)) -> None:
        self.suite = suite
        self.mirror = mirror
        self.packages = packages

    def command(self, out: Path) -> list[str]:
        """The mmdebstrap call that writes this root filesystem to ``out`` (a tar)."""
        return ["mmdebstrap", "--variant=minbase", "--mode=root", "--format=tar",
                f"--include={','.join(self.packages)}",
                # merged /usr set up by a hook, not by the usrmerge package (and its Perl)
                "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
                *(f"--dpkgopt={option}" for option in _DPKG_OPTIONS),
                self.suite, str(out), self.mirror]

    def key(self) -> str:
        version = run_tool("mmdebstrap --version", ["mmdebstrap", "--version"]).strip()
        text = json.dumps({"command": self.command(Path("-")), "mmdebstrap": version,
                           "machine": os.uname().machine}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def base_tarball(spec: RootfsSpec, cache: Path | None = None) -> Path:
    """The cached root filesystem tar of ``spec``, built first if it is not there yet."""
    folder = (cache or cache_root() / "image") / "rootfs"
    final = folder / f"debian-{spec.suite}-{spec.key()}.tar"
    if final.is_file():
        return final
    if os.geteuid() != 0:
        raise ImageError("building the Debian root filesystem needs root (mmdebstrap "
                         "--mode=root); run as root once, or pass --from IMAGE where a "
                         "registry is reachable")
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{final.name}-", suffix=".tmp", dir=folder)
    os.close(handle)
    tmp = Path(name)
    try:
        run_tool("building the Debian root filesystem (mmdebstrap)", spec.command(tmp),
                 env={**os.environ, "SOURCE_DATE_EPOCH": "0"})
        with open(tmp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final
