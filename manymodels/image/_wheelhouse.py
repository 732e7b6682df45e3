"""The wheels an image installs, downloaded on the host once and kept in the cache.

One folder per target interpreter (``cp311-glibc2.36-x86_64``): ``pip download`` fetches
the pinned binary wheels for that interpreter and platform from the indexes pip is
configured with here, and pip itself, which the build runs from its wheel. A folder that
already holds every pinned wheel is used as it is, without a network call, so a repeated
build needs no index at all.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name, parse_wheel_filename

from manymodels.errors import ImageError
from manymodels.storage import cache_root

from ._tools import run_tool

__all__ = ["PythonTarget", "fill_wheelhouse"]


@dataclass(frozen=True)
class PythonTarget:
    """The interpreter inside the image that the wheels must fit."""

    major: int
    minor: int
    glibc: str  # e.g. "2.36"
    machine: str  # e.g. "x86_64"

    #: Printed by the image's python3: what :meth:`parse` reads.
    PROBE = ("import platform,sys;print(sys.version_info[0],sys.version_info[1],"
             "platform.libc_ver()[1] or 'none',platform.machine())")

    @classmethod
    def parse(cls, text: str) -> PythonTarget:
        try:
            major, minor, glibc, machine = text.split()
            return cls(int(major), int(minor), glibc, machine)
        except ValueError as exc:
            raise ImageError(f"could not read the base image's python3 ({text.strip()!r})") from exc

    @property
    def name(self) -> str:
        return f"cp{self.major}{self.minor}-glibc{self.glibc}-{self.machine}"

    def pip_options(self) -> list[str]:
        """``pip download`` options for this interpreter: every manylinux tag it accepts."""
        if self.glibc == "none":
            raise ImageError("the base image's python3 is not linked against glibc (musl?); "
                             "use a Debian or Ubuntu based image with --from")
        glibc_major, glibc_minor = (int(part) for part in self.glibc.split(".")[:2])
        platforms = [f"manylinux_{glibc_major}_{minor}_{self.machine}"
                     for minor in range(glibc_minor, 4, -1)]
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
        platforms += [f"{alias}_{self.machine}" for minor, alias in legacy.items()
                      if minor <= glibc_minor]
        options = ["--only-binary=:all:", "--python-version", f"{self.major}.{self.minor}",
                   "--implementation", "cp", "--abi", f"cp{self.major}{self.minor}"]
        for platform in platforms:
            options += ["--platform", platform]
        return options


def _have(folder: Path) -> set[tuple[str, str]]:
    found = set()
    for path in folder.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        found.add((str(name), str(version)))
    return found


def fill_wheelhouse(requirements: dict[str, str], target: PythonTarget,
                    cache: Path | None = None) -> tuple[Path, str]:
    """The wheelhouse folder for ``target`` holding every pinned wheel, and pip's wheel name."""
    folder = (cache or cache_root() / "image") / "wheels" / target.name
    folder.mkdir(parents=True, exist_ok=True)
    pip_version = metadata.version("pip")
    wanted = {**requirements, "pip": pip_version}
    have = _have(folder)
    missing = {n: v for n, v in wanted.items()
               if (str(canonicalize_name(n)), v) not in have}
    if missing:
        listing = folder / ".requirements.txt"
        listing.write_text("".join(f"{n}=={v}\n" for n, v in sorted(missing.items())))
        run_tool("downloading the serving wheels (pip download)", [
            sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
            "--disable-pip-version-check", *target.pip_options(), "--dest", str(folder),
            "--requirement", str(listing)])
        listing.unlink()
    pip = [p.name for p in folder.glob(f"pip-{pip_version}-*.whl")]
    if not pip:
        raise ImageError(f"pip {pip_version}'s wheel is missing from {folder}")
    return folder, pip[0]
