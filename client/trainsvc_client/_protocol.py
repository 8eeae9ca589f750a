"""What the sync and async clients share: how each call is built, retried and read.

The two clients differ only in how they wait (time.sleep or asyncio.sleep) and send; every
decision (which statuses to retry, how long to back off, how to read a body) lives here once.
"""

import email.utils
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from trainsvc_client.errors import InvalidId, error_from_response
from trainsvc_client.models import ENDED_STATUSES
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
                return min(after, self.max_backoff_seconds * 4)
        backoff = min(self.max_backoff_seconds, self.backoff_seconds * 2.0**retry)
        return backoff * (0.5 + random.random() / 2)


def retry_after_seconds(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        moment = email.utils.parsedate_to_datetime(value)
        return max(0.0, moment.timestamp() - time.time()) if moment else None


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


def should_retry(policy: RetryPolicy, retry: int, response: httpx.Response | None) -> bool:
    """After a transport error (response None) or a retryable status, while attempts remain."""
    if retry + 1 >= policy.attempts:
        return False
    return response is None or response.status_code in RETRY_STATUSES


def read(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise error_from_response(response)
    if response.status_code == 204 or not response.content:
        return None
    if "json" not in response.headers.get("content-type", "application/json"):
        return response.text  # e.g. a study report with format=csv
    return response.json()


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


def params(**values: Any) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def ends_job(event: ServerSentEvent) -> bool:
    if event.event != "status":
        return False
    try:
        return json.loads(event.data).get("status") in ENDED_STATUSES
    except (ValueError, AttributeError):
        return False


def past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def bounded(seconds: float, deadline: float | None) -> float:
    if deadline is None:
        return seconds
    return max(0.0, min(seconds, deadline - time.monotonic()))
