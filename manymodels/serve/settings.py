"""Server settings: flags over ``MANYMODELS_*`` environment variables over a ``serving/`` spec.

One pydantic-settings class holds every knob of ``manymodels serve`` (credentials in a
nested :class:`AuthSettings`, ``auth:`` in a spec, ``MANYMODELS_AUTH__MODE`` in the
environment). A spec such as
``serving/default.yaml`` sets the same fields by name (loaded and checked through
:func:`manymodels.specs.load_spec`, so a typo is one :class:`SpecError` naming the
field); environment variables override the spec, and command-line flags override both.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from manymodels.errors import SpecError
from manymodels.specs import load_spec

from .policy import RolloutPolicy

__all__ = ["AuthSettings", "BatchDefaults", "BatchSettings", "ServeSettings", "load_settings"]


class AuthSettings(BaseModel):
    """Who may call the endpoint (``auth:`` in a spec); see :mod:`manymodels.serve.auth`."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "key", "token"] | None = None
    """``none``, ``key`` (API keys from ``key_file``) or ``token`` (JWTs). Unset: ``none``
    on a loopback host, ``key`` on any other."""
    allow_unauthenticated: bool = False
    """Let ``none`` listen on a non-loopback address (a gateway in front authenticates)."""
    key_file: str | None = None
    """Key file of ``manymodels keys`` (default ``~/.config/manymodels/keys.json``)."""
    key_reload_seconds: float = Field(default=1.0, ge=0)
    """How often at most the key file is checked for changes; a revoked key stops
    working within this time."""
    token_secret_file: str | None = None
    """File holding the HS256 signing secret (default ``~/.config/manymodels/token-secret``,
    made by ``manymodels token create``)."""
    token_public_key_file: str | None = None
    """PEM public key (RSA → RS256, EC P-256 → ES256) of another service that issues the
    tokens; when set, HS256 tokens are refused."""
    token_audience: str = "manymodels"
    """Required ``aud`` claim."""
    token_issuer: str | None = None
    """Required ``iss`` claim, if set."""
    token_leeway_seconds: float = Field(default=10.0, ge=0, le=300)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""
    token_cache_size: int = Field(default=10_000, ge=1)
    """Verified tokens kept (until they expire) so a signature is checked once per token."""
    rate_limit: float | None = Field(default=None, gt=0)
    """Requests per second per credential (key or token subject), per worker; ``None``
    for no limit. A key created with ``--rate-limit`` has its own."""
    rate_burst: float | None = Field(default=None, ge=1)
    """Bucket size of the rate limit (default: one second's worth)."""


class BatchDefaults(BaseModel):
    """A batch job's options (``batch:`` of a deployment, or of the server): each job may
    override any of them in its request."""

    model_config = ConfigDict(extra="forbid")

    mini_batch_size: int | str | None = None
    """Rows per mini-batch (whole Parquet row groups), or ``"N files"`` (default 1,000,000)."""
    max_concurrency: int | None = Field(default=None, ge=1, le=256)
    """Worker processes of one job (default 1: one pipelined process, about two cores);
    never more than the server's ``batch.max_workers``."""
    error_threshold: int | None = Field(default=None, ge=-1)
    """Rows (or files) allowed to fail before the job fails; -1 never (the default)."""
    retries: int | None = Field(default=None, ge=0, le=10)
    """Times a job is tried again after a failure of its run that is not about the input
    (a store or network error); each try resumes from the committed parts (default 0)."""
    output_format: Literal["parquet"] | None = None
    """Format of the predictions: Parquet (the only one batch writes)."""


class BatchSettings(BaseModel):
    """Batch jobs over HTTP (``batch:`` in a spec, ``MANYMODELS_BATCH__*``); see
    :mod:`manymodels.serve.jobs`."""

    model_config = ConfigDict(extra="forbid")

    roots: list[str] = Field(default_factory=list)
    """Directories under which a job may read its input and write its output. With none
    (and no ``buckets``) every job is refused (422)."""
    buckets: list[str] = Field(default_factory=list)
    """Object-store URL prefixes (``s3://bucket/jobs/``) a job may read from and write to."""
    executor: str = "local"
    """Where jobs run: ``local`` (worker processes of this machine) or
    ``dask://host:8786`` (an existing Dask cluster)."""
    max_workers: int | None = Field(default=None, ge=1, le=1024)
    """Worker processes of all running jobs together (default: the cores this server may
    use); a job waits in the queue until its workers fit."""
    nice: int = Field(default=10, ge=0, le=19)
    """How much lower than the server's the jobs' CPU priority is, so online requests
    go first when both want the cores (above 0 the runners are also ``SCHED_BATCH`` on
    Linux: never preferred on wake-up); 0 runs them like the server."""
    lease_seconds: float = Field(default=30.0, gt=0)
    """A running job whose server has not been heard from for this long (another host
    sharing the store) is queued again."""
    warm_runner: bool = True
    """Keep one runner process started ahead, its imports done, so the next job starts
    scoring at once (it costs the memory of one idle process)."""
    cancel_grace_seconds: float = Field(default=20.0, gt=0)
    """A canceled job's runner that has not stopped within this time is killed (it is
    interrupted in its part after 3 s; a killed runner's staged files are deleted by the
    next run into that output)."""
    defaults: BatchDefaults = Field(default_factory=BatchDefaults)
    """Options of every job unless its deployment or its request sets them."""

    @field_validator("executor")
    @classmethod
    def _executor_known(cls, value: str) -> str:
        if value == "local" or (value.startswith("dask://") and len(value) > 7):
            return value
        raise ValueError(f"batch executor must be 'local' or 'dask://HOST:PORT', not {value!r}")


class ServeSettings(BaseSettings):
    """Everything ``manymodels serve`` can be told."""

    model_config = SettingsConfigDict(env_prefix="MANYMODELS_", extra="forbid",
                                      validate_default=True, env_nested_delimiter="__")

    name: str = "default"
    """Name of the settings (the spec's file name when loaded from ``serving/``)."""
    bundle: str | None = None
    """Bundle directory, or a registry URI ``models:/<name>@<alias>`` / ``models:/<name>/<v>``."""
    endpoint: str | None = None
    """Endpoint file (YAML: deployments, traffic, mirror). Loaded at start if it exists,
    else written from the bundle or ``--deployment`` flags; rewritten on every change."""
    bundle_roots: list[str] = Field(default_factory=list)
    """Directories under which ``POST /admin/deployments`` may open a bundle, besides the
    directories holding the local bundles served at start-up (see
    :mod:`manymodels.serve.source_policy`)."""
    bundle_buckets: list[str] = Field(default_factory=list)
    """Object-store URL prefixes (``s3://bucket/bundles/``) ``POST /admin/deployments``
    may fetch a bundle from, besides the buckets of the remote bundles served at
    start-up. Any other URL (``http://``, ``file://``, other protocols) is refused."""
    follow: bool = False
    """Follow the alias of a ``models:/NAME@ALIAS`` bundle: poll the registry every
    ``rollout.poll_seconds`` and roll each new version it names out by ``rollout``
    (kept in the endpoint file, so a restart follows again)."""
    rollout: RolloutPolicy = Field(default_factory=RolloutPolicy)
    """How a followed alias's new version reaches live traffic: mirror phase, traffic
    steps, thresholds (``rollout:`` in a spec)."""
    monitor: str | None = None
    """``manymodels monitor`` JSON output whose drift flags the ``/ui`` page shows (read
    on every refresh of the page, so a scheduled monitor run shows up without a restart)."""
    mirror_queue: int = Field(default=1024, ge=1)
    """Mirrored copies waiting for the shadow deployment; a copy that finds it full is
    dropped (and counted), so mirroring never holds a live request back."""
    host: str = "127.0.0.1"
    """Interface to listen on; ``0.0.0.0`` to accept connections from other machines."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    workers: int = Field(default=1, ge=1, le=64)
    """uvicorn worker processes. Each holds its own model cache, so memory grows with
    every worker; on a 2-core box one worker leaves a core to the load client, the OS
    and model loading threads (docs/design/performance.md has the measurements)."""
    max_memory_mb: float | None = Field(default=None, gt=0)
    """Budget of the model cache in MB of estimated resident memory, per worker;
    ``None`` keeps every model that was used. Least recently used models are evicted."""
    header_timeout_seconds: float = Field(default=10.0, gt=0)
    """A connection must send a request's complete headers within this many seconds of
    opening (or of its next request's first byte), else it is closed: silent and
    slow-header clients cannot hold sockets."""
    body_timeout_seconds: float = Field(default=30.0, gt=0)
    """A request's body must arrive within this many seconds of its headers, else the
    connection is closed: a slow body cannot hold a request slot."""
    keep_alive_seconds: float = Field(default=15.0, gt=0)
    """An idle keep-alive connection is closed this long after its last response."""
    max_connections: int | None = Field(default=None, ge=1)
    """Open connections per worker; a new one beyond is closed at once. ``None``: half the
    process's open-file limit (``ulimit -n``), at most 4096."""
    max_concurrency: int = Field(default=1024, ge=1)
    """Open connections or requests being answered at once per worker (uvicorn's
    ``limit_concurrency``); beyond, a request gets 503 at once."""
    max_body_mb: float = Field(default=16.0, gt=0)
    """Largest request body accepted; larger ones get 413."""
    preload: str = "none"
    """``none`` (load on first use), ``all``, or a file listing model names one per line."""
    verify_files: bool = True
    """Check every model file against the sha256 in its bundle's manifest at start-up and
    refuse a bundle where one differs or is missing. Whether on or off, each model's file
    is checked again when it loads (the verdict is cached by inode and mtime) and a
    changed file answers 503 for that model."""
    pin_fallbacks: bool = True
    """Load the fallback models (pooled and global levels) at start-up and never evict them."""
    optimisation: Literal["none", "basic", "all"] = "basic"
    """onnxruntime graph optimisation level for every session."""
    inline_rows: int = Field(default=2048, ge=1)
    """Requests with at most this many rows are scored on the event loop (microseconds);
    larger ones go to a worker thread so they never stall other requests."""
    strict_columns: bool = False
    """Refuse (422 ``unexpected_column``) rows carrying columns no model takes; by default
    they are ignored, as MLflow's scoring server ignores them."""
    load_threads: int = Field(default=2, ge=1, le=64)
    """Threads that create sessions off the event loop."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "warning"
    """uvicorn and manymodels log level."""
    access_log: Literal["json", "plain", "off"] = "off"
    """One line per request on stdout: ``json`` (time, request id, deployment, route,
    rows, models, status, latency), ``plain`` (the same, readable) or ``off``."""
    metrics: bool = True
    """Count requests, models and cache events for ``GET /metrics`` (Prometheus)."""
    metrics_top_models: int = Field(default=50, ge=1, le=100_000)
    """Models with their own ``/metrics`` series (the busiest); the rest are summed
    under ``model="other"``. ``/v2/models/{name}/stats`` has every model."""
    log_predictions: str | None = None
    """Directory for the prediction log (Parquet); ``None`` logs nothing."""
    log_sample: float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of scored rows written to the prediction log."""
    log_max_mb: float = Field(default=64.0, gt=0)
    """A prediction-log file is completed (made visible) past this size..."""
    log_max_seconds: float = Field(default=300.0, gt=0)
    """...or this age, and when the server stops."""
    log_queue_rows: int = Field(default=100_000, ge=1)
    """Rows that may wait for the log writer; more are dropped (and counted)."""
    audit_log: str | None = None
    """JSON-lines file of every admin change (who, what, the endpoint before and after)
    and of denied requests summed per minute (see :mod:`manymodels.serve.audit`);
    ``None`` keeps none."""
    audit_max_mb: float = Field(default=10.0, gt=0)
    """The audit log rotates past this size..."""
    audit_backups: int = Field(default=5, ge=0)
    """...keeping this many older files (``audit.jsonl.1`` ...)."""
    ssl_certfile: str | None = None
    """PEM certificate (chain) to serve HTTPS with (uvicorn's ``--ssl-certfile``)."""
    ssl_keyfile: str | None = None
    """PEM private key of ``ssl_certfile``."""
    auth: AuthSettings = Field(default_factory=AuthSettings)
    """Credentials: mode, key file, token keys, rate limit."""
    state_dir: str | None = None
    """Directory of the endpoint's durable state: the batch jobs database
    (``jobs.sqlite``) and the jobs' logs. Default: ``<endpoint file>.state`` beside the
    endpoint file, else ``$XDG_STATE_HOME/manymodels/endpoint-<port>``."""
    batch: BatchSettings = Field(default_factory=BatchSettings)
    """Batch jobs over HTTP: allowed roots and buckets, executor, worker cap, defaults."""

    @property
    def state_path(self) -> Path:
        """The state directory (see ``state_dir``)."""
        if self.state_dir:
            return Path(self.state_dir).expanduser()
        if self.endpoint:
            endpoint = Path(self.endpoint).expanduser().resolve()
            return endpoint.with_name(endpoint.name + ".state")
        base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
        return base / "manymodels" / f"endpoint-{self.port}"

    @field_validator("access_log", mode="before")
    @classmethod
    def _access_log_mode(cls, value: Any) -> Any:
        """``true``/``false`` (the former boolean setting) mean ``plain``/``off``."""
        if isinstance(value, bool):
            return "plain" if value else "off"
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return "plain" if value.lower() in ("true", "1") else "off"
        return value

    @field_validator("preload")
    @classmethod
    def _preload_known(cls, value: str) -> str:
        if value not in ("all", "none") and not Path(value).is_file():
            raise ValueError(f"preload must be 'all', 'none' or an existing file of model "
                             f"names, not '{value}'")
        return value

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Init arguments (flags) first, then the environment; no dotenv or secret files."""
        return init_settings, env_settings

    @property
    def max_bytes(self) -> int | None:
        return None if self.max_memory_mb is None else int(self.max_memory_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def to_env(self) -> dict[str, str]:
        """These settings as ``MANYMODELS_*`` variables, for worker processes to re-read."""
        out: dict[str, str] = {}
        for key, value in self.model_dump().items():
            if isinstance(value, dict | list):
                out[f"MANYMODELS_{key.upper()}"] = json.dumps(value)
            elif value is not None:
                out[f"MANYMODELS_{key.upper()}"] = str(value).lower() if isinstance(
                    value, bool) else str(value)
        return out


def load_settings(spec: str | os.PathLike[str] | None = None, **overrides: Any) -> ServeSettings:
    """Settings from a ``serving/`` spec (name or path), the environment and ``overrides``.

    Parameters
    ----------
    spec
        Spec name (``default`` → ``serving/default.yaml``) or path; ``None`` for none.
    **overrides
        Values from the command line; ``None`` means "not given" and is skipped
        (``auth={"mode": "key"}`` sets one field of the ``auth`` section).
    """
    given = _given(overrides)
    base: dict[str, Any] = {}
    if spec is not None:
        base = load_spec("serving", ServeSettings, spec).model_dump(exclude_unset=True)
    try:
        from_env = ServeSettings().model_dump(exclude_unset=True)
        return ServeSettings(**_merged(_merged(base, from_env), given))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}"
                             for e in exc.errors())
        raise SpecError(f"serve settings (flags or MANYMODELS_* variables): {problems}") from None


def _given(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` without the ``None`` ("not given") entries, nested sections included."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            value = _given(value) or None
        if value is not None:
            out[key] = value
    return out


def _merged(low: dict[str, Any], high: dict[str, Any]) -> dict[str, Any]:
    """``high`` over ``low``, nested sections (``auth``) merged field by field."""
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        elif not isinstance(value, dict) or value:
            out[key] = value
    return out
