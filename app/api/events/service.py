"""Event streams: a backlog read from the table after Last-Event-ID, then the hub's live events.

Every event is sent with its table id as the SSE id, and each id at most once per stream, so a
client that reconnects with the last id it saw misses nothing and sees nothing twice.
"""

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Callable

import anyio.to_thread
from fastapi.sse import ServerSentEvent
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.api.events.hub import EventHub
from app.core import events
from app.core.db import READ_ONLY
from app.core.events import Event
from app.core.models import Job
from app.core.models.jobs import ENDED_STATUSES

BACKLOG_LIMIT = 10_000


def to_sse(event: Event) -> ServerSentEvent:
    return ServerSentEvent(raw_data=json.dumps(event.payload), event=event.kind, id=str(event.id))


def ends_job(event: Event) -> bool:
    return event.kind == events.STATUS and event.payload.get("status") in ENDED_STATUSES


async def job_stream(
    hub: EventHub, factory: sessionmaker[Session], job_id: uuid.UUID, last_event_id: int
) -> AsyncIterator[ServerSentEvent]:
    """One job's events after `last_event_id`; ends after the event that ends the job."""
    subscription = await hub.subscribe(lambda event: event.job_id == job_id)
    try:

        def backlog() -> tuple[bool, list[Event]]:
            with factory(execution_options=READ_ONLY) as session:
                status = session.scalar(select(Job.status).where(Job.id == job_id))
                ended = status in ENDED_STATUSES
                # An ended job has no live events to come: read everything it has.
                until = None if ended else subscription.start_id
                found = events.read_events(
                    session,
                    after_id=last_event_id,
                    job_id=job_id,
                    until_id=until,
                    limit=BACKLOG_LIMIT,
                )
                return ended, found

        ended, found = await anyio.to_thread.run_sync(backlog)
        sent: set[int] = set()
        for event in found:
            sent.add(event.id)
            yield to_sse(event)
            if ends_job(event):
                return
        if ended:
            return
        async for event in _live(subscription.queue, sent, last_event_id, hub.max_stream_seconds):
            yield to_sse(event)
            if ends_job(event):
                return
    finally:
        hub.unsubscribe(subscription)


async def all_jobs_stream(
    hub: EventHub,
    factory: sessionmaker[Session],
    match: Callable[[Event], bool],
    last_event_id: int | None,
) -> AsyncIterator[ServerSentEvent]:
    """Every matching event from now on (after `last_event_id` when given); never ends."""
    subscription = await hub.subscribe(match)
    try:
        sent: set[int] = set()
        if last_event_id is not None:

            def backlog() -> list[Event]:
                with factory(execution_options=READ_ONLY) as session:
                    return events.read_events(
                        session,
                        after_id=last_event_id,
                        until_id=subscription.start_id,
                        limit=BACKLOG_LIMIT,
                    )

            for event in await anyio.to_thread.run_sync(backlog):
                if match(event):
                    sent.add(event.id)
                    yield to_sse(event)
        async for event in _live(
            subscription.queue, sent, last_event_id or 0, hub.max_stream_seconds
        ):
            yield to_sse(event)
    finally:
        hub.unsubscribe(subscription)


async def _live(
    queue: "asyncio.Queue[Event | None]", sent: set[int], after: int, max_seconds: float
) -> AsyncIterator[Event]:
    """The hub's events for one stream, each once, for at most `max_seconds`: a stream is not
    held for ever (a client reconnects with Last-Event-ID and misses nothing), so connections
    move between API processes and no stream outlives its usefulness."""
    deadline = asyncio.get_running_loop().time() + max_seconds
    while True:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            event = await asyncio.wait_for(queue.get(), timeout=max(remaining, 0))
        except TimeoutError:
            return
        if event is None:
            return  # the hub dropped a stream that fell behind; the client resumes from its id
        if event.id <= after or event.id in sent:
            continue
        sent.add(event.id)
        if len(sent) > 2 * BACKLOG_LIMIT:
            sent.difference_update(sorted(sent)[:BACKLOG_LIMIT])
        yield event
