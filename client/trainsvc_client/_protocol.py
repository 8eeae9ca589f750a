"""What the sync and async clients share: how each call is built, retried and read.

The two clients differ only in how they wait (time.sleep or asyncio.sleep) and send; every
decision (which statuses to retry, how long to back off, how to read a body) lives here once.
"""

import contextlib
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
from pydantic import ValidationError

from trainsvc_client.errors import (
    ApiError,
    ConnectionFailed,
    InvalidId,
    RateLimited,
    Unavailable,
    UnexpectedResponse,
    error_from_response,
    retry_after_seconds,
)
from trainsvc_client.models import ENDED_STATUSES, Checkpoint, Epoch, Job
from trainsvc_client.sse import ServerSentEvent

# A job's, study's or checkpoint's id: a UUID, or a string that parses as one.
Id = uuid.UUID | str

# 429: over a rate or a queue limit; 503: the database or broker is away for a moment.
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter; a Retry-After header, when sent, sets the wait."""

    attempts: int = 6
    backoff_seconds: float = 0.5
    max_backoff_seconds: float = 15.0

    def delay(self, retry: int, response: httpx.Response | None = None) -> float:
        if response is not None:
            after = retry_after_seconds(response)
            if after is not None:
                return self.honoured(after)
        backoff = min(self.max_backoff_seconds, self.backoff_seconds * 2.0**retry)
        return backoff * (0.5 + random.random() / 2)

    def honoured(self, retry_after: float) -> float:
        """A Retry-After, bounded: a proxy's "come back in a day" is not waited out."""
        return min(retry_after, self.max_backoff_seconds * 4)


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    # The answer may be text, not JSON: a study's report as CSV or HTML.
    text: bool = False


def should_retry(policy: RetryPolicy, retry: int, response: httpx.Response | None) -> bool:
    """After a transport error (response None) or a retryable status, while attempts remain."""
    if retry + 1 >= policy.attempts:
        return False
    return response is None or response.status_code in RETRY_STATUSES


def read(response: httpx.Response, text: bool = False) -> Any:
    if response.status_code >= 400:
        raise error_from_response(response)
    if response.status_code == 204 or not response.content:
        return None
    content_type = response.headers.get("content-type", "application/json")
    if "json" not in content_type:
        if text:
            return response.text  # e.g. a study report with format=csv
        raise UnexpectedResponse(_not_the_api(response, f"a {content_type} body, not JSON"))
    try:
        return response.json()
    except ValueError as exc:
        raise UnexpectedResponse(
            _not_the_api(response, f"a body that is not JSON ({exc})")
        ) from exc


def _not_the_api(response: httpx.Response, what: str) -> str:
    request = response.request
    return (
        f"{request.method} {request.url.path} answered {response.status_code} with {what}; "
        f"is {request.url.scheme}://{request.url.netloc.decode()} a trainsvc API?"
    )


Parsed = TypeVar("Parsed")


def parsed(build: Callable[[Any], Parsed], body: Any) -> Parsed:
    """`build(body)`, or UnexpectedResponse where the body is JSON of another shape."""
    try:
        return build(body)
    except (ValidationError, KeyError, TypeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UnexpectedResponse(f"an answer that is not the trainsvc API's: {first_line}") from exc


def job_page(page: Any) -> tuple[list[Job], str | None]:
    """A page of GET /v1/jobs: its jobs and the cursor of the next page (None: the last)."""
    return [Job.model_validate(item) for item in page["items"]], page.get("next_cursor")


def epochs_of(body: Any) -> list[Epoch]:
    return [Epoch.model_validate(epoch) for epoch in body["epochs"]]


def checkpoints_of(body: Any) -> list[Checkpoint]:
    return [Checkpoint.model_validate(item) for item in body["items"]]


def new_idempotency_key() -> str:
    # Made once per submit call and reused by its retries, so a retry never submits twice.
    return f"trainsvc-client-{uuid.uuid4()}"


def base_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": "trainsvc-client/0.1"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def checked_id(value: Id, kind: str) -> str:
    """`value` as a canonical UUID string, or InvalidId. Ids go into URL paths, so anything
    else ("../studies", a tab) would reach another resource or fail in httpx, not the API."""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, str):
        try:
            return str(uuid.UUID(value))
        except ValueError:
            pass
    raise InvalidId(f"{kind} id must be a UUID, not {value!r}")


def job_path(job_id: Id, *rest: str) -> str:
    return "/".join(("/v1/jobs", checked_id(job_id, "job"), *rest))


def study_path(study_id: Id, *rest: str) -> str:
    return "/".join(("/v1/studies", checked_id(study_id, "study"), *rest))


def submit_call(path: str, body: dict[str, Any], idempotency_key: str | None) -> Call:
    key = idempotency_key or new_idempotency_key()
    return Call("POST", path, json=body, headers={"Idempotency-Key": key})


@contextlib.contextmanager
def whole_file(target: Path) -> Iterator[BinaryIO]:
    """A file to write that becomes `target` only once it is complete: a download cut short
    leaves `target` as it was (absent, or the previous file) and no partial file beside it."""
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        with partial.open("xb") as out:
            yield out
        partial.replace(target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def ends_job(event: ServerSentEvent) -> bool:
    if event.event != "status":
        return False
    try:
        return json.loads(event.data).get("status") in ENDED_STATUSES
    except (ValueError, AttributeError):
        return False


# What wait() rides out, however long it lasts, up to its deadline: the API away (a restart, a
# deploy, its database) or over a limit, through one call's retries; the stream's refusals too.
AWAY = (ConnectionFailed, RateLimited, Unavailable)


def pause(
    policy: RetryPolicy,
    poll_interval: float,
    away: BaseException | None,
    deadline: float | None,
) -> float:
    """How long wait() sleeps before it reads the job again: the poll interval, or longer if
    the API asked for longer (Retry-After), never past the deadline."""
    asked = away.retry_after if isinstance(away, ApiError) and away.retry_after else 0.0
    return bounded(max(poll_interval, policy.honoured(asked)), deadline)


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def bounded(seconds: float, deadline: float | None) -> float:
    if deadline is None:
        return seconds
    return max(0.0, min(seconds, deadline - time.monotonic()))
