"""The batch jobs API: ``/batch/jobs`` (HTTP only; the work is :class:`~.jobs.JobManager`'s).

Every route needs scope ``batch`` (``admin`` implies it), decided by path in the one
credentials middleware (:mod:`.auth`), and passes the same body limits, request ids and
metrics as every other route. Submitting answers ``202 Accepted`` with a ``Location``;
the same caller's same ``Idempotency-Key`` returns the job it made first. Store calls run
on a thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from manymodels.jobstore import JOB_STATES

from .dataplane import dumps, read_json
from .errors import FieldsRefused
from .jobs import JobManager, describe
from .paths import BATCH, BATCH_JOBS
from .settings import ServeSettings

__all__ = ["make_jobs_router"]

JSON = "application/json"
MAX_PAGE = 500
#: Longest ``?wait=`` of ``GET /batch/jobs/{id}``, and how often it looks meanwhile.
MAX_WAIT = 60.0
WAIT_POLL_SECONDS = 0.05
SUBMIT_EXAMPLE = {"deployment": "blue", "input": "/data/in/2026-12-07/",
                  "output": "/data/out/2026-12-07/", "mini_batch_size": 1_000_000,
                  "max_concurrency": 1, "error_threshold": 100, "retries": 1}
JOB_SCHEMA: dict[str, Any] = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["input", "output"],
    "properties": {
        "input": {"type": "string", "description": "A CSV/Parquet file, a folder or glob of "
                  "them, or an s3:// prefix, under the batch roots or buckets"},
        "output": {"type": "string", "description": "Output folder or s3:// prefix"},
        "deployment": {"type": "string", "description": "Default: the live deployment"},
        "id_column": {"type": "string"},
        "mini_batch_size": {"oneOf": [{"type": "integer", "minimum": 1},
                                      {"type": "string", "example": "10 files"}]},
        "max_concurrency": {"type": "integer", "minimum": 1},
        "error_threshold": {"type": "integer", "minimum": -1},
        "retries": {"type": "integer", "minimum": 0, "maximum": 10},
        "output_format": {"type": "string", "enum": ["parquet"]}},
    "additionalProperties": False}, "example": SUBMIT_EXAMPLE}}}


def _caller(request: Request) -> str:
    """Who submits: the credential's subject (idempotency keys are per caller)."""
    user = request.scope.get("user")
    return str(getattr(user, "subject", None) or "anonymous")


def _int_param(request: Request, name: str, low: int, high: int | None,
               default: int | None) -> int | None:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = low - 1
    if value < low or (high is not None and value > high):
        raise FieldsRefused(f"query parameter '{name}' must be an integer from {low}"
                            + (f" to {high}" if high is not None else "") + f", not {raw!r}")
    return value


def _float_param(request: Request, name: str, high: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0 or value > high:
        raise FieldsRefused(f"query parameter '{name}' must be a number of seconds from 0 "
                            f"to {high:g}, not {raw[:40]!r}")
    return value


def make_jobs_router(jobs: JobManager, settings: ServeSettings) -> APIRouter:
    """The ``/batch/jobs`` routes over ``jobs``."""
    router = APIRouter(prefix=BATCH, tags=["batch"])
    limit = settings.max_body_bytes
    jobs_path = BATCH_JOBS[len(BATCH):]

    def reply(payload: Any, status: int = 200, headers: dict[str, str] | None = None
              ) -> Response:
        return Response(dumps(payload), status_code=status, media_type=JSON, headers=headers)

    @router.post(jobs_path, response_class=Response, status_code=202,
                 summary="Start a batch scoring job (202 + Location; Idempotency-Key)",
                 openapi_extra={"requestBody": JOB_SCHEMA})
    async def submit_job(request: Request) -> Response:
        """Score ``input`` into ``output`` with the deployment's bundle (pinned now),
        exactly once, in worker processes beside online traffic. Options override the
        deployment's: ``mini_batch_size``, ``max_concurrency``, ``error_threshold``,
        ``retries``, ``output_format``. Locations outside the batch roots or buckets are
        refused (422); an output another active job uses is a conflict (409)."""
        body = await read_json(request, limit)
        key = request.headers.get("idempotency-key")
        job, created = await asyncio.to_thread(jobs.submit, body, _caller(request), key)
        headers = {"Location": f"{BATCH_JOBS}/{job.id}"}
        if not created:
            headers["Idempotent-Replayed"] = "true"
        return reply(describe(job), 202, headers)

    @router.get(jobs_path, response_class=Response,
                summary="Jobs, newest first (?state=running&limit=50&before=CURSOR)")
    async def list_jobs(request: Request) -> Response:
        """One page of jobs; ``next`` is the ``before`` cursor of the following page
        (``null`` on the last one)."""
        state = request.query_params.get("state")
        if state is not None and state not in JOB_STATES:
            raise FieldsRefused(f"query parameter 'state' must be one of "
                                f"{', '.join(JOB_STATES)}, not {state[:40]!r}")
        size = _int_param(request, "limit", 1, MAX_PAGE, 50)
        before = _int_param(request, "before", 1, None, None)
        assert size is not None
        page = await asyncio.to_thread(jobs.page, state, size, before)
        return reply({"jobs": [describe(j) for j in page],
                      "next": str(page[-1].seq) if len(page) == size else None})

    @router.get(jobs_path + "/{job_id}", response_class=Response,
                summary="One job: state, progress, ETA, timings, first errors (?wait=S)")
    async def get_job(job_id: str, request: Request) -> Response:
        """With ``?wait=SECONDS`` (at most 60) the answer comes as soon as the job has
        ended, or when the time is up: a waiting client needs no tight polling loop."""
        wait = _float_param(request, "wait", MAX_WAIT)
        deadline = time.monotonic() + wait
        job = await asyncio.to_thread(jobs.get, job_id)
        while job.active and time.monotonic() < deadline:
            await asyncio.sleep(WAIT_POLL_SECONDS)
            job = await asyncio.to_thread(jobs.get, job_id)
        return reply(describe(job))

    @router.delete(jobs_path + "/{job_id}", response_class=Response,
                   summary="Cancel a job (a running one stops at its next commit)")
    async def cancel_job(job_id: str) -> Response:
        """A queued job is canceled at once; a running one within seconds, keeping only
        whole committed parts in its output. An ended job is left as it is."""
        job = await asyncio.to_thread(jobs.cancel, job_id)
        return reply(describe(job), 202 if job.state == "running" else 200)

    @router.get(jobs_path + "/{job_id}/log", response_class=Response,
                summary="The job's log (plain text, the last megabyte)")
    async def job_log(job_id: str) -> Response:
        text = await asyncio.to_thread(jobs.log_text, job_id)
        return Response(text, media_type="text/plain; charset=utf-8")

    return router
