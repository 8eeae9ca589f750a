"""The polled reads' Reader (app.core.db.Reader): no transaction of their own, no ping before
each read, and one retry of a read that met a connection the server had dropped.

A reader runs on the event loop it was made on: each test makes and uses it in one
asyncio.run."""

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy import Connection, Engine

from app.api.main import create_app
from app.core.config import Settings
from app.core.db import (
    READER_BUSY_TIMEOUT_MS,
    create_db_engine,
    create_reader,
    create_session_factory,
    transaction,
)
from app.core.migrate import upgrade
from tests.factories import make_job
from tests.support.documented import documented_client


@pytest.fixture
def pg_engine(fresh_postgres_url: str) -> Iterator[Engine]:
    engine = create_db_engine(fresh_postgres_url)
    yield engine
    engine.dispose()


def _drop_connections(admin: Engine, url: str) -> int:
    """What a server restart does to the pool: every session of the database is ended."""
    name = sa.make_url(url).database
    with admin.connect() as connection:
        ended = connection.execute(
            sa.text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        ).scalar_one()
    return int(ended)


def test_a_read_runs_again_on_a_fresh_connection_after_the_server_dropped_the_pool(
    pg_engine: Engine, postgres_admin: Engine, fresh_postgres_url: str
) -> None:
    calls = []

    def read(connection: Connection) -> int:
        calls.append(connection)
        return int(connection.execute(sa.text("SELECT 41 + 1")).scalar_one())

    async def scenario() -> None:
        reader = create_reader(pg_engine)
        try:
            assert await reader.run(read) == 42  # a connection now waits in the pool
            assert _drop_connections(postgres_admin, fresh_postgres_url) >= 1
            calls.clear()
            assert await reader.run(read) == 42
            assert len(calls) == 2  # the first met the dropped connection, the second a new one
            calls.clear()
            assert await reader.run(read) == 42
            assert len(calls) == 1  # and the pool holds only good connections again
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_a_read_that_fails_for_another_reason_is_not_run_again(pg_engine: Engine) -> None:
    calls = []

    def read(connection: Connection) -> None:
        calls.append(connection)
        connection.execute(sa.text("SELECT * FROM no_such_table"))

    async def scenario() -> None:
        reader = create_reader(pg_engine)
        try:
            with pytest.raises(sa.exc.ProgrammingError):
                await reader.run(read)
            assert len(calls) == 1
        finally:
            await reader.close()

    asyncio.run(scenario())


def test_a_job_get_answers_200_right_after_a_database_restart(
    pg_engine: Engine, postgres_admin: Engine, fresh_postgres_url: str, redis_url: str
) -> None:
    with transaction(create_session_factory(pg_engine)) as session:
        job_id = str(make_job(session).id)
    settings = Settings(database_url=fresh_postgres_url, broker_url=redis_url, auth="off")
    with documented_client(create_app(settings)) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert _drop_connections(postgres_admin, fresh_postgres_url) >= 1
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == job_id


def test_sqlite_reads_run_outside_any_transaction(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)

    def read(connection: Connection) -> bool:
        connection.execute(sa.text("SELECT count(*) FROM jobs"))
        dbapi_connection = connection.connection.dbapi_connection
        assert dbapi_connection is not None
        return bool(dbapi_connection.in_transaction)

    async def scenario() -> bool:
        reader = create_reader(engine)
        try:
            return await reader.run(read)
        finally:
            await reader.close()

    # A lone SELECT and no BEGIN: the driver's connection never enters a transaction (one
    # begun by a read-only session would be, until its end).
    assert asyncio.run(scenario()) is False
    engine.dispose()


def test_a_stored_nan_reads_as_null_not_as_an_error(tmp_path: Path, redis_url: str) -> None:
    """SQLite keeps the NaN that json.dumps writes (PostgreSQL refuses it); orjson, which
    decodes the JSON columns, does not read it, and the decoder falls back to json."""
    url = f"sqlite:///{tmp_path / 'nan.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    with transaction(create_session_factory(engine)) as session:
        job = make_job(session, status="failed")
        job_id = str(job.id)
    with engine.begin() as connection:
        connection.execute(
            sa.text("UPDATE jobs SET summary = :summary"),
            {"summary": '{"final_val_loss": NaN, "best_epoch": 3}'},
        )
    engine.dispose()
    settings = Settings(database_url=url, broker_url=redis_url, auth="off")
    with documented_client(create_app(settings)) as client:
        response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["summary"] == {"final_val_loss": None, "best_epoch": 3}


def test_a_sqlite_read_only_reads_and_gives_up_on_a_held_lock_at_once(tmp_path: Path) -> None:
    """SQLite's reads run on the event loop: they may not write, and a lock they cannot take
    (here another process's exclusive hold; in life a WAL recovery) fails them within
    READER_BUSY_TIMEOUT_MS instead of blocking the loop for the writers' 30 s."""
    path = tmp_path / "locked.db"
    upgrade(f"sqlite:///{path}")
    engine = create_db_engine(f"sqlite:///{path}")

    async def run(read: Callable[[Connection], object]) -> object:
        reader = create_reader(engine)
        try:
            return await reader.run(read)
        finally:
            await reader.close()

    with pytest.raises(sa.exc.OperationalError, match="readonly"):
        asyncio.run(run(lambda connection: connection.execute(sa.text("DELETE FROM jobs"))))

    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("DELETE FROM jobs")  # takes and, in this mode, keeps the exclusive lock
    try:
        started = time.monotonic()
        with pytest.raises(sa.exc.OperationalError, match="locked"):
            asyncio.run(run(lambda connection: connection.execute(sa.text("SELECT 1 FROM jobs"))))
        assert time.monotonic() - started < 5 * READER_BUSY_TIMEOUT_MS / 1000 + 1
    finally:
        holder.rollback()
        holder.close()
        engine.dispose()
