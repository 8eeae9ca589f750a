"""Live events over SSE: every status change and epoch once, resumable, from the database."""

import asyncio
import json
import logging
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
from app.core.keys import create_key, revoke_key
from app.core.migrate import upgrade
from tests.factories import METRICS, make_job, spec_payload
from tests.support.documented import documented_client
from tests.support.processes import wait_until


@pytest.fixture
def committed(tmp_path: Path, redis_url: str) -> Iterator[tuple[Settings, sessionmaker[Session]]]:
    """A database whose rows are committed, as a worker in another process commits them."""
    url = f"sqlite:///{tmp_path / 'events.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    settings = Settings(database_url=url, broker_url=redis_url, event_poll_seconds=0.05, auth="off")
    yield settings, create_session_factory(engine)
    engine.dispose()


async def _key_holds() -> bool:
    return True


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
    return _read_stream(client, f"/v1/jobs/{job_id}/events", last_event_id)


def _read_stream(
    client: TestClient, path: str, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    """Every event of the stream at `path`, once it ends (the job's, or its longest life)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    with client.stream("GET", path, headers=headers) as response:
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
        # The queued event has the shape of every status event: a client reads one way.
        assert [e["data"] for e in first] == [
            {"job_id": job_id, "status": "queued", "attempt": 0, "epoch": 0}
        ]
        _train(factory, uuid.UUID(job_id), 1, 0)
        rest = _read(client, job_id, last_event_id=first[-1]["id"])
    assert [(e["event"], e["data"].get("status")) for e in rest] == [
        ("status", "running"),
        ("epoch", None),
        ("status", "succeeded"),
    ]
    statuses = [e["data"] for e in first + rest if e["event"] == "status"]
    assert {frozenset(data) for data in statuses} == {
        frozenset({"job_id", "status", "attempt", "epoch"})
    }


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
            asyncio.create_task(_collect(service._live(s.queue, set(), 0, 300, _key_holds)))
            for s in open_streams
        ]
        await asyncio.sleep(0.05)
        await hub.close()
        late = await hub.subscribe(lambda event: True)
        followers.append(
            asyncio.create_task(_collect(service._live(late.queue, set(), 0, 300, _key_holds)))
        )
        return list(await asyncio.wait_for(asyncio.gather(*followers), timeout=5))

    assert asyncio.run(streams_after_close()) == [[], [], [], []]


async def _collect(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


def test_resuming_every_jobs_stream_from_further_back_than_a_page_misses_nothing(
    committed: tuple[Settings, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backlog of /v1/events was one page read up to where the hub took over, and filtered
    after the limit: a client resuming from further back missed everything past the page, and
    one following a study whose events all lay past it got nothing at all."""
    settings, factory = committed
    settings = settings.model_copy(update={"event_stream_max_seconds": 0.5})
    monkeypatch.setattr(service, "BACKLOG_LIMIT", 5)
    with documented_client(create_app(settings)) as client:
        body = {"base": spec_payload(), "grid": {"seed": [0, 1]}}
        study = client.post("/v1/studies", json=body).json()
        other = uuid.UUID(client.post("/v1/jobs", json=spec_payload()).json()["id"])
        with transaction(factory) as session:
            resume_after = events.last_event_id(session)
            for epoch in range(1, 13):  # another job's: more than two pages
                events.record_epoch(session, other, epoch, {})
            for epoch in (1, 2):
                for job in study["jobs"]:
                    events.record_epoch(session, uuid.UUID(job["id"]), epoch, {})
        with transaction(factory, write=False) as session:
            stored = events.read_events(session, after_id=resume_after, limit=100)
        everything = _read_stream(client, "/v1/events", str(resume_after))
        one_study = _read_stream(client, f"/v1/events?study_id={study['id']}", str(resume_after))

    assert len(stored) == 16
    assert [e["id"] for e in everything] == [str(event.id) for event in stored]
    study_events = [str(event.id) for event in stored if str(event.study_id) == study["id"]]
    assert len(study_events) == 4
    assert [e["id"] for e in one_study] == study_events


def test_a_job_stream_from_further_back_than_a_page_misses_nothing(
    committed: tuple[Settings, sessionmaker[Session]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job's stream read one page of its events: a running job's stream then fell silent
    (the rest were older than the live events), an ended job's stopped short of its end."""
    settings, factory = committed
    settings = settings.model_copy(update={"event_stream_max_seconds": 0.5})
    monkeypatch.setattr(service, "BACKLOG_LIMIT", 5)
    with documented_client(create_app(settings)) as client:
        job_id = client.post("/v1/jobs", json=spec_payload(epochs=12)).json()["id"]
        with transaction(factory) as session:
            claim = lifecycle.claim(session, uuid.UUID(job_id), "node@host#1", 30)
        assert claim is not None
        for epoch in range(1, 12):
            with transaction(factory) as session:
                lifecycle.record_epoch(
                    session, uuid.UUID(job_id), claim.attempt, epoch, METRICS, {}, [], 30
                )
        running = _read(client, job_id)  # ends after its longest life: the job goes on
        with transaction(factory) as session:
            lifecycle.finish(session, uuid.UUID(job_id), claim.attempt, "succeeded", summary={})
        ended = _read(client, job_id)  # ends with the job's last event
        resumed = _read(client, job_id, last_event_id=ended[1]["id"])
        with transaction(factory, write=False) as session:
            stored = [str(e.id) for e in events.read_events(session, job_id=uuid.UUID(job_id))]

    assert len(stored) == 14  # queued, running, 11 epochs, succeeded
    assert [e["id"] for e in running] == stored[:-1]
    assert [e["id"] for e in ended] == stored
    assert ended[-1]["data"]["status"] == "succeeded"
    assert [e["id"] for e in resumed] == stored[2:]


def test_a_stream_without_last_event_id_starts_now_even_after_a_quiet_burst(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    """The hub stops polling while nobody listens, and kept its cursor from before: the next
    stream was sent every event since (old news, to a stream that asked for what comes from
    now on), and with more than its queue holds, it was closed."""
    settings, factory = committed
    settings = settings.model_copy(update={"event_stream_max_seconds": 1.5})
    with documented_client(create_app(settings)) as client:
        hub = client.app.state.event_hub  # type: ignore[attr-defined]
        job_id = uuid.UUID(client.post("/v1/jobs", json=spec_payload()).json()["id"])
        assert _read_stream(client, "/v1/events") == []  # the hub polls, then nobody listens
        with transaction(factory) as session:
            for epoch in range(1, QUEUE_SIZE + 11):  # a burst, with nobody listening
                events.record_epoch(session, job_id, epoch, {})
        got: list[dict[str, Any]] = []
        reader = threading.Thread(target=lambda: got.extend(_read_stream(client, "/v1/events")))
        reader.start()
        wait_until(lambda: hub.subscriptions or not reader.is_alive(), 10, "the stream")
        with transaction(factory) as session:
            events.record_epoch(session, job_id, QUEUE_SIZE + 11, {})
            now = events.last_event_id(session)
        reader.join(timeout=30)

    assert [e["id"] for e in got] == [str(now)]


@pytest.mark.parametrize("path", ["/v1/events", "/v1/jobs/{job_id}/events"])
def test_a_last_event_id_beyond_the_last_issued_is_refused_before_the_stream(
    client: TestClient, session: Session, path: str
) -> None:
    """It was a 200, then silence until the stream's longest life (every id up to it was
    skipped), and again on every reconnect."""
    client.app.state.event_hub.max_stream_seconds = 0.2  # type: ignore[attr-defined]
    job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
    path = path.format(job_id=job_id)
    last = events.last_event_id(session)  # the queued event just recorded
    for beyond in (str(last + 1), "999999999999999999"):
        refused = client.get(path, headers={"Last-Event-ID": beyond})
        assert refused.status_code == 422
        assert refused.json() == {
            "error": "validation_error",
            "detail": [
                {"field": "Last-Event-ID", "message": "must be an event id this service sent"}
            ],
        }
    assert client.get(path, headers={"Last-Event-ID": str(last)}).status_code == 200


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
def test_a_last_event_id_of_a_deleted_job_is_still_one_the_service_sent(
    client: TestClient, session: Session
) -> None:
    """Deleting a job deletes its events, perhaps the newest: on PostgreSQL no later event
    reuses their ids, so a client that saw one resumes after it. (SQLite gives the next event
    the highest id there plus one, a deleted one's perhaps: there the id is refused.)"""
    client.app.state.event_hub.max_stream_seconds = 0.2  # type: ignore[attr-defined]
    job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
    seen = events.last_event_id(session)
    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert events.last_event_id(session) < seen
    assert client.get("/v1/events", headers={"Last-Event-ID": str(seen)}).status_code == 200


def test_a_client_leaving_a_stream_is_not_an_error(
    committed: tuple[Settings, sessionmaker[Session]], caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves while events are still being sent to it: FastAPI's SSE keepalive
    task raised BrokenResourceError, logged as an unhandled error and an exception in the ASGI
    application, for the most ordinary of disconnects."""
    settings, factory = committed
    with transaction(factory) as session:
        job = make_job(session, status="running")
        for epoch in range(1, 201):
            events.record_epoch(session, job.id, epoch, {})
    app = create_app(settings)
    sent: list[bytes] = []

    async def follow_then_leave() -> None:
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.append(message["body"])
                if len(sent) == 3:
                    gone.set()  # the client leaves
                await asyncio.sleep(0.01)  # a socket that drains slowly, as they do

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},  # uvicorn's
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": f"/v1/jobs/{job.id}/events",
            "raw_path": f"/v1/jobs/{job.id}/events".encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"testserver")],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
            "state": {},
        }
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app(scope, receive, send), timeout=30)  # type: ignore[arg-type]

    with caplog.at_level(logging.INFO):
        asyncio.run(follow_then_leave())
    assert len(sent) == 3  # it left mid-stream
    assert [
        record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR
    ] == []


def test_an_event_committed_late_across_a_restart_of_the_hub_is_delivered(
    fresh_postgres_url: str,
) -> None:
    """Restarted from the table's last event (the first stream after a quiet spell), the hub
    still asks for the ids missing just below it, as if it had been polling: an event inserted
    before that last one but committed after is delivered. (PostgreSQL: SQLite has one writer
    at a time, so its ids commit in order.)"""
    engine = create_db_engine(fresh_postgres_url)
    factory = create_session_factory(engine)
    with transaction(factory) as session:
        job = make_job(session, status="running")

    async def follow() -> list[int]:
        hub = EventHub(factory, poll_seconds=0.01)
        with factory() as late:
            events.record_epoch(late, job.id, 1, {})  # its id is taken; not yet committed
            with transaction(factory) as session:
                events.record_epoch(session, job.id, 2, {})
            subscription = await hub.subscribe(lambda event: True)
            late.commit()
        got = [
            event async for event in service._live(subscription.queue, set(), 0, 0.5, _key_holds)
        ]
        await hub.close()
        return [event.payload["epoch"] for event in got]

    try:
        assert asyncio.run(follow()) == [1]
    finally:
        engine.dispose()


@pytest.mark.parametrize("path", ["/v1/jobs/{job_id}/events", "/v1/events"])
def test_a_stream_ends_when_its_key_is_revoked_and_cannot_be_reopened(
    committed: tuple[Settings, sessionmaker[Session]], path: str
) -> None:
    """A revoked key was refused on every new request, but a stream it had opened went on
    sending the tenant's events until its longest life (300 s by default) was over."""
    settings, factory = committed
    settings = settings.model_copy(
        update={"auth": "on", "key_cache_seconds": 0, "event_stream_max_seconds": 10}
    )
    with transaction(factory) as session:
        row, key = create_key(session, "acme")
    with documented_client(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]

        def revoke() -> None:
            with transaction(factory) as session:
                revoke_key(session, row.id)

        threading.Timer(0.5, revoke).start()
        started = time.monotonic()
        _read_stream(client, path.format(job_id=job_id))
        assert time.monotonic() - started < 4
        refused = client.get(path.format(job_id=job_id))
    assert refused.status_code == 401
    assert refused.json()["error"] == "revoked_key"


def test_a_tenant_may_hold_only_so_many_streams_open_and_another_is_not_counted(
    committed: tuple[Settings, sessionmaker[Session]],
) -> None:
    """Streams were not counted: one tenant could open as many as the process would take
    connections, leaving none for anyone else. The one beyond the limit is a 429 before the
    stream starts; a stream that ends gives its place back."""
    settings, factory = committed
    settings = settings.model_copy(update={"auth": "on", "tenant_max_streams": 2})
    with transaction(factory) as session:
        acme, globex = (create_key(session, tenant)[1] for tenant in ("acme", "globex"))
    app = create_app(settings)

    class Stream:
        def __init__(self, key: str) -> None:
            self.started: asyncio.Future[dict[str, Any]] = asyncio.Future()
            self.body = b""
            self.gone = asyncio.Event()
            scope = {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "method": "GET",
                "scheme": "http",
                "path": "/v1/events",
                "raw_path": b"/v1/events",
                "query_string": b"",
                "root_path": "",
                "headers": [(b"host", b"testserver"), (b"authorization", f"Bearer {key}".encode())],
                "client": ("127.0.0.1", 50000),
                "server": ("testserver", 80),
                "state": {},
            }
            self.task = asyncio.create_task(app(scope, self.receive, self.send))  # type: ignore[arg-type]

        async def receive(self) -> dict[str, Any]:
            await self.gone.wait()
            return {"type": "http.disconnect"}

        async def send(self, message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.started.set_result(message)
            elif message["type"] == "http.response.body":
                self.body += message.get("body", b"")

        async def status(self) -> int:
            return int((await asyncio.wait_for(self.started, timeout=10))["status"])

        async def leave(self) -> None:
            self.gone.set()
            await asyncio.wait_for(self.task, timeout=10)

    async def scenario() -> None:
        async with app.router.lifespan_context(app):
            first, second = Stream(acme), Stream(acme)
            assert [await first.status(), await second.status()] == [200, 200]
            third = Stream(acme)
            refused = await third.started
            await asyncio.wait_for(third.task, timeout=10)
            assert refused["status"] == 429
            assert int(dict(refused["headers"])[b"retry-after"]) >= 1
            assert json.loads(third.body)["error"] == "too_many_streams"
            other = Stream(globex)  # another tenant's streams are counted apart
            assert await other.status() == 200
            await first.leave()
            fourth = Stream(acme)
            assert await fourth.status() == 200
            for stream in (second, other, fourth):
                await stream.leave()

    asyncio.run(scenario())
