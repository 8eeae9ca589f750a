"""The embedded default under load: on SQLite a reader never waits for a writer, and a unit of
work that writes never fails halfway because another writer committed meanwhile."""

import io
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import sessionmaker

from app.api.main import create_app
from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.keys import create_key
from app.core.migrate import upgrade
from app.core.models import ApiKey, Job
from app.core.outbox import Dispatcher
from app.core.spec import JobSpec
from tests.factories import make_checkpoint, make_job, spec_payload
from tests.support.documented import documented_client
from worker import execution
from worker.execution import WorkerContext


@pytest.fixture
def sqlite_file(tmp_path: Path) -> str:
    path = tmp_path / "trainsvc.db"
    upgrade(f"sqlite:///{path}")
    return str(path)


@pytest.fixture
def job_id(sqlite_file: str) -> Iterator[str]:
    engine = create_db_engine(f"sqlite:///{sqlite_file}")
    with transaction(create_session_factory(engine)) as session:
        job = make_job(session, status="running")
    yield str(job.id)
    engine.dispose()


@pytest.fixture
def open_writer(sqlite_file: str) -> Iterator[sqlite3.Connection]:
    """A worker in the middle of recording an epoch: a write transaction held open."""
    writer = sqlite3.connect(sqlite_file, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("UPDATE jobs SET progress_epoch = progress_epoch + 1")
    yield writer
    writer.rollback()
    writer.close()


def test_a_get_answers_while_a_worker_holds_the_write_lock(
    sqlite_file: str, job_id: str, tmp_path: Path
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{sqlite_file}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    )
    engine = create_db_engine(settings.database_url)
    with transaction(create_session_factory(engine)) as session:
        # A key used once to warm up, and one first used behind the writer: its lookup reads
        # beside the writer, and its last_used_at is written once the writer is done.
        warm, fresh = (create_key(session, "default")[1] for _ in range(2))
    engine.dispose()
    with documented_client(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {warm}"
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200  # warm: connection, imports
        client.headers["Authorization"] = f"Bearer {fresh}"
        writer = sqlite3.connect(sqlite_file, isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET progress_epoch = 7")
        answers: list[tuple[int, float]] = []

        def get() -> None:
            started = time.perf_counter()
            response = client.get(f"/v1/jobs/{job_id}")
            answers.append((response.status_code, time.perf_counter() - started))

        reader = threading.Thread(target=get)
        reader.start()
        reader.join(timeout=5)  # before the fix the GET waits here for the writer to finish
        writer.rollback()
        writer.close()
        reader.join()
        # The fresh key's last use was written beside the request, once the writer was done.
        client.app.state.key_verifier.wait_for_writes()  # type: ignore[attr-defined]
    engine = create_db_engine(settings.database_url)
    with transaction(create_session_factory(engine), write=False) as session:
        used = session.scalars(sa.select(ApiKey.last_used_at).where(ApiKey.tenant == "default"))
        assert None not in list(used)
    engine.dispose()
    [(status, seconds)] = answers
    assert status == 200
    # The requirement: a GET beside an open writer answers within 100 ms (it waited
    # busy_timeout for the write lock before).
    assert seconds < 0.1, f"GET took {seconds:.3f}s behind an open writer"


def test_a_read_only_unit_reads_beside_a_writer(
    sqlite_file: str, job_id: str, open_writer: sqlite3.Connection
) -> None:
    engine = create_db_engine(f"sqlite:///{sqlite_file}")
    try:
        with transaction(create_session_factory(engine), write=False) as session:
            # The snapshot from before the writer's uncommitted update.
            assert session.scalar(sa.select(Job.progress_epoch)) == 0
    finally:
        engine.dispose()


def test_a_read_only_unit_refuses_to_write(sqlite_file: str, job_id: str) -> None:
    engine = create_db_engine(f"sqlite:///{sqlite_file}")
    try:
        with (
            pytest.raises(sa.exc.OperationalError, match="readonly"),
            transaction(create_session_factory(engine), write=False) as session,
        ):
            session.execute(sa.update(Job).values(progress_epoch=3))
        # The flag lives on the pooled connection: the next unit of work may write again.
        with transaction(create_session_factory(engine)) as session:
            session.execute(sa.update(Job).values(progress_epoch=3))
    finally:
        engine.dispose()


def test_a_read_then_write_unit_holds_the_write_lock_from_its_first_read(
    sqlite_file: str, job_id: str
) -> None:
    """Deferred, another writer committing between our read and our write would make the write
    fail at once with "database is locked" (a stale snapshot cannot be upgraded)."""
    engine = create_db_engine(f"sqlite:///{sqlite_file}")
    factory: sessionmaker[sa.orm.Session] = create_session_factory(engine)
    other = sqlite3.connect(sqlite_file, isolation_level=None, timeout=0.05)
    try:
        with transaction(factory) as session:
            epoch = session.scalar(sa.select(Job.progress_epoch))
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("UPDATE jobs SET progress_epoch = 99")  # must wait for us
            session.execute(sa.update(Job).values(progress_epoch=(epoch or 0) + 1))
        with transaction(factory, write=False) as session:
            assert session.scalar(sa.select(Job.progress_epoch)) == 1
    finally:
        other.close()
        engine.dispose()


def test_reads_outside_a_request_session_run_beside_a_writer(
    sqlite_file: str, tmp_path: Path
) -> None:
    """Not only a GET's own session: an event stream's reads (the hub's polls, the backlog, the
    job's lookup), a checkpoint download's chunks, a /metrics scrape, the outbox's sweep and a
    worker's read of its data each read while a worker holds the write lock. Begun as writers
    (BEGIN IMMEDIATE), each waited for the lock up to the 30 s busy timeout, and the hub's poll
    held up the worker's writes every time it ran."""
    settings = Settings(
        database_url=f"sqlite:///{sqlite_file}",
        broker_url=f"sqla+sqlite:///{tmp_path / 'broker.db'}",
    )
    engine = create_db_engine(settings.database_url)
    factory = create_session_factory(engine)
    with transaction(factory) as session:
        key = create_key(session, "default")[1]
        job = make_job(session, status="succeeded")
        checkpoint = make_checkpoint(job.id, b"w" * 5000)
        session.add(checkpoint)
        session.flush()
        paths = [
            f"/v1/jobs/{job.id}/events",
            f"/v1/jobs/{job.id}/checkpoints/{checkpoint.id}",
            "/metrics",
        ]
    dispatcher = Dispatcher(create_celery_app(settings), factory)
    context = WorkerContext(settings, factory, dispatcher, "node@host#1")
    with documented_client(create_app(settings)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        for path in paths:  # warm: connections, imports, the hub's first poll
            assert client.get(path).status_code == 200, path
        # A worker reads an upload's arrays from the database (a built-in dataset, from disk).
        arrays = io.BytesIO()
        np.savez(arrays, x=np.random.default_rng(0).normal(size=(40, 3)), y=np.arange(40) % 2)
        uploaded = client.post("/v1/datasets", files={"file": ("d.npz", arrays.getvalue())})
        assert uploaded.status_code == 201, uploaded.text
        dataset = {"name": uploaded.json()["name"], "val_fraction": 0.2, "batch_size": 8}
        spec = JobSpec.model_validate(spec_payload(dataset=dataset))
        writer = sqlite3.connect(sqlite_file, isolation_level=None, check_same_thread=False)
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("UPDATE jobs SET progress_epoch = 7")
        done: dict[str, object] = {}

        def run(name: str, read: Callable[[], object]) -> threading.Thread:
            def target() -> None:
                done[name] = read()

            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            return thread

        threads = [run(path, partial(client.get, path)) for path in paths]
        threads.append(run("outbox", partial(dispatcher.publish_pending, 3600.0)))
        threads.append(run("worker data", partial(execution.load_data, context, spec)))
        for thread in threads:
            thread.join(timeout=5)  # before, each waited here for the writer's lock
        late = sorted({*paths, "outbox", "worker data"} - set(done))
        writer.rollback()
        writer.close()
        for thread in threads:
            thread.join()
        assert late == [], f"waited for the writer: {late}"
    engine.dispose()
    for path in paths:
        assert done[path].status_code == 200, path  # type: ignore[attr-defined]
    assert done["outbox"] == []
    assert len(done["worker data"].x_train) == 32  # type: ignore[attr-defined]
