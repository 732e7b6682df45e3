"""Running buildah, podman and mmdebstrap: where images are stored, and how a failure reads.

Every call goes through :func:`run_tool`, which turns a missing tool or a non-zero exit
into one :class:`ImageError` naming the step and quoting the tool's last line, never a
traceback. The settings that make the tools work on a machine without a container daemon
(the vfs storage driver, chroot isolation, runc, host networking, explicit ulimits) are
written once here.
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from manymodels.errors import ImageError

__all__ = ["INSTALL_HINT", "Steps", "Storage", "require", "run_tool", "ulimits"]

#: The Debian packages ``manymodels image`` drives.
INSTALL_HINT = "apt-get install buildah podman mmdebstrap runc"

#: File and process limits given to builds and containers. The tools' defaults ask for
#: more open files than an unprivileged or nested host may grant, and then fail to start.
_NOFILE = 4096
_NPROC = 4096


@dataclass(frozen=True)
class Storage:
    """Where buildah and podman keep images (the same store for both, so a built image runs).

    ``root`` and ``runroot`` default to the tools' own (``/var/lib/containers/storage``
    as root); the vfs driver needs no kernel overlay support and no fuse.
    """

    driver: str = "vfs"
    root: Path | None = None
    runroot: Path | None = None

    def args(self) -> list[str]:
        """The global options that point buildah or podman at this store."""
        args = ["--storage-driver", self.driver]
        if self.root is not None:
            args += ["--root", str(self.root)]
        if self.runroot is not None:
            args += ["--runroot", str(self.runroot)]
        return args


def ulimits() -> list[str]:
    """``--ulimit`` options within this process's own hard limits."""
    options = []
    for name, limit, wanted in (("nofile", resource.RLIMIT_NOFILE, _NOFILE),
                                ("nproc", resource.RLIMIT_NPROC, _NPROC)):
        hard = resource.getrlimit(limit)[1]
        value = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        options += ["--ulimit", f"{name}={value}:{value}"]
    return options


def require(tool: str) -> str:
    """The path of ``tool``, or an :class:`ImageError` saying how to install it."""
    path = shutil.which(tool)
    if path is None:
        raise ImageError(f"{tool} is not installed; manymodels image needs it: {INSTALL_HINT} "
                         f"(as root, on Debian or Ubuntu)")
    return path


def run_tool(step: str, command: Sequence[str], *, env: dict[str, str] | None = None,
             timeout: float | None = None, check: bool = True) -> str:
    """Run ``command`` and return its stdout; a failure is an :class:`ImageError` naming
    ``step`` and ending with the tool's last line of stderr."""
    require(command[0])
    try:
        proc = subprocess.run(list(command), capture_output=True, text=True, env=env,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ImageError(f"{step}: {command[0]} did not finish within {timeout:.0f} s") from exc
    if check and proc.returncode != 0:
        told = [line for line in (proc.stderr or proc.stdout).splitlines() if line.strip()]
        last = told[-1].strip() if told else "no output"
        raise ImageError(f"{step} failed ({command[0]} exited with {proc.returncode}): {last}")
    return proc.stdout


class Steps:
    """The wall time of each step of a build, in order, reported as it goes."""

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._report = report

    def timed(self, name: str) -> _Timer:
        return _Timer(self, name)


class _Timer:
    def __init__(self, steps: Steps, name: str) -> None:
        self.steps, self.name = steps, name

    def __enter__(self) -> None:
        self.start = time.monotonic()
        if self.steps._report is not None:
            self.steps._report(self.name)

    def __exit__(self, *exc: object) -> None:
        self.steps.seconds[self.name] = round(time.monotonic() - self.start, 1)
