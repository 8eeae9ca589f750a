"""Shared fixtures: real PostgreSQL and Redis on 127.0.0.1, and SQLite, each migrated by Alembic.

Unit and API tests run inside a transaction that is rolled back at the end. Tests that start
real processes get a fresh database of their own (they need committed rows).
With CI=true an unreachable PostgreSQL or Redis fails the run; elsewhere those tests skip.
"""

import os

# Tests run two at a time on two cores, beside worker processes of their own: more PyTorch
# threads than cores makes OpenMP spin against itself (an epoch went from 0.08 s to 6.7 s).
# Set before anything imports torch; subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import uuid
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from app.api.main import create_app
from app.core.config import Settings
from app.core.db import InlineReader, create_db_engine
from app.core.keys import create_key
from app.core.migrate import upgrade
from app.core.models import DEFAULT_TENANT
from tests.support.documented import documented_client
from tests.support.processes import Processes

POSTGRES_ADMIN_URL = os.environ.get(
    "TRAINSVC_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TRAINSVC_TEST_REDIS_URL", "redis://127.0.0.1:6379")
# Parallel runs on one machine (two checkouts) give each its own range of database numbers.
REDIS_DB_BASE = int(os.environ.get("TRAINSVC_TEST_REDIS_DB_BASE", "1"))
IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(what: str, error: Exception) -> None:
    message = f"{what} is not reachable: {error}"
    if IN_CI:
        pytest.fail(f"{message} (CI=true: real services are required)", pytrace=False)
    pytest.skip(message)


def _xdist_index(worker_id: str) -> int:
    return int(worker_id.removeprefix("gw")) if worker_id.startswith("gw") else 0


# -- PostgreSQL ------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_admin() -> Iterator[Engine]:
    engine = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        _unavailable("PostgreSQL", exc)
    yield engine
    engine.dispose()


def create_postgres_database(admin: Engine, tag: str) -> str:
    name = f"trainsvc_{tag}_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return url


def drop_postgres_database(admin: Engine, url: str) -> None:
    name = sa.make_url(url).database
    with admin.connect() as connection:
        connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_url(postgres_admin: Engine, worker_id: str) -> Iterator[str]:
    url = create_postgres_database(postgres_admin, worker_id)
    yield url
    drop_postgres_database(postgres_admin, url)


@pytest.fixture
def fresh_postgres_url(postgres_admin: Engine, worker_id: str) -> Iterator[str]:
    """A database of the test's own, for tests whose processes must see committed rows."""
    url = create_postgres_database(postgres_admin, worker_id)
    yield url
    drop_postgres_database(postgres_admin, url)


# -- SQLite ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'trainsvc.db'}"
    upgrade(url)
    return url


# -- Redis ---------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(worker_id: str) -> str:
    # Each xdist worker gets its own Redis database number, so queues never mix.
    url = f"{REDIS_URL}/{REDIS_DB_BASE + _xdist_index(worker_id)}"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).flushdb()
    except redis.RedisError as exc:
        _unavailable("Redis", exc)
    return url


@pytest.fixture
def fresh_redis_url(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


# -- a database per test, rolled back ----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


_engines: dict[str, Engine] = {}


@pytest.fixture
def engine(database_url: str) -> Engine:
    if database_url not in _engines:
        _engines[database_url] = create_db_engine(database_url)
    return _engines[database_url]


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@pytest.fixture
def session_factory(connection: Connection) -> sessionmaker[Session]:
    # Commits inside the code under test become savepoints of the test's outer transaction.
    return sessionmaker(
        bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False
    )


@pytest.fixture
def session(session_factory: sessionmaker[Session]) -> Iterator[Session]:
    with session_factory() as session:
        yield session


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(database_url=database_url, broker_url=redis_url)


@pytest.fixture
def key_headers(session_factory: sessionmaker[Session]) -> Callable[..., dict[str, str]]:
    """Makes an API key (rolled back with the test) and returns its Authorization header."""

    def make(tenant: str = DEFAULT_TENANT, admin: bool = False) -> dict[str, str]:
        with session_factory() as session:
            _, key = create_key(session, tenant, admin)
            session.commit()
        return {"Authorization": f"Bearer {key}"}

    return make


def use_test_sessions(app: FastAPI, session_factory: sessionmaker[Session]) -> None:
    """Point a started app at the test's rolled-back transaction."""
    app.state.session_factory = session_factory
    # (The reader the app made has not connected yet: it holds nothing to give back.)
    test_connection = session_factory.kw["bind"]
    app.state.reader = InlineReader(lambda: nullcontext(test_connection))
    app.state.dispatcher.session_factory = session_factory
    # The test's one connection cannot be shared with the key cache's writer thread.
    app.state.key_verifier.background_writes = False


@pytest.fixture
def client(
    settings: Settings,
    session_factory: sessionmaker[Session],
    key_headers: Callable[..., dict[str, str]],
) -> Iterator[TestClient]:
    """The API as a client of the default tenant, with a key of its own (not an admin). The
    test fails if any answer it got is one its operation's OpenAPI entry does not declare."""
    app = create_app(settings)
    with documented_client(app, raise_server_exceptions=False) as test_client:
        use_test_sessions(app, session_factory)
        if settings.auth == "on":
            test_client.headers.update(key_headers())
        yield test_client


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# -- real processes ------------------------------------------------------------------------------


@pytest.fixture
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Processes]:
    """trainsvc processes started by the test, killed at the end; logs printed if it failed."""
    started = Processes(tmp_path, {})
    yield started
    started.stop_all()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(started.logs())


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets the `processes` fixture see whether the test failed.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
