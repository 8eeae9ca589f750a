"""What a stream needs before it starts: the hub, a job that exists (404 before the 200), and
an event id to resume after that the service issued (422 before the 200)."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Annotated

import anyio.to_thread
from fastapi import Depends, Header, Request
from sqlalchemy import select

from app.api.auth import CallerDep, still_authorized
from app.api.events import service
from app.api.events.hub import EventHub
from app.api.events.service import StreamSlots
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


async def last_event_id(
    request: Request,
    last_event_id: Annotated[
        str | None, Header(description="resume after this event id (sent by EventSource)")
    ] = None,
) -> int | None:
    """The id to resume after, refused before the stream starts unless the service issued it:
    told to resume after an id beyond the last, a stream would send nothing until ids caught up
    with it."""
    if last_event_id is None:
        return None

    def last_issued() -> int:
        with request.app.state.session_factory(execution_options=READ_ONLY) as session:
            return service.last_issued_id(session)

    if last_event_id.isascii() and last_event_id.isdigit() and len(last_event_id) <= 18:
        after_id = int(last_event_id)
        if after_id <= await anyio.to_thread.run_sync(last_issued):
            return after_id
    raise InvalidInput("Last-Event-ID", "must be an event id this service sent")


async def stream_slot(request: Request, caller: CallerDep) -> AsyncIterator[None]:
    """A place among the caller's tenant's open streams, refused (429) before the stream
    starts and held until it ends: a yield dependency's exit comes after the response."""
    slots: StreamSlots = request.app.state.stream_slots
    with slots.slot(caller.tenant):
        yield


def key_check(request: Request) -> Callable[[], Awaitable[bool]]:
    """How a stream asks, as it goes, whether its key still holds: a key revoked while its
    streams are open ends them (the 401 comes with the client's reconnect), as it ends every
    other use of the key."""
    return partial(still_authorized, request)


HubDep = Annotated[EventHub, Depends(get_hub)]
StreamedJobDep = Annotated[uuid.UUID, Depends(streamed_job)]
LastEventIdDep = Annotated[int | None, Depends(last_event_id)]
KeyCheckDep = Annotated[Callable[[], Awaitable[bool]], Depends(key_check)]
