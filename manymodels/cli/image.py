"""CLI commands ``manymodels image build`` and ``manymodels image run``: one image per bundle."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from manymodels.image import Storage

__all__ = ["register"]

image_app = typer.Typer(help="One OCI image per bundle: build it with buildah, run it with "
                             "podman (no container daemon needed).", no_args_is_help=True)

_STORAGE_DRIVER = typer.Option(help="Storage driver of buildah and podman (vfs works without "
                                    "kernel overlay support)")
_STORAGE_ROOT = typer.Option(help="Where images are stored (default: the tools' own, "
                                  "/var/lib/containers/storage as root)")
_RUNROOT = typer.Option(help="The tools' run state directory (default: theirs)")


def _storage(driver: str, root: Path | None, runroot: Path | None) -> Storage:
    from manymodels.image import Storage

    return Storage(driver=driver, root=root, runroot=runroot)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


@image_app.command("build")
def build(
    bundle: Annotated[str, typer.Argument(
        help="Bundle directory, registry URI models:/<name>@<alias> or s3:// URL")],
    tag: Annotated[str, typer.Option(
        help="NAME[:VERSION] of the image (VERSION defaults to the bundle's version)")],
    from_image: Annotated[str | None, typer.Option(
        "--from", help="Base image from a registry (needs python3 and glibc), instead of a "
                       "Debian root filesystem built with mmdebstrap")] = None,
    prediction_log: Annotated[bool, typer.Option(
        "--prediction-log", help="Add pyarrow, which --log-predictions needs (about 160 MB)")
    ] = False,
    image_format: Annotated[str, typer.Option(
        "--format", help="docker (keeps the health check) or oci (labels also as manifest "
                         "annotations; OCI configs have no health check)")] = "docker",
    push: Annotated[bool, typer.Option(
        "--push", help="Push the image to the registry its tag names once built")] = False,
    push_to: Annotated[str | None, typer.Option(
        help="Push to this destination instead, e.g. docker://registry:5000/oj-sales:3")] = None,
    tls_verify: Annotated[bool, typer.Option(
        "--tls-verify/--no-tls-verify", help="Verify the registry's certificate when pushing")
    ] = True,
    storage_driver: Annotated[str, _STORAGE_DRIVER] = "vfs",
    storage_root: Annotated[Path | None, _STORAGE_ROOT] = None,
    storage_runroot: Annotated[Path | None, _RUNROOT] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON")] = False,
) -> None:
    """Build an image that serves BUNDLE with `manymodels serve` (serving packages only)."""
    from manymodels.errors import SpecError
    from manymodels.image import build_image, push_image
    from manymodels.sources import resolve_bundle_source

    if image_format not in ("docker", "oci"):
        raise SpecError(f"--format must be docker or oci, got {image_format!r}")
    storage = _storage(storage_driver, storage_root, storage_runroot)
    console = Console(stderr=True)
    result = build_image(resolve_bundle_source(bundle), tag, base_image=from_image,
                         prediction_log=prediction_log, storage=storage,
                         image_format=image_format,
                         report=lambda step: console.print(f"[dim]{step}...[/]", highlight=False))
    pushed = None
    if push or push_to:
        pushed = push_image(result.tag, push_to, storage=storage, tls_verify=tls_verify)
    if as_json:
        typer.echo(json.dumps({"tag": result.tag, "image_id": result.image_id,
                               "size_bytes": result.size_bytes, "labels": result.labels,
                               "layers": result.layers, "seconds": result.seconds,
                               "pushed": pushed}, indent=1))
        return
    steps = ", ".join(f"{name} {seconds:g} s" for name, seconds in result.seconds.items())
    console.print(f"[green]built[/] [bold]{result.tag}[/] ({result.image_id[:12]}, "
                  f"{_size(result.size_bytes)}, {len(result.layers)} layers; {steps})",
                  highlight=False, soft_wrap=True)
    if pushed:
        console.print(f"[green]pushed[/] to {pushed}", highlight=False)
    console.print(f"try it: manymodels image run {result.tag}", highlight=False)


@image_app.command("run")
def run(
    image: Annotated[str, typer.Argument(help="The image, e.g. oj-sales:3")],
    port: Annotated[int, typer.Option(help="TCP port the server listens on")] = 8080,
    host: Annotated[str, typer.Option(
        help="Interface (the container shares the host's network; loopback needs no "
             "credentials)")] = "127.0.0.1",
    env: Annotated[list[str] | None, typer.Option(
        help="MANYMODELS_X=value for the server, once per variable")] = None,
    volume: Annotated[list[str] | None, typer.Option(
        help="HOST:CONTAINER[:ro] bind mount, e.g. for a key file or the prediction log")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Container name")] = None,
    detach: Annotated[bool, typer.Option(
        "--detach", help="Start it in the background and print its id")] = False,
    storage_driver: Annotated[str, _STORAGE_DRIVER] = "vfs",
    storage_root: Annotated[Path | None, _STORAGE_ROOT] = None,
    storage_runroot: Annotated[Path | None, _RUNROOT] = None,
) -> None:
    """Serve IMAGE on this machine with podman (runc, host network), until Ctrl-C."""
    from manymodels.errors import SpecError
    from manymodels.image import podman_run_command, run_image

    variables: dict[str, str] = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"--env {item!r} must be NAME=VALUE, e.g. MANYMODELS_WORKERS=2")
        variables[key] = value
    storage = _storage(storage_driver, storage_root, storage_runroot)
    options = {"port": port, "host": host, "name": name, "env": variables,
               "volumes": volume or [], "storage": storage}
    if detach:
        typer.echo(run_image(image, **options))
        return
    command = podman_run_command(image, **options)  # type: ignore[arg-type]
    Console(stderr=True).print(f"serving {image} on http://{host}:{port} (Ctrl-C stops it)",
                               highlight=False)
    raise typer.Exit(subprocess.call(command))


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(image_app, name="image")
