"""Start a built image locally with podman, the way ``manymodels image run`` does.

The container shares the host's network (no bridge, no port mapping to set up) and
listens on loopback by default, where ``manymodels serve`` needs no credentials; it runs
with runc and the same explicit ulimits as the build.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from manymodels.errors import SpecError

from ._tools import Storage, require, run_tool, ulimits

__all__ = ["podman_run_command", "remove_container", "run_image"]


def podman_run_command(reference: str, *, port: int, host: str = "127.0.0.1",
                       name: str | None = None, env: Mapping[str, str] | None = None,
                       volumes: Sequence[str] = (), detach: bool = False,
                       storage: Storage | None = None,
                       command: Sequence[str] = ()) -> list[str]:
    """The ``podman run`` call that serves ``reference`` on ``host:port``."""
    if not 0 < port < 65536:
        raise SpecError(f"--port must be 1..65535, got {port}")
    storage = storage or Storage()
    args = ["podman", *storage.args(), "run", "--rm", "--runtime", "runc", "--network", "host",
            *ulimits(), "--env", f"MANYMODELS_HOST={host}", "--env", f"MANYMODELS_PORT={port}"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    for volume in volumes:
        args += ["--volume", volume]
    if name is not None:
        args += ["--name", name]
    if detach:
        args.append("--detach")
    if not Path("/run/systemd/system").is_dir():
        # podman schedules health checks with systemd timers; without systemd the check is
        # still there for `podman healthcheck run`, with no timer to fail on
        args += ["--health-interval", "disable"]
    return [*args, reference, *command]


def run_image(reference: str, **options: object) -> str:
    """Start ``reference`` detached (see :func:`podman_run_command`); the container id."""
    require("podman")
    command = podman_run_command(reference, detach=True, **options)  # type: ignore[arg-type]
    return run_tool(f"podman run {reference}", command).strip()


def remove_container(container: str, storage: Storage | None = None) -> None:
    """Stop and remove ``container`` (nothing if it is already gone)."""
    storage = storage or Storage()
    run_tool("podman rm", ["podman", *storage.args(), "rm", "--force", "--time", "5",
                           container], check=False)
