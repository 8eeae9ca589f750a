"""Event streams: a backlog read from the table after Last-Event-ID, then the hub's live events.

Every event is sent with its table id as the SSE id, and each id at most once per stream, so a
client that reconnects with the last id it saw misses nothing and sees nothing twice.
"""

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager

import anyio.to_thread
from fastapi.sse import ServerSentEvent
from sqlalchemy import select, text
from sqlalchemy.orm import Session, sessionmaker

from app.api.events.hub import EventHub, Subscription
from app.core import events
from app.core.db import READ_ONLY
from app.core.errors import LimitExceeded
from app.core.events import Event
from app.core.models import Job
from app.core.models.jobs import ENDED_STATUSES

BACKLOG_LIMIT = 10_000  # events read from the table at a time
# How often a live stream asks whether its key still holds: a revoked key's streams end
# within about this long of the revocation reaching the key cache.
KEY_CHECK_SECONDS = 1.0

KeyCheck = Callable[[], Awaitable[bool]]


class TooManyStreams(LimitExceeded):
    """The tenant has TRAINSVC_TENANT_MAX_STREAMS streams open on this process: close one."""

    code = "too_many_streams"
    retry_after_seconds = 5


class StreamSlots:
    """At most `per_tenant` open streams for each tenant; the one beyond is refused before it
    starts. On the event loop only, so a count needs no lock."""

    def __init__(self, per_tenant: int) -> None:
        self.per_tenant = per_tenant
        self._open: Counter[str] = Counter()

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        if self._open[tenant] >= self.per_tenant:
            raise TooManyStreams(
                f"tenant {tenant!r} has {self._open[tenant]} event streams open here; the limit "
                f"is {self.per_tenant} (TRAINSVC_TENANT_MAX_STREAMS)"
            )
        self._open[tenant] += 1
        try:
            yield
        finally:
            self._open[tenant] -= 1
            if not self._open[tenant]:
                del self._open[tenant]


def last_issued_id(session: Session) -> int:
    """The highest event id issued so far: every event to come gets a higher one."""
    if session.get_bind().dialect.name == "postgresql":
        # The id sequence's, not the table's highest: deleting a job deletes its events, the
        # newest perhaps, and a client that saw one still resumes after it.
        issued = session.scalar(
            text("SELECT pg_sequence_last_value(pg_get_serial_sequence('job_events', 'id'))")
        )
        return issued or 0
    # SQLite numbers a new row after the highest id there, even one a deleted row had.
    return events.last_event_id(session)


def to_sse(event: Event) -> ServerSentEvent:
    return ServerSentEvent(raw_data=json.dumps(event.payload), event=event.kind, id=str(event.id))


def ends_job(event: Event) -> bool:
    return event.kind == events.STATUS and event.payload.get("status") in ENDED_STATUSES


async def job_stream(
    hub: EventHub,
    factory: sessionmaker[Session],
    job_id: uuid.UUID,
    last_event_id: int,
    key_check: KeyCheck,
) -> AsyncIterator[ServerSentEvent]:
    """One job's events after `last_event_id`; ends after the event that ends the job."""
    subscription = await hub.subscribe(lambda event: event.job_id == job_id)
    try:
        ended = await anyio.to_thread.run_sync(_has_ended, factory, job_id)
        # An ended job has no live events to come: everything it has is in the table.
        stream = _events(
            subscription, factory, last_event_id, hub.max_stream_seconds, key_check, job_id, ended
        )
        async for event in stream:
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
    key_check: KeyCheck,
) -> AsyncIterator[ServerSentEvent]:
    """Every matching event from now on (after `last_event_id` when given); never ends."""
    subscription = await hub.subscribe(match)
    try:
        stream = _events(subscription, factory, last_event_id, hub.max_stream_seconds, key_check)
        async for event in stream:
            yield to_sse(event)
    finally:
        hub.unsubscribe(subscription)


def _has_ended(factory: sessionmaker[Session], job_id: uuid.UUID) -> bool:
    with factory(execution_options=READ_ONLY) as session:
        return session.scalar(select(Job.status).where(Job.id == job_id)) in ENDED_STATUSES


async def _events(
    subscription: Subscription,
    factory: sessionmaker[Session],
    after_id: int | None,
    max_seconds: float,
    key_check: KeyCheck,
    job_id: uuid.UUID | None = None,
    ended: bool = False,
) -> AsyncIterator[Event]:
    """The subscription's events after `after_id`: from the table up to where the hub took
    over, then from the hub (for at most `max_seconds`); an ended job's all from the table.
    With no `after_id`, from the hub only: the stream starts now."""
    sent: set[int] = set()
    if after_id is not None:
        until_id = None if ended else subscription.start_id
        async for event in _backlog(factory, after_id, until_id, job_id):
            if not subscription.match(event):
                continue
            if event.id in subscription.awaited:
                sent.add(event.id)  # committed late: the hub may deliver it as well
            yield event
    if not ended:
        live = _live(subscription.queue, sent, after_id or 0, max_seconds, key_check)
        async for event in live:
            yield event


async def _backlog(
    factory: sessionmaker[Session], after_id: int, until_id: int | None, job_id: uuid.UUID | None
) -> AsyncIterator[Event]:
    """The table's events after `after_id` (up to `until_id`; one job's if `job_id`), a page
    at a time: a client resuming from far back gets every one, and a stream holds one page."""
    while True:
        page = await anyio.to_thread.run_sync(_read_page, factory, after_id, until_id, job_id)
        for event in page:
            yield event
        if len(page) < BACKLOG_LIMIT:
            return
        after_id = page[-1].id


def _read_page(
    factory: sessionmaker[Session], after_id: int, until_id: int | None, job_id: uuid.UUID | None
) -> list[Event]:
    with factory(execution_options=READ_ONLY) as session:
        return events.read_events(
            session, after_id=after_id, job_id=job_id, until_id=until_id, limit=BACKLOG_LIMIT
        )


async def _live(
    queue: "asyncio.Queue[Event | None]",
    sent: set[int],
    after: int,
    max_seconds: float,
    key_check: KeyCheck,
) -> AsyncIterator[Event]:
    """The hub's events for one stream, each once, for at most `max_seconds`: a stream is not
    held for ever (a client reconnects with Last-Event-ID and misses nothing), so connections
    move between API processes and no stream outlives its usefulness. Nor its key: asked
    every KEY_CHECK_SECONDS, a key revoked since the stream began ends it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    next_check = loop.time() + KEY_CHECK_SECONDS
    while True:
        now = loop.time()
        if now >= deadline:
            return
        if now >= next_check:
            if not await key_check():
                return
            next_check = now + KEY_CHECK_SECONDS
        try:
            event = await asyncio.wait_for(queue.get(), timeout=min(deadline, next_check) - now)
        except TimeoutError:
            continue
        if event is None:
            return  # the hub dropped a stream that fell behind; the client resumes from its id
        if event.id <= after or event.id in sent:
            continue
        sent.add(event.id)
        if len(sent) > 2 * BACKLOG_LIMIT:
            sent.difference_update(sorted(sent)[:BACKLOG_LIMIT])
        yield event
