"""What a stream needs before it starts: the hub, and a job that exists (404 before the 200)."""

import uuid
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Header, Request
from sqlalchemy import select

from app.api.auth import CallerDep
from app.api.events.hub import EventHub
from app.core.db import READ_ONLY
from app.core.errors import InvalidInput, JobNotFound
from app.core.models import Job
from app.core.tenancy import scoped


def get_hub(request: Request) -> EventHub:
    hub: EventHub = request.app.state.event_hub
    return hub


async def streamed_job(job_id: uuid.UUID, request: Request, caller: CallerDep) -> uuid.UUID:
    """The caller's job must exist before the stream answers 200 (another tenant's is not
    found, like an unknown id). The session is closed at once: a stream may last hours and
    must not hold a database connection."""

    def exists() -> bool:
        query = scoped(select(Job.id).where(Job.id == job_id), Job, caller)
        with request.app.state.session_factory(execution_options=READ_ONLY) as session:
            return session.scalar(query) is not None

    if not await anyio.to_thread.run_sync(exists):
        raise JobNotFound(f"no job {job_id}")
    return job_id


def last_event_id(
    last_event_id: Annotated[
        str | None, Header(description="resume after this event id (sent by EventSource)")
    ] = None,
) -> int | None:
    if last_event_id is None:
        return None
    if not last_event_id.isascii() or not last_event_id.isdigit() or len(last_event_id) > 18:
        raise InvalidInput("Last-Event-ID", "must be an event id this service sent")
    return int(last_event_id)


HubDep = Annotated[EventHub, Depends(get_hub)]
StreamedJobDep = Annotated[uuid.UUID, Depends(streamed_job)]
LastEventIdDep = Annotated[int | None, Depends(last_event_id)]
