"""Who is calling: the `Authorization: Bearer <key>` check every /v1 router depends on.

`CallerDep` answers the request's Caller (tenant, admin, key id); routers declare it in
`dependencies=` so no route can be added without it, and a test walks app.routes to be sure.
With auth off (`trainsvc up`, TRAINSVC_AUTH=off) every request is the default tenant's admin.
"""

import math
import threading
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool

from app.api.dependencies import SettingsDep
from app.api.errors import database_is_away, error_responses
from app.core.config import Settings
from app.core.errors import (
    AdminKeyRequired,
    MalformedKey,
    MissingKey,
    RequestRateExceeded,
    Unauthorized,
)
from app.core.keys import KEY_PATTERN, TENANT_PATTERN, KeyVerifier
from app.core.tenancy import UNAUTHENTICATED, Caller

# Declares the scheme in OpenAPI; the header itself is parsed below, so that a missing key
# and a malformed one get different answers.
bearer_scheme = HTTPBearer(
    auto_error=False, description="An API key from `trainsvc keys create`: Bearer tsk_..."
)

# What every route behind the caller dependency may answer besides its own responses.
AUTH_RESPONSES = error_responses(401, 429)


class KeyRateLimiter:
    """A token bucket per key: `rate` requests a second, bursts of up to `burst`.

    Per API process: N processes behind a balancer allow N times the rate (docs/security.md).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[uuid.UUID, tuple[float, float]] = {}  # key id: (tokens, at)
        self._lock = threading.Lock()

    def take(self, key_id: uuid.UUID) -> None:
        now = self.clock()
        with self._lock:
            tokens, at = self._buckets.get(key_id, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[key_id] = (tokens, now)
                wait = math.ceil((1 - tokens) / self.rate)
                raise RequestRateExceeded(
                    f"over this key's limit of {self.rate:g} requests per second, bursts of "
                    f"{self.burst} (TRAINSVC_KEY_REQUESTS_PER_SECOND, TRAINSVC_KEY_REQUEST_BURST)",
                    retry_after_seconds=max(1, wait),
                )
            self._buckets[key_id] = (tokens - 1, now)


def install_auth(app_state: Any, settings: Settings) -> None:
    """The key cache and rate buckets of one API process (on app.state)."""
    app_state.key_verifier = KeyVerifier(settings.key_cache_seconds)
    app_state.rate_limiter = KeyRateLimiter(
        settings.key_requests_per_second, settings.key_request_burst
    )


async def get_caller(
    request: Request,
    settings: SettingsDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
) -> Caller:
    if settings.auth == "off":
        return UNAUTHENTICATED
    header = request.headers.get("authorization")
    if header is None:
        raise MissingKey("an API key is required: send the header Authorization: Bearer <key>")
    scheme, _, key = header.partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not KEY_PATTERN.fullmatch(key):
        raise MalformedKey(
            "the Authorization header must be 'Bearer tsk_...' with a key from "
            "`trainsvc keys create`"
        )
    caller = await _verify(request, key)
    if caller.key_id is not None:
        limiter: KeyRateLimiter = request.app.state.rate_limiter
        limiter.take(caller.key_id)
    return caller


async def _verify(request: Request, key: str) -> Caller:
    verifier: KeyVerifier = request.app.state.key_verifier
    # A key seen within the cache time is a dictionary lookup, done here on the event loop: a
    # status poll then pays no hop to a worker thread for its key. Only a lookup that queries
    # the database goes to one.
    caller = verifier.cached(key)
    if caller is None:
        caller = await run_in_threadpool(verifier.verify, request.app.state.session_factory, key)
    return caller


async def still_authorized(request: Request) -> bool:
    """Whether the key a request began with still holds (not revoked since): asked again and
    again by an event stream, which outlives the check made when it began. Costs what that
    check costs (a dictionary lookup; a query once per key and TRAINSVC_KEY_CACHE_SECONDS), and
    counts against no rate."""
    settings: Settings = request.app.state.settings
    if settings.auth == "off":
        return True
    key = request.headers.get("authorization", "").partition(" ")[2].strip()
    try:
        await _verify(request, key)
    except Unauthorized:
        return False
    except DBAPIError as exc:
        if not database_is_away(exc):
            raise
        # No answer either way, and no event reaches a stream while the database is away (the
        # hub reads them from it): ask again at the next check, rather than end every stream.
        return True
    return True


CallerDep = Annotated[Caller, Depends(get_caller)]

# An admin's filter of a list by tenant: a name `trainsvc keys create` could have given, so a
# NUL (which PostgreSQL refuses in a parameter) is a 422 on this field, not on the database.
TenantFilter = Annotated[
    str | None,
    Query(
        pattern=f"^{TENANT_PATTERN.pattern}$", description="admin keys: only what this tenant owns"
    ),
]


async def get_metrics_caller(request: Request, settings: SettingsDep) -> Caller | None:
    """For /metrics: no key needed unless TRAINSVC_METRICS_REQUIRE_KEY is set, and then an
    admin's. Its figures count every tenant's jobs together: a tenant's key must not read how
    busy the others are."""
    if not settings.metrics_require_key:
        return None
    caller = await get_caller(request, settings, None)
    if not caller.admin:
        raise AdminKeyRequired(
            "/metrics counts every tenant's jobs: it takes an admin key "
            "(trainsvc keys create --admin)"
        )
    return caller


MetricsCallerDep = Annotated[Caller | None, Depends(get_metrics_caller)]
