"""The polled reads' Reader (app.core.db.Reader): no transaction of their own, no ping before
each read, and one retry of a read that met a connection the server had dropped."""

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine

from app.api.main import create_app
from app.core.config import Settings
from app.core.db import create_db_engine, create_reader, create_session_factory, transaction
from app.core.migrate import upgrade
from tests.factories import make_job


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
    reader = create_reader(pg_engine)
    calls = []

    def read(connection: Connection) -> int:
        calls.append(connection)
        return int(connection.execute(sa.text("SELECT 41 + 1")).scalar_one())

    try:
        assert reader.run(read) == 42  # a connection now waits in the reader's pool
        assert _drop_connections(postgres_admin, fresh_postgres_url) >= 1
        calls.clear()
        assert reader.run(read) == 42
        assert len(calls) == 2  # the first met the dropped connection, the second a new one
        calls.clear()
        assert reader.run(read) == 42
        assert len(calls) == 1  # and the pool holds only good connections again
    finally:
        reader.close()


def test_a_read_that_fails_for_another_reason_is_not_run_again(pg_engine: Engine) -> None:
    reader = create_reader(pg_engine)
    calls = []

    def read(connection: Connection) -> None:
        calls.append(connection)
        connection.execute(sa.text("SELECT * FROM no_such_table"))

    try:
        with pytest.raises(sa.exc.ProgrammingError):
            reader.run(read)
        assert len(calls) == 1
    finally:
        reader.close()


def test_a_job_get_answers_200_right_after_a_database_restart(
    pg_engine: Engine, postgres_admin: Engine, fresh_postgres_url: str, redis_url: str
) -> None:
    with transaction(create_session_factory(pg_engine)) as session:
        job_id = str(make_job(session).id)
    settings = Settings(database_url=fresh_postgres_url, broker_url=redis_url, auth="off")
    with TestClient(create_app(settings)) as client:
        assert client.get(f"/v1/jobs/{job_id}").status_code == 200
        assert _drop_connections(postgres_admin, fresh_postgres_url) >= 1
        response = client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        assert response.json()["id"] == job_id


def test_sqlite_reads_run_outside_any_transaction(sqlite_url: str) -> None:
    engine = create_db_engine(sqlite_url)
    reader = create_reader(engine)
    try:

        def read(connection: Connection) -> bool:
            connection.execute(sa.text("SELECT count(*) FROM jobs"))
            dbapi_connection = connection.connection.dbapi_connection
            assert dbapi_connection is not None
            return bool(dbapi_connection.in_transaction)

        # A lone SELECT and no BEGIN: the driver's connection never enters a transaction (one
        # begun by a read-only session would be, until its end).
        assert reader.run(read) is False
    finally:
        reader.close()
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
    with TestClient(create_app(settings)) as client:
        response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    assert response.json()["summary"] == {"final_val_loss": None, "best_epoch": 3}
