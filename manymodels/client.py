"""A small client for a manymodels endpoint, or a fleet of them behind a proxy.

Behind ``manymodels fleet`` a proxy sends each request to the replica that owns its key,
so a request must carry one key. :meth:`Client.score` therefore splits rows of many
segments by segment key, sends one ``POST /segments/score`` per key concurrently (the key
in the ``x-manymodels-key`` header) and puts the answers back in row order: the reply
is the one a single server's ``POST /score`` gives for the same rows.
:meth:`Client.score_model` sends rows to ``POST /models/{name}/score``. Both forms are
the ones ``manymodels fleet``'s proxies canonicalise to one key per model (the segment
key's pairs, the model name without its target), so a segment's own model is loaded on
one replica whichever method reaches it.

Batch jobs (``/batch/jobs``, scope ``batch``): :meth:`Client.submit_job` starts one
(with an ``Idempotency-Key`` so a retried submission makes one job),
:meth:`Client.wait_job` waits for it to end, :meth:`Client.job`, :meth:`Client.jobs`,
:meth:`Client.cancel_job` and :meth:`Client.job_log` look at it; :data:`JOB_EXIT_CODES`
is the exit status a pipeline step gives for each final state.

Example::

    from manymodels.client import Client

    with Client("http://127.0.0.1:8080") as client:
        reply = client.score(frame)            # a DataFrame, records or columns
        reply["predictions"], reply["model"]   # one entry per row, in row order

        job = client.submit_job("/data/in/", "/data/out/", idempotency_key="2026-12-07")
        job = client.wait_job(job["id"])        # job["state"] == "succeeded"
"""

from __future__ import annotations

import time
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from manymodels.errors import DataError, ScoringError
from manymodels.keys import KEY_HEADER, format_segment_key

__all__ = ["JOB_EXIT_CODES", "Client", "EndpointError"]

#: Exit status of a command that waited for a batch job, per state it ended in (or was
#: still in when the wait gave up).
JOB_EXIT_CODES = {"succeeded": 0, "failed": 20, "canceled": 21, "queued": 22, "running": 22}

Rows = Any  # a pandas DataFrame, a list of row dicts, or a dict of column lists


class EndpointError(ScoringError):
    """The endpoint answered with an error; carries its status and reason."""

    code = "endpoint_error"

    def __init__(self, status: int, detail: str, url: str) -> None:
        super().__init__(f"{url} answered {status}: {detail}")
        self.status = status
        self.detail = detail


def _columns(rows: Rows) -> tuple[dict[str, list[Any]], int]:
    """Rows as ``{column: values}`` and their count, from any of the accepted shapes."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # pandas, without importing it
        columns = {str(c): rows[c].tolist() for c in rows.columns}
        return columns, len(rows)
    if isinstance(rows, Mapping):
        columns = {str(c): list(v) for c, v in rows.items()}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise DataError(f"columns have different lengths: {sorted(lengths)}")
        return columns, lengths.pop() if lengths else 0
    records = list(rows)
    names: dict[str, None] = {}
    for record in records:
        names.update(dict.fromkeys(record))
    return {c: [r.get(c) for r in records] for c in names}, len(records)


def _take(columns: Mapping[str, Sequence[Any]], index: Sequence[int]) -> dict[str, list[Any]]:
    return {c: [values[i] for i in index] for c, values in columns.items()}


def _detail(response: Any) -> str:
    try:
        body = response.json()
    except ValueError:
        return str(response.text[:200])
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("error") or body)
    return str(body)


class Client:
    """Score rows on a manymodels endpoint (one server, or a fleet behind its proxy).

    Parameters
    ----------
    url
        Base URL of the endpoint (the proxy's, for a fleet).
    concurrency
        Requests in flight at once when rows of several segments are split.
    timeout
        Seconds per request.
    headers
        Sent with every request (e.g. ``{"authorization": "Bearer ..."}``).
    token
        An API key or token, sent as ``Authorization: Bearer <token>``.
    """

    def __init__(self, url: str, *, concurrency: int = 8, timeout: float = 60.0,
                 headers: Mapping[str, str] | None = None, token: str | None = None) -> None:
        import httpx  # lazily: importing manymodels never pays for it

        self.url = url.rstrip("/")
        self.concurrency = max(1, concurrency)
        limits = httpx.Limits(max_connections=self.concurrency,
                              max_keepalive_connections=self.concurrency)
        sent = dict(headers or {})
        if token:
            sent["authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, timeout=timeout, limits=limits,
                                  headers=sent)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="manymodels-client")
        self._segment_columns: list[str] | None = None

    # -- plumbing ---------------------------------------------------------------------------
    def _post(self, path: str, body: Mapping[str, Any],
              headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        response = self._http.post(path, json=body, headers=headers)
        if response.status_code >= 400:
            raise EndpointError(response.status_code, _detail(response), self.url + path)
        reply: dict[str, Any] = response.json()
        return reply

    def _call(self, method: str, path: str, body: Any = None,
              headers: Mapping[str, str] | None = None,
              params: Mapping[str, Any] | None = None, timeout: float | None = None) -> Any:
        extra: dict[str, Any] = {"timeout": timeout} if timeout is not None else {}
        response = self._http.request(method, path, json=body, headers=headers,
                                      params=params, **extra)
        if response.status_code >= 400:
            raise EndpointError(response.status_code, _detail(response), self.url + path)
        if response.headers.get("content-type", "").startswith("text/plain"):
            return response.text
        return response.json()

    def segment_columns(self) -> list[str]:
        """The bundle's segment columns (asked once, from ``GET /models``)."""
        if self._segment_columns is None:
            response = self._http.get("/models")
            if response.status_code >= 400:
                raise EndpointError(response.status_code, _detail(response), self.url + "/models")
            self._segment_columns = [str(c) for c in response.json()["segment_columns"]]
        return self._segment_columns

    # -- scoring ----------------------------------------------------------------------------
    def score_model(self, name: str, rows: Rows) -> dict[str, Any]:
        """Score ``rows`` with the model ``name`` (``POST /models/{name}/score``)."""
        columns, _ = _columns(rows)
        return self._post(f"/models/{urllib.parse.quote(name, safe='')}/score",
                          {"data": columns})

    def score_segment(self, key: Mapping[str, Any], rows: Rows) -> dict[str, Any]:
        """Score the rows of one segment ``key`` (``POST /segments/score``)."""
        columns, _ = _columns(rows)
        return self._post("/segments/score", {"data": columns},
                          {KEY_HEADER: format_segment_key(key)})

    def score(self, rows: Rows) -> dict[str, Any]:
        """Score rows of any segments: one request per segment key, sent concurrently,
        answers reassembled in row order (``predictions``, ``model``, ``fallback``, and
        ``probabilities``/``classes`` for classifiers), as ``POST /score`` answers."""
        columns, n = _columns(rows)
        segment_columns = self.segment_columns()
        missing = [c for c in segment_columns if c not in columns]
        if missing:
            raise DataError(f"rows lack the segment column(s) {', '.join(missing)}")
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, key in enumerate(zip(*(columns[c] for c in segment_columns), strict=True)):
            groups.setdefault(key, []).append(i)
        if not segment_columns:
            groups = {(): list(range(n))}
        parts = list(groups.items())
        replies = list(self._pool.map(
            lambda part: self.score_segment(dict(zip(segment_columns, part[0], strict=True)),
                                            _take(columns, part[1])), parts))
        return _reassemble(n, [index for _, index in parts], replies)

    # -- batch jobs -------------------------------------------------------------------------
    def submit_job(self, input: str, output: str, *,  # noqa: A002 - the job's field
                   deployment: str | None = None, idempotency_key: str | None = None,
                   **options: Any) -> dict[str, Any]:
        """Start a batch job (``POST /batch/jobs``); ``options`` are ``mini_batch_size``,
        ``max_concurrency``, ``error_threshold``, ``retries``, ``output_format``,
        ``id_column``. The same ``idempotency_key`` returns the job it made first."""
        body = {"input": input, "output": output, **options}
        if deployment is not None:
            body["deployment"] = deployment
        headers = {"idempotency-key": idempotency_key} if idempotency_key else None
        job: dict[str, Any] = self._call("POST", "/batch/jobs", body, headers)
        return job

    def job(self, job_id: str, wait: float = 0) -> dict[str, Any]:
        """One job (``GET /batch/jobs/{id}``); with ``wait``, answered as soon as it ends
        or after that many seconds."""
        params = {"wait": wait} if wait > 0 else None
        job: dict[str, Any] = self._call("GET", f"/batch/jobs/{_quote(job_id)}",
                                         params=params, timeout=wait + 30 if wait else None)
        return job

    def jobs(self, state: str | None = None, limit: int = 50,
             before: str | None = None) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"jobs": [...], "next": cursor}``."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state
        if before is not None:
            params["before"] = before
        page: dict[str, Any] = self._call("GET", "/batch/jobs", params=params)
        return page

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (``DELETE /batch/jobs/{id}``); a running one stops within seconds."""
        job: dict[str, Any] = self._call("DELETE", f"/batch/jobs/{_quote(job_id)}")
        return job

    def job_log(self, job_id: str) -> str:
        """The job's log (``GET /batch/jobs/{id}/log``)."""
        return str(self._call("GET", f"/batch/jobs/{_quote(job_id)}/log"))

    def wait_job(self, job_id: str, timeout: float | None = None,
                 poll: float = 10.0) -> dict[str, Any]:
        """The job once it has ended (or as it is when ``timeout`` seconds have passed)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = poll if deadline is None else min(poll, deadline - time.monotonic())
            job = self.job(job_id, wait=max(left, 0.0))
            if job["state"] not in ("queued", "running"):
                return job
            if deadline is not None and time.monotonic() >= deadline:
                return job

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")


def _reassemble(n: int, indexes: Iterable[Sequence[int]],
                replies: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The per-key replies as one reply in the rows' original order."""
    fields = ["predictions", "model", "fallback"]
    if replies and "probabilities" in replies[0]:
        fields.append("probabilities")
    out: dict[str, Any] = {f: [None] * n for f in fields}
    for index, reply in zip(indexes, replies, strict=True):
        for field in fields:
            values = reply[field]
            if len(values) != len(index):
                raise ScoringError(f"the endpoint answered {len(values)} {field} for "
                                   f"{len(index)} rows")
            target = out[field]
            for i, value in zip(index, values, strict=True):
                target[i] = value
    if replies and "classes" in replies[0]:
        out["classes"] = replies[0]["classes"]
    return out
