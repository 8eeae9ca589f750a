"""Domain errors: what went wrong, in the service's own words, knowing nothing of HTTP.

Each has a stable `code` and a `detail` (a message, or a list of {field, message}). The HTTP
layer (app/api/errors.py) alone decides which status each family answers.
"""

from typing import Any


class DomainError(Exception):
    code = "error"

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        # As a person reads it (the CLI, logs): "field: reason" rather than a list's repr.
        if isinstance(self.detail, list):
            return "; ".join(
                f"{item['field']}: {item['message']}"
                if isinstance(item, dict) and {"field", "message"} <= item.keys()
                else str(item)
                for item in self.detail
            )
        return str(self.detail)


class NotFound(DomainError):
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class StudyNotFound(NotFound):
    code = "study_not_found"


class PlotNotFound(NotFound):
    code = "plot_not_found"


class Unauthorized(DomainError):
    """No usable API key: the detail says whether it was missing, malformed, unknown or revoked."""

    code = "unauthorized"


class MissingKey(Unauthorized):
    code = "missing_key"


class MalformedKey(Unauthorized):
    code = "malformed_key"


class UnknownKey(Unauthorized):
    code = "unknown_key"


class RevokedKey(Unauthorized):
    code = "revoked_key"


class Forbidden(DomainError):
    """A usable key that may not do this."""

    code = "forbidden"


class AdminKeyRequired(Forbidden):
    code = "admin_key_required"


class Conflict(DomainError):
    """The request is valid but contradicts what is stored."""

    code = "conflict"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"


class JobNotCancellable(Conflict):
    code = "job_not_cancellable"


class StudyNotEnded(Conflict):
    code = "study_not_ended"


class JobNotEnded(Conflict):
    code = "job_not_ended"


class JobInStudy(Conflict):
    code = "job_in_study"


class DatasetInUse(Conflict):
    code = "dataset_in_use"


class LimitExceeded(DomainError):
    """Back-pressure: valid, but not now; `retry_after_seconds` says when to try again."""

    code = "limit_exceeded"
    retry_after_seconds = 30


class TooManyQueuedJobs(LimitExceeded):
    code = "too_many_queued_jobs"


class TooManyActiveJobs(LimitExceeded):
    """The tenant's queued plus running jobs are at its limit."""

    code = "too_many_active_jobs"


class RequestRateExceeded(LimitExceeded):
    """The key's requests per second are over its rate; retry once the bucket refills."""

    code = "request_rate_exceeded"

    def __init__(self, detail: str, retry_after_seconds: int) -> None:
        super().__init__(detail)
        self.retry_after_seconds = retry_after_seconds


class QuotaExceeded(DomainError):
    """Storing this would take the tenant over its storage quota: free space, then retry."""

    code = "storage_quota_exceeded"


class InvalidInput(DomainError):
    """Input that is well-formed but unacceptable: names the field, as pydantic's errors do."""

    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__([{"field": field, "message": message}])
        self.field = field
        self.message = message


class DatabaseUnavailable(DomainError):
    code = "database_unavailable"
