"""Live events as Server-Sent Events: one job's, or every job's."""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from app.api.events import service
from app.api.events.dependencies import HubDep, LastEventIdDep, StreamedJobDep
from app.core.events import EPOCH, STATUS, Event
from app.core.models.jobs import JOB_STATUSES

router = APIRouter(prefix="/v1", tags=["events"])


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
    last_event_id: LastEventIdDep,
    status: Annotated[list[str] | None, Query(description=f"any of {JOB_STATUSES}")] = None,
) -> AsyncIterator[ServerSentEvent]:
    """Every job's events from now on, optionally only for jobs in the given statuses."""
    wanted = set(status or ())

    def match(event: Event) -> bool:
        if not wanted:
            return True
        if event.kind == STATUS:
            return event.payload.get("status") in wanted
        return event.kind == EPOCH and "running" in wanted

    factory = request.app.state.session_factory
    async for event in service.all_jobs_stream(hub, factory, match, last_event_id):
        yield event
