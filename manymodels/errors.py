"""The exception tree of manymodels (see :mod:`manymodels.runtime.errors` for the drawing).

The classes live in the runtime package because the runtime is copied into every
bundle and must raise the same errors there without importing the rest of manymodels;
this module is the public name for them. The credential errors below are raised only by
the server (never inside a bundle), so they live here rather than in the runtime::

    ManyModelsError
    └── AuthError            unknown, revoked, expired or tampered credentials (HTTP 401)
        ├── MissingCredentials   none at all (401, a bare ``WWW-Authenticate`` challenge)
        ├── Forbidden        valid credentials without the scope the route needs (403)
        └── RateLimited      the credential's request budget is spent for now (429)

Batch jobs of an endpoint (:mod:`manymodels.jobstore`) add two more::

    ManyModelsError
    └── JobError             a batch job cannot be found or made
        ├── JobNotFound      no job with that id (404)
        └── JobConflict      an Idempotency-Key reused for another request, or an output
                             another active job uses (409)

``manymodels image`` adds one (exit code 7)::

    ManyModelsError
    └── ImageError           a tool is missing, or a build, push or run step failed
"""

from manymodels.runtime.errors import (
    BundleError,
    DataError,
    ExportError,
    InputSchemaError,
    LockError,
    ManyModelsError,
    ModelLoadError,
    ModelNotFound,
    RegistryError,
    ScoringError,
    SegmentationError,
    SegmentNotFound,
    SpecError,
    TrainingError,
)

__all__ = [
    "AuthError",
    "BundleError",
    "DataError",
    "ExportError",
    "Forbidden",
    "ImageError",
    "InputSchemaError",
    "JobConflict",
    "JobError",
    "JobNotFound",
    "LockError",
    "ManyModelsError",
    "MissingCredentials",
    "ModelLoadError",
    "ModelNotFound",
    "RateLimited",
    "RegistryError",
    "ScoringError",
    "SegmentNotFound",
    "SegmentationError",
    "SpecError",
    "TrainingError",
]


class AuthError(ManyModelsError, PermissionError):
    """The request carries no credentials, or ones that are unknown, revoked, expired or
    tampered with. The message says which, and never repeats the credential itself."""

    code = "invalid_token"
    #: Who was refused, as far as it is known without the credential: a verified
    #: principal's subject or a key's public id (for the audit log).
    caller: "str | None" = None


class MissingCredentials(AuthError):
    """The request carries no credentials at all."""

    code = "unauthenticated"


class Forbidden(AuthError):
    """The credentials are valid but lack the scope the route needs."""

    code = "insufficient_scope"

    def __init__(self, needed: str, held: "frozenset[str] | set[str]") -> None:
        shown = ", ".join(sorted(held)) or "none"
        super().__init__(f"this route needs scope '{needed}'; the credentials carry: {shown}")
        self.needed = needed


class RateLimited(AuthError):
    """The credential has spent its request budget; retry after ``retry_after`` seconds."""

    code = "rate_limited"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"request rate limit reached for these credentials; retry after "
                         f"{retry_after} s")
        self.retry_after = retry_after


class JobError(ManyModelsError):
    """A batch job of an endpoint cannot be found or made as asked."""

    code = "job_error"


class JobNotFound(JobError, LookupError):
    """No batch job has this id (on this endpoint's job store)."""

    code = "job_not_found"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no batch job '{job_id}' on this endpoint; GET /batch/jobs lists "
                         f"them")
        self.job_id = job_id


class JobConflict(JobError):
    """The job would clash with another: an Idempotency-Key already used for another
    request, or an output location an active job reads or writes."""

    code = "job_conflict"


class ImageError(ManyModelsError, RuntimeError):
    """A step of ``manymodels image`` failed: a tool is missing, or buildah, podman or
    mmdebstrap refused. The message names the step and ends with the tool's own last line."""

    code = "image_failed"
