"""CLI ``manymodels jobs submit|show|list|cancel|wait|log``: batch jobs of a running endpoint.

A thin client of ``/batch/jobs`` (:class:`manymodels.client.Client`), with
``MANYMODELS_TOKEN`` as its Bearer credential (scope ``batch``). ``wait`` (and ``submit
--wait``) exits with the job's outcome, so a scheduler's step fails when the job does:
0 succeeded, 20 failed, 21 canceled, 22 still queued or running when ``--timeout`` ran
out (:data:`manymodels.client.JOB_EXIT_CODES`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from manymodels.errors import ManyModelsError

if TYPE_CHECKING:
    from manymodels.client import Client

__all__ = ["register"]

jobs_app = typer.Typer(help="Batch jobs of a running endpoint: submit, watch, cancel, wait.",
                       no_args_is_help=True)

Url = Annotated[str, typer.Option(
    envvar="MANYMODELS_URL", help="The server, e.g. http://127.0.0.1:8000 (MANYMODELS_URL)")]
DEFAULT_URL = "http://127.0.0.1:8000"
JobId = Annotated[str, typer.Argument(help="The job's id (job-...)")]
AsJson = Annotated[bool, typer.Option("--json", help="Print the server's JSON answer")]


@contextmanager
def _client(url: str) -> Iterator[Client]:
    """A client with ``MANYMODELS_TOKEN``; transport failures become one error line."""
    import httpx

    from manymodels.client import Client

    try:
        with Client(url, token=os.environ.get("MANYMODELS_TOKEN"), timeout=120) as client:
            yield client
    except httpx.HTTPError as exc:
        raise ManyModelsError(f"cannot reach the endpoint at {url}: {exc}") from None


def _line(job: dict[str, Any]) -> str:
    """One line: id, state, progress, rate, ETA and the reason, if any."""
    p = job.get("progress") or {}
    text = f"{job['id']} {job['state']}"
    if p:
        done = p.get("rows_scored", 0) + p.get("rows_rejected", 0)
        text += (f": parts {p.get('parts_done', 0)}/{p.get('parts_total', 0)}, rows "
                 f"{done:,}/{p.get('rows_total', 0):,} ({p.get('rows_rejected', 0):,} "
                 f"rejected), {p.get('rows_per_second') or 0:,.0f} rows/s")
        if job["state"] == "running" and p.get("eta_seconds") is not None:
            text += f", ETA {p['eta_seconds']:.0f} s"
    if job.get("reason"):
        text += f" — {job['reason']}"
    return text


def _print(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(job, indent=2))
        return
    console = Console()
    console.print(_line(job), highlight=False, soft_wrap=True)
    console.print(f"  {job['input']} -> {job['output']} (deployment {job['deployment']}, "
                  f"bundle {job['bundle']})", highlight=False, soft_wrap=True)
    for error in job.get("errors") or []:
        console.print(f"  error: {error}", highlight=False, soft_wrap=True)


def _finish(job: dict[str, Any], as_json: bool) -> None:
    """Print the job and exit with the code of its state."""
    from manymodels.client import JOB_EXIT_CODES

    _print(job, as_json)
    code = JOB_EXIT_CODES[job["state"]]
    if code:
        raise typer.Exit(code)


@jobs_app.command("submit")
def submit(
    input: Annotated[str, typer.Argument(  # noqa: A002 - the job's field
        help="CSV/Parquet file, folder, glob or s3:// prefix (under the server's batch roots)")],
    output: Annotated[str, typer.Argument(help="Output folder or s3:// prefix")],
    url: Url = DEFAULT_URL,
    deployment: Annotated[str | None, typer.Option(
        help="Deployment whose bundle scores (default: the live one)")] = None,
    idempotency_key: Annotated[str | None, typer.Option(
        help="Same key, same job: a retried step does not start a second one")] = None,
    mini_batch_size: Annotated[str | None, typer.Option(
        help="Rows per mini-batch, or 'N files'")] = None,
    max_concurrency: Annotated[int | None, typer.Option(
        help="Worker processes of this job")] = None,
    error_threshold: Annotated[int | None, typer.Option(
        help="Rows (files) allowed to fail before the job fails; -1 never")] = None,
    retries: Annotated[int | None, typer.Option(
        help="Tries after a failure that is not about the input")] = None,
    id_column: Annotated[str | None, typer.Option(help="Column identifying a row")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Wait for the job to end and exit with its outcome")] = False,
    timeout: Annotated[float | None, typer.Option(help="With --wait: give up after S s")] = None,
    as_json: AsJson = False,
) -> None:
    """Start a batch job; prints its id (or, with --wait, how it ended)."""
    options: dict[str, Any] = {"max_concurrency": max_concurrency,
                               "error_threshold": error_threshold, "retries": retries,
                               "id_column": id_column}
    if mini_batch_size is not None:
        options["mini_batch_size"] = int(mini_batch_size) if mini_batch_size.isdigit() \
            else mini_batch_size
    with _client(url) as client:
        job = client.submit_job(input, output, deployment=deployment,
                                idempotency_key=idempotency_key,
                                **{k: v for k, v in options.items() if v is not None})
        if wait:
            _finish(client.wait_job(job["id"], timeout), as_json)
            return
    if as_json:
        _print(job, True)
    else:
        typer.echo(job["id"])


@jobs_app.command("show")
def show(job_id: JobId, url: Url = DEFAULT_URL, as_json: AsJson = False) -> None:
    """A job's state, progress, rate, ETA and first errors."""
    with _client(url) as client:
        _print(client.job(job_id), as_json)


@jobs_app.command("list")
def list_jobs(
    url: Url = DEFAULT_URL,
    state: Annotated[str | None, typer.Option(
        help="queued | running | succeeded | failed | canceled")] = None,
    limit: Annotated[int, typer.Option(help="Jobs per page")] = 50,
    before: Annotated[str | None, typer.Option(
        help="The cursor a previous page printed, for the next page")] = None,
    as_json: AsJson = False,
) -> None:
    """Jobs, newest first."""
    with _client(url) as client:
        page = client.jobs(state, limit, before)
    if as_json:
        typer.echo(json.dumps(page, indent=2))
        return
    table = Table(title="batch jobs", title_justify="left")
    for column in ("id", "state", "deployment", "rows", "rejected", "created", "output"):
        table.add_column(column, justify="right" if column in ("rows", "rejected") else "left")
    for job in page["jobs"]:
        p = job.get("progress") or {}
        table.add_row(job["id"], job["state"], job["deployment"],
                      f"{p.get('rows_scored', 0):,}", f"{p.get('rows_rejected', 0):,}",
                      job["timings"]["created"], job["output"])
    console = Console()
    console.print(table)
    if page.get("next"):
        console.print(f"more: --before {page['next']}", highlight=False)


@jobs_app.command("cancel")
def cancel(job_id: JobId, url: Url = DEFAULT_URL, as_json: AsJson = False) -> None:
    """Cancel a job: a queued one at once, a running one at its next commit."""
    with _client(url) as client:
        _print(client.cancel_job(job_id), as_json)


@jobs_app.command("wait")
def wait_for(
    job_id: JobId, url: Url = DEFAULT_URL,
    timeout: Annotated[float | None, typer.Option(help="Give up after S seconds")] = None,
    as_json: AsJson = False,
) -> None:
    """Wait until a job ends; exit 0 if it succeeded, 20 failed, 21 canceled, 22 still
    queued or running at --timeout."""
    with _client(url) as client:
        job = client.wait_job(job_id, timeout)
    _finish(job, as_json)


@jobs_app.command("log")
def show_log(job_id: JobId, url: Url = DEFAULT_URL) -> None:
    """A job's log (its runner's lines: attempts, progress, outcome)."""
    with _client(url) as client:
        typer.echo(client.job_log(job_id), nl=False)


def register(app: typer.Typer) -> None:
    """Add ``manymodels jobs`` to ``app``."""
    app.add_typer(jobs_app, name="jobs")
