"""Typed errors carrying the API's error code and message ({"error": code, "detail": ...})."""

import email.utils
import time
from datetime import UTC
from typing import Any

import httpx


class TrainsvcError(Exception):
    """Base of every error this client raises."""

    def __init__(
        self, message: str, *, status_code: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code


class ApiError(TrainsvcError):
    """The API answered with an error body; `detail` is its message or its field errors."""

    def __init__(
        self, status_code: int, code: str, detail: Any, retry_after: float | None = None
    ) -> None:
        super().__init__(_describe(detail), status_code=status_code, code=code)
        self.detail = detail
        # Seconds the API asked to wait before trying again (its Retry-After), if it said.
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status_code} {self.code}: {self.message}"


class Unauthorized(ApiError):
    """401: the key is missing, malformed, unknown or revoked."""


class NotFound(ApiError):
    """404: no such job, checkpoint, dataset or study (or not the caller's)."""


class Conflict(ApiError):
    """409: e.g. an Idempotency-Key reused with another spec, or a job that already ended."""


class PayloadTooLarge(ApiError):
    """413: the body is over the service's limit."""


class InvalidRequest(ApiError):
    """422: `detail` lists {field, message} for each problem."""


class RateLimited(ApiError):
    """429: still refused after the client's retries."""


class Unavailable(ApiError):
    """503: the service's database or broker stayed away through the client's retries."""


class ServerError(ApiError):
    """Any other status of 500 and above."""


class ConnectionFailed(TrainsvcError):
    """The service could not be reached through the client's retries."""


class WaitTimedOut(TrainsvcError):
    """wait() reached its timeout before the job ended; the job goes on."""


class UnexpectedResponse(TrainsvcError):
    """A success that is not what the trainsvc API answers (a body that is not JSON, or JSON of
    another shape): a proxy's or portal's page, or another service at the client's base URL."""


class InvalidId(TrainsvcError, ValueError):
    """A job, study or checkpoint id that is not a UUID (or a string of one); raised before
    any request is sent, since the id would become part of the request's URL."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: InvalidRequest,
    429: RateLimited,
    503: Unavailable,
}


def error_from_response(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
        code, detail = str(body["error"]), body.get("detail")
    except (ValueError, KeyError, TypeError):
        code = "http_error"
        # Not the API's own answer: a proxy's or load balancer's. Its HTML page is markup, not
        # a message; the status's phrase ("Bad Gateway") says what it does.
        html = "html" in response.headers.get("content-type", "")
        detail = response.reason_phrase if html else response.text[:500] or response.reason_phrase
    status = response.status_code
    cls = _BY_STATUS.get(status, ServerError if status >= 500 else ApiError)
    return cls(status, code, detail, retry_after_seconds(response))


def retry_after_seconds(response: httpx.Response) -> float | None:
    """The response's Retry-After in seconds (a number or an HTTP date); None if it has none,
    or one that is neither, which a proxy may send: that is no reason to fail a call."""
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC, by RFC 5322
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - time.time())


def _describe(detail: Any) -> str:
    if isinstance(detail, list):
        parts = [
            f"{item.get('field')}: {item.get('message')}" if isinstance(item, dict) else str(item)
            for item in detail
        ]
        return "; ".join(parts)
    return str(detail)
