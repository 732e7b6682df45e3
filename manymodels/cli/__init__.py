"""The ``manymodels`` command line: a thin shell over the library.

Each sub-module registers its commands on :data:`app`. Every :class:`ManyModelsError`
becomes one clear line on stderr and a non-zero exit code from :data:`EXIT_CODES`;
anything else is a bug and keeps its traceback.

Each command imports the library it calls inside its function: the shell is imported
by every command (and by each forked worker), so it loads only Typer and rich itself.
"""

from __future__ import annotations

import gc
import os
import signal
import sys

import typer
from rich.console import Console

from manymodels._version import __version__
from manymodels.errors import (
    BundleError,
    DataError,
    ImageError,
    LockError,
    ManyModelsError,
    ModelNotFound,
    RegistryError,
    SpecError,
    TrainingError,
)

from . import (
    batch,
    datasets,
    endpoint,
    fleet,
    forecast,
    image,
    jobs,
    keys,
    monitor,
    package,
    report,
    retrain,
    serve,
    train,
)

__all__ = ["EXIT_CODES", "app", "main"]

app = typer.Typer(
    name="manymodels",
    help="One model per segment: segment, train, export to ONNX, package, serve, batch-score.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Exit code per error class (first match in order wins); 1 for any other ManyModelsError.
EXIT_CODES: list[tuple[type[ManyModelsError], int]] = [
    (SpecError, 2),
    (DataError, 3),
    (BundleError, 4),
    (ModelNotFound, 4),
    (TrainingError, 5),
    (RegistryError, 6),
    (ImageError, 7),  # manymodels image: a tool is missing or refused
    (LockError, 13),  # retrain: another run of the model holds its lock (see cli.retrain)
]



def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"manymodels {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """One model per segment: segment, train, export to ONNX, package, serve, batch-score."""


for _module in (datasets, train, package, serve, endpoint, jobs, keys, batch, report, monitor,
                fleet, image, retrain, forecast):
    _module.register(app)


def exit_code_for(exc: ManyModelsError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _stop)
    try:
        app(prog_name="manymodels")
    except KeyboardInterrupt:
        _stopped()
    except SystemExit as exc:
        if exc.code == 130:  # Typer's answer to Ctrl-C (and to SIGTERM, see _stop)
            _stopped()
        if batch.QUICK_EXIT["ok"] and exc.code in (0, None):
            _quick_exit()
        raise
    except ManyModelsError as exc:
        Console(stderr=True).print(f"[bold red]error[/] ({exc.code}): {exc}", highlight=False,
                                   soft_wrap=True)
        sys.exit(exit_code_for(exc))
    finally:
        # The command is over. Without this the interpreter's last garbage collections walk
        # every object of every module loaded (scikit-learn, SciPy, MLflow, SQLAlchemy).
        # Exit handlers and finalisers still run.
        gc.freeze()
        if "joblib.externals.loky.reusable_executor" in sys.modules:  # workers were used
            from manymodels.engine import stop_workers

            stop_workers()


def _stopped() -> None:
    """One line and exit 130; every ``finally`` on the way removed what was half-written
    (a run's hidden staging directory, a retrain's attempt)."""
    Console(stderr=True).print("[bold red]stopped[/]: nothing half-written was left behind",
                               highlight=False)
    sys.exit(130)


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (``kill``, a scheduler's stop) ends a command like Ctrl-C does: by an
    exception, so every ``finally`` removes what the command had half-written."""
    raise KeyboardInterrupt


def _quick_exit() -> None:
    """End now with status 0, skipping interpreter teardown (see ``batch.QUICK_EXIT``)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
