"""Live events over SSE: every status change and epoch once, resumable, from the database."""

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.api.events import service
from app.api.events.hub import QUEUE_SIZE, EventHub
from app.api.main import create_app
from app.core import events, lifecycle
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.events import Event
from app.core.migrate import upgrade
from tests.factories import METRICS, make_job, spec_payload
from tests.support.documented import documented_client


@pytest.fixture
def committed(tmp_path: Path, redis_url: str) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    """A database whose rows are committed, as a worker in another process commits them."""
    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    settings = Settings(database_url=url, broker_url=redis_url, event_poll_seconds=0.05, auth="off")
    yield settings, create_session_factory(engine)
    engine.dispose()


def _train(factory: sessionmaker[Session], job_id: uuid.UUID, epochs: int, pause: float) -> None:
    """What a worker records: claim, each epoch, success; with pauses so streams see it live."""
    with transaction(factory) as session:
        claim = lifecycle.claim(session, job_id, "node@host#1", 30)
    assert claim is not None
    for epoch in range(1, epochs + 1):
        time.sleep(pause)
        with transaction(factory) as session:
            lifecycle.record_epoch(session, job_id, claim.attempt, epoch, METRICS, {}, [], 30)
    with transaction(factory) as session:
        lifecycle.finish(session, job_id, claim.attempt, "succeeded", summary={})


def _read(
    client: TestClient, job_id: str, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(": ")
                current[name] = json.loads(value) if name == "data" else value
    return events


def test_a_job_stream_sends_every_change_once_and_resumes_after_last_event_id(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = committed
    with documented_client(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=spec_payload(epochs=3)).json()["id"]
        worker = threading.Thread(target=_train, args=(factory, uuid.UUID(job_id), 3, 0.2))
        worker.start()
        events = _read(client, job_id)  # ends by itself when the job does
        worker.join()

    kinds = [(e["event"], e["data"].get("status") or e["data"].get("epoch")) for e in events]
    assert kinds == [
        ("status", "queued"),
        ("status", "running"),
        ("epoch", 1),
        ("epoch", 2),
        ("epoch", 3),
        ("status", "succeeded"),
    ]
    ids = [int(e["id"]) for e in events]
    assert ids == sorted(set(ids))
    assert events[2]["data"]["val_accuracy"] == METRICS["val_accuracy"]

    # A new API process (a restart) resumes from the table: after epoch 2, only what followed.
    with documented_client(create_app(settings)) as restarted:
        resumed = _read(restarted, job_id, last_event_id=events[3]["id"])
        assert [e["id"] for e in resumed] == [events[4]["id"], events[5]["id"]]
        assert _read(restarted, job_id, last_event_id=events[5]["id"]) == []


def test_unknown_jobs_and_bad_event_ids_are_refused_before_the_stream_starts(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, _ = committed
    with documented_client(create_app(settings)) as client:
        missing = client.get(f"/v1/jobs/{uuid.uuid4()}/events")
        assert missing.status_code == 404
        assert missing.json()["error"] == "job_not_found"
        job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
        bad = client.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "x1"})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["field"] == "Last-Event-ID"


def test_one_poll_serves_every_stream_of_a_process(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    """Ten clients following ten jobs cost one query per tick, not ten."""
    settings, factory = committed
    with documented_client(create_app(settings)) as client:
        hub = client.app.state.event_hub  # type: ignore[attr-defined]
        jobs = [
            client.post("/v1/jobs", json=spec_payload(epochs=1)).json()["id"] for _ in range(10)
        ]
        polls = 0
        original = hub._poll

        def counting_poll() -> Any:
            nonlocal polls
            polls += 1
            return original()

        hub._poll = counting_poll
        results: dict[str, list[dict[str, Any]]] = {}
        readers = [
            threading.Thread(target=lambda j=j: results.__setitem__(j, _read(client, j)))
            for j in jobs
        ]
        for reader in readers:
            reader.start()
        started = time.monotonic()
        time.sleep(0.5)
        for job_id in jobs:
            _train(factory, uuid.UUID(job_id), 1, 0)
        for reader in readers:
            reader.join(timeout=30)
        elapsed = time.monotonic() - started
    assert [results[j][-1]["data"].get("status") for j in jobs] == ["succeeded"] * len(jobs)
    # One shared poll every 0.05 s over the run, give or take: far below 10 streams x ticks.
    assert polls <= elapsed / settings.event_poll_seconds + 5


def test_a_stream_ends_after_its_longest_life_and_a_reconnect_misses_nothing(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, factory = committed
    settings = settings.model_copy(update={"event_stream_max_seconds": 0.5})
    with documented_client(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=spec_payload(epochs=1)).json()["id"]
        started = time.monotonic()
        first = _read(client, job_id)  # the job waits: the stream ends on its own
        assert time.monotonic() - started < 10
        assert [e["data"]["status"] for e in first] == ["queued"]
        _train(factory, uuid.UUID(job_id), 1, 0)
        rest = _read(client, job_id, last_event_id=first[-1]["id"])
    assert [(e["event"], e["data"].get("status")) for e in rest] == [
        ("status", "running"),
        ("epoch", None),
        ("status", "succeeded"),
    ]


def test_a_stream_too_slow_to_keep_up_ends_and_its_resume_misses_nothing(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    """A client that reads nothing while more events arrive than its queue holds: its stream
    ends, and what it got plus what it reads again from its last event id is every event."""
    _, factory = committed
    with transaction(factory) as session:
        job = make_job(session, status="running")
    count = QUEUE_SIZE + 10

    async def follow_without_reading() -> tuple[list[int], int]:
        hub = EventHub(factory, poll_seconds=0.01)
        subscription = await hub.subscribe(lambda event: True)
        with transaction(factory) as session:
            for epoch in range(1, count + 1):
                events.record_epoch(session, job.id, epoch, {})
        deadline = time.monotonic() + 30
        while subscription in hub.subscriptions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await hub.close()
        got: list[int] = []
        while (event := subscription.queue.get_nowait()) is not None:
            got.append(event.id)
        return got, subscription.start_id

    got, start = asyncio.run(follow_without_reading())
    assert len(got) < count  # it fell behind, and its stream ended
    with transaction(factory, write=False) as session:
        stored = [event.id for event in events.read_events(session, job_id=job.id, limit=2 * count)]
        again = events.read_events(session, after_id=got[-1] if got else start, limit=2 * count)
    assert len(stored) == count
    assert sorted(got + [event.id for event in again]) == stored


def test_closing_the_hub_ends_every_open_stream_and_any_that_begins_after(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    """What the server does as it begins to stop (app/api/server.py): streams end at once
    rather than after event_stream_max_seconds, and their clients resume elsewhere."""
    _, factory = committed

    async def streams_after_close() -> list[list[Event]]:
        hub = EventHub(factory, poll_seconds=0.01, max_stream_seconds=300)
        open_streams = [await hub.subscribe(lambda event: True) for _ in range(3)]
        followers = [
            asyncio.create_task(_collect(service._live(s.queue, set(), 0, 300)))
            for s in open_streams
        ]
        await asyncio.sleep(0.05)
        await hub.close()
        late = await hub.subscribe(lambda event: True)
        followers.append(asyncio.create_task(_collect(service._live(late.queue, set(), 0, 300))))
        return list(await asyncio.wait_for(asyncio.gather(*followers), timeout=5))

    assert asyncio.run(streams_after_close()) == [[], [], [], []]


async def _collect(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]
