"""One shared poll of the job_events table per API process, fanned out to every open stream.

However many clients follow jobs, a process reads the table once per tick (and not at all
while nobody listens: the first stream after a quiet spell starts the hub afresh from the
table's last event, so what happened meanwhile is not news to it). Ids are assigned at insert
but become visible at commit, so a later id can be seen before an earlier one: the hub
remembers such gaps for a while and asks for them again, so an event that commits late is
still delivered, and a stream that falls behind is closed (its client reconnects with
Last-Event-ID and replays from the table).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import anyio.to_thread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.core import events
from app.core.db import READ_ONLY
from app.core.events import Event
from app.core.models import JobEvent

logger = logging.getLogger(__name__)

# How long a missing id is asked for again before it is taken for a rolled-back insert.
GAP_SECONDS = 10.0
MAX_GAPS = 10_000
QUEUE_SIZE = 1000
# Started afresh, the hub takes the ids missing this close below the table's last one for gaps:
# an insert still in flight then is delivered when it commits, as if the hub had been polling.
RECENT_IDS = 1000


@dataclass(eq=False)
class Subscription:
    match: Callable[[Event], bool]
    start_id: int  # events up to this id come from the table, later ones from the hub
    # The ids up to start_id that the hub was still waiting for when the stream began: if one
    # commits, the hub delivers it too, though the table may have given it already.
    awaited: frozenset[int] = frozenset()
    queue: asyncio.Queue[Event | None] = field(default_factory=lambda: asyncio.Queue(QUEUE_SIZE))


class EventHub:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        poll_seconds: float,
        max_stream_seconds: float = 300.0,
    ) -> None:
        self.session_factory = session_factory
        self.poll_seconds = poll_seconds
        self.max_stream_seconds = max_stream_seconds
        self.cursor = 0
        self.gaps: dict[int, float] = {}
        self.subscriptions: set[Subscription] = set()
        self._listening = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._generation = 0  # counts restarts: a poll begun before one is stale

    async def subscribe(self, match: Callable[[Event], bool]) -> Subscription:
        if not self.subscriptions:
            # Nobody listened, so the hub did not poll: its cursor is from before the quiet,
            # and the events since then are the table's to replay (to a client that names its
            # Last-Event-ID), not live news for whoever listens next.
            last_id, missing = await anyio.to_thread.run_sync(self._latest)
            if not self.subscriptions:  # else another stream restarted the hub meanwhile
                self._restart(last_id, missing)
        subscription = Subscription(match, self.cursor, frozenset(self.gaps))
        if self._closed:  # the server is stopping: a stream that begins now ends at once
            subscription.queue.put_nowait(None)
            return subscription
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="event-hub")
        self.subscriptions.add(subscription)
        self._listening.set()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        self.subscriptions.discard(subscription)
        if not self.subscriptions:
            self._listening.clear()

    async def close(self) -> None:
        """Stop polling and end every open stream (each client resumes from Last-Event-ID,
        elsewhere or once this process is back). Called as the server begins to stop: until
        its connections have closed, it does not shut the app down."""
        self._closed = True
        for subscription in list(self.subscriptions):
            self._end(subscription)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            await self._listening.wait()
            try:
                batch = await self._poll()
            except Exception:
                # The database is away for a moment: streams wait, and resume when it answers.
                logger.warning("event poll failed; retrying", exc_info=True)
                batch = []
            for event in batch:
                self._deliver(event)
            if len(batch) < 1000:
                await asyncio.sleep(self.poll_seconds)

    def _latest(self) -> tuple[int, list[int]]:
        """The table's last event id, and the ids just below it that are not (yet) there."""
        with self.session_factory(execution_options=READ_ONLY) as session:
            last_id = events.last_event_id(session)
            recent = range(max(last_id - RECENT_IDS, 0) + 1, last_id)
            present = set(session.scalars(select(JobEvent.id).where(JobEvent.id >= recent.start)))
        return last_id, [missing for missing in recent if missing not in present]

    def _restart(self, last_id: int, missing: list[int]) -> None:
        self.cursor = last_id
        self.gaps = dict.fromkeys(missing, time.monotonic())
        self._generation += 1

    def _read(self, after_id: int, ids: list[int]) -> list[Event]:
        with self.session_factory(execution_options=READ_ONLY) as session:
            return events.read_events(session, after_id=after_id, ids=ids)

    async def _poll(self) -> list[Event]:
        """The events committed since the last poll, with the cursor and gaps moved past them.
        The table is read in a thread, the hub's state changed only here, on the event loop:
        a stream that subscribes meanwhile sees the cursor before the batch or after it, with
        the batch delivered to it accordingly, never half of one."""
        generation = self._generation
        now = time.monotonic()
        self.gaps = {gap: seen for gap, seen in self.gaps.items() if now - seen < GAP_SECONDS}
        batch = await anyio.to_thread.run_sync(self._read, self.cursor, list(self.gaps))
        if generation != self._generation:
            return []  # restarted while reading: the batch is from before the restart
        for event in batch:
            self.gaps.pop(event.id, None)
            if event.id > self.cursor:
                missing = range(self.cursor + 1, event.id)
                if len(self.gaps) + len(missing) <= MAX_GAPS:
                    self.gaps.update(dict.fromkeys(missing, now))
                self.cursor = event.id
        return batch

    def _deliver(self, event: Event) -> None:
        for subscription in list(self.subscriptions):
            if not subscription.match(event):
                continue
            try:
                subscription.queue.put_nowait(event)
            except asyncio.QueueFull:
                # A client too slow to read: end its stream; it resumes from Last-Event-ID.
                self._end(subscription)

    def _end(self, subscription: Subscription) -> None:
        """End a stream: its reader gets None next. The events still queued for it are dropped
        with it, all of them: its client resumes after the last event it got, so they come again
        from the table (dropping only the oldest, to make room, lost that one for good)."""
        self.unsubscribe(subscription)
        while not subscription.queue.empty():
            subscription.queue.get_nowait()
        subscription.queue.put_nowait(None)
