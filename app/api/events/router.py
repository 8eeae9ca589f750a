"""Live events as Server-Sent Events: one job's, or every job's."""

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.routing import APIRoute
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.types import Receive, Scope, Send

from app.api.auth import AUTH_RESPONSES, CallerDep, get_caller
from app.api.dependencies import check_query_parameters
from app.api.events import service
from app.api.events.dependencies import (
    HubDep,
    KeyCheckDep,
    LastEventIdDep,
    StreamedJobDep,
    stream_slot,
)
from app.core.events import EPOCH, STATUS, Event
from app.core.models.jobs import JobStatus

logger = logging.getLogger(__name__)


class StreamRoute(APIRoute):
    """A route whose client may leave mid-stream, which is no error.

    FastAPI (0.165) passes an SSE route's events to the response through a memory stream, and
    once the response stops reading (its client has gone) it closes that stream before it
    stops the task that feeds it: a task caught handing over an event then raises
    anyio.BrokenResourceError, which reached the app's catch-all handler ("unhandled error")
    and uvicorn ("Exception in ASGI application") on an ordinary disconnect (fastapi/fastapi
    discussion 15725). Caught here, where it arises; any other error still propagates.
    """

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().handle(scope, receive, send)
        except* anyio.BrokenResourceError:
            logger.debug("a client left its event stream")


# Every route needs a caller; a route cannot opt out (tests/api/test_tenants.py checks).
router = APIRouter(
    prefix="/v1",
    tags=["events"],
    # A stream holds a slot of its tenant's (TRAINSVC_TENANT_MAX_STREAMS) while it is open.
    dependencies=[Depends(get_caller), Depends(check_query_parameters), Depends(stream_slot)],
    responses=AUTH_RESPONSES,
    route_class=StreamRoute,
)


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: StreamedJobDep,
    request: Request,
    hub: HubDep,
    last_event_id: LastEventIdDep,
    key_check: KeyCheckDep,
) -> AsyncIterator[ServerSentEvent]:
    """The job's status changes (`status`) and stored epochs (`epoch`); ends when the job does,
    or when its key is revoked."""
    factory = request.app.state.session_factory
    stream = service.job_stream(hub, factory, job_id, last_event_id or 0, key_check)
    async for event in stream:
        yield event


@router.get("/events", response_class=EventSourceResponse)
async def all_events(
    request: Request,
    hub: HubDep,
    caller: CallerDep,
    last_event_id: LastEventIdDep,
    key_check: KeyCheckDep,
    study_id: uuid.UUID | None = None,
    status: Annotated[list[JobStatus] | None, Query()] = None,
) -> AsyncIterator[ServerSentEvent]:
    """The caller's jobs' events from now on, optionally one study's, or only status changes
    to the given statuses (and epochs, if `running` is one); ends when its key is revoked."""
    wanted = set(status or ())

    def match(event: Event) -> bool:
        if not caller.admin and event.tenant != caller.tenant:
            return False
        if study_id is not None and event.study_id != study_id:
            return False
        if not wanted:
            return True
        if event.kind == STATUS:
            return event.payload.get("status") in wanted
        return event.kind == EPOCH and "running" in wanted

    factory = request.app.state.session_factory
    stream = service.all_jobs_stream(hub, factory, match, last_event_id, key_check)
    async for event in stream:
        yield event
