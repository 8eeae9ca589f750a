"""Live events as Server-Sent Events: one job's, or every job's."""

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api.auth import AUTH_RESPONSES, CallerDep, get_caller
from app.api.events import service
from app.api.events.dependencies import HubDep, LastEventIdDep, StreamedJobDep
from app.core.events import EPOCH, STATUS, Event
from app.core.models.jobs import JobStatus

# Every route needs a caller; a route cannot opt out (tests/api/test_tenants.py checks).
router = APIRouter(
    prefix="/v1", tags=["events"], dependencies=[Depends(get_caller)], responses=AUTH_RESPONSES
)


@router.get("/jobs/{job_id}/events", response_class=EventSourceResponse)
async def job_events(
    job_id: StreamedJobDep, request: Request, hub: HubDep, last_event_id: LastEventIdDep
) -> AsyncIterator[ServerSentEvent]:
    """The job's status changes (`status`) and stored epochs (`epoch`); ends when the job does."""
    factory = request.app.state.session_factory
    async for event in service.job_stream(hub, factory, job_id, last_event_id or 0):
        yield event


@router.get("/events", response_class=EventSourceResponse)
async def all_events(
    request: Request,
    hub: HubDep,
    caller: CallerDep,
    last_event_id: LastEventIdDep,
    study_id: uuid.UUID | None = None,
    status: Annotated[list[JobStatus] | None, Query()] = None,
) -> AsyncIterator[ServerSentEvent]:
    """The caller's jobs' events from now on, optionally one study's, or only status changes
    to the given statuses (and epochs, if `running` is one)."""
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
    async for event in service.all_jobs_stream(hub, factory, match, last_event_id):
        yield event
