"""Engine and session factory, built at start-up from the settings (never at import)."""

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import Session, sessionmaker

# Execution options of a session that only reads: `factory(execution_options=READ_ONLY)`, or
# `transaction(factory, write=False)`. On SQLite its transactions begin DEFERRED and take no
# lock; elsewhere the option means nothing (PostgreSQL's MVCC never makes a reader wait).
READ_ONLY: Final[Mapping[str, Any]] = {"trainsvc_read_only": True}
_POSTGRES_POOL: Final[Mapping[str, Any]] = {
    "pool_size": 5,
    "max_overflow": 10,
    "connect_args": {"connect_timeout": 5},
}

_T = TypeVar("_T")


def create_db_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url,
            # API threads and worker threads share the engine; SQLite itself serializes writers.
            connect_args={"check_same_thread": False, "timeout": WRITER_BUSY_TIMEOUT_MS / 1000},
            **_JSON_CODEC,
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
        return engine
    return create_engine(
        database_url,
        pool_pre_ping=True,  # a connection the server dropped (restart) is replaced, not used
        **_JSON_CODEC,
        **_POSTGRES_POOL,
    )


def _json_loads(text: str | bytes) -> Any:
    """JSON columns as Python values, with orjson: the standard library's decoder was the
    largest Python cost of a job read (a spec, a summary and a grid point per job)."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        # NaN and Infinity: json.dumps writes them and SQLite keeps them (PostgreSQL refuses
        # them); the service stores non-finite numbers as null, but older rows may hold them.
        return json.loads(text)


def json_dumps(value: Any) -> str:
    """JSON columns as text, non-ASCII characters as themselves: SQLite's json_extract matches
    a path's key against the stored text, so a tag key stored as "\\u00fc" was never found by
    a filter for "ü" (PostgreSQL decodes either form)."""
    return json.dumps(value, ensure_ascii=False)


_JSON_CODEC: Final[Mapping[str, Any]] = {
    "json_serializer": json_dumps,
    "json_deserializer": _json_loads,
}

WRITER_BUSY_TIMEOUT_MS = 30_000  # a second writer waits for the first instead of failing
READER_BUSY_TIMEOUT_MS = 100  # an InlineReader's read, on the event loop, gives up this soon


def _configure_sqlite(
    dbapi_connection: Any,
    _record: Any,
    busy_timeout_ms: int = WRITER_BUSY_TIMEOUT_MS,
    read_only: bool = False,
) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN (see _begin_sqlite) instead of the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # First: setting the journal mode may itself wait for a lock.
    cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    # WAL: a reader reads a snapshot beside the one writer instead of waiting for it, as long
    # as the reader's own transaction takes no write lock (see _begin_sqlite).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    if read_only:
        cursor.execute("PRAGMA query_only=1")
    cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    """Readers take no lock; a unit of work that may write takes the write lock up front.

    A deferred transaction that reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT, no
    busy_timeout wait) if another writer committed after its read, so writers begin IMMEDIATE:
    they queue for the write lock and never fail halfway. Readers begin DEFERRED and, in WAL
    mode, never wait for a writer; query_only makes a write in a read-only session an error
    at once instead of an occasional "database is locked".
    """
    if connection.get_execution_options().get("trainsvc_read_only"):
        connection.exec_driver_sql("PRAGMA query_only=1")
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("PRAGMA query_only=0")
        connection.exec_driver_sql("BEGIN IMMEDIATE")


class Reader(Protocol):
    """How the polled status reads (job, list, metrics) reach the database: `await
    reader.run(read)` calls `read(connection)`, a plain function over a plain Connection, on a
    connection that runs each statement on its own, with no transaction around them.

    Dashboards and services poll these reads, so their round trips are the cost that matters:
    on PostgreSQL a transaction adds BEGIN and ROLLBACK, and the pool's pre-ping (see
    create_db_engine) one more, to a one-query read; on SQLite BEGIN and the query_only pragma
    were a fifth of a job GET. A transaction would add nothing a read needs: at PostgreSQL's
    READ COMMITTED each statement sees its own snapshot anyway.
    """

    async def run(self, read: Callable[[Connection], _T]) -> _T: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class InlineReader:
    """Runs each read right on the event loop (SQLite's reads).

    An embedded SQLite read is a few page reads from the OS cache, and in WAL mode it never
    waits for a writer: a hop to a worker thread and back cost twice the read itself
    (measured: a job GET went from about half of /v1/health to above it without it). Its
    connections only read (query_only) and wait at most READER_BUSY_TIMEOUT_MS for a lock (a
    WAL recovery, at start-up), then fail as the database being away (503), so a read never
    stalls the loop for long.
    """

    connect: Callable[[], AbstractContextManager[Connection]]
    owned_engine: Engine | None = None  # a pool of the reader's own, disposed by close()

    async def run(self, read: Callable[[Connection], _T]) -> _T:
        with self.connect() as connection:
            return read(connection)

    async def close(self) -> None:
        if self.owned_engine is not None:
            self.owned_engine.dispose()


@dataclass(frozen=True)
class AsyncReader:
    """Runs each read on the event loop, its I/O awaited (PostgreSQL's reads).

    The read is plain synchronous code: SQLAlchemy's AsyncConnection.run_sync runs it in a
    greenlet whose queries go out through psycopg's async connection. A hop to a worker
    thread and back cost as much as the query itself (measured: 8 concurrent job reads 330 us
    each this way against 500 us on threads).

    Instead of pinging before each read, a read that meets a connection the server dropped
    (a restart) runs once more: SQLAlchemy has then discarded every older pooled connection,
    and a read is idempotent. This is SQLAlchemy's "optimistic" disconnect handling.
    """

    engine: AsyncEngine

    async def run(self, read: Callable[[Connection], _T]) -> _T:
        try:
            async with self.engine.connect() as connection:
                return await connection.run_sync(read)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        async with self.engine.connect() as connection:
            return await connection.run_sync(read)

    async def close(self) -> None:
        await self.engine.dispose()


def create_reader(engine: Engine) -> Reader:
    """The Reader for the database behind `engine` (made by create_db_engine); close() it
    when done. Create it on the event loop that will run the reads.

    SQLite: a pool of its own whose connections only read (query_only), run each statement on
    its own (no BEGIN: a lone SELECT is its own snapshot) and wait briefly for locks.
    PostgreSQL: an async pool of its own, in autocommit and without the pre-ping.
    """
    if engine.dialect.name == "sqlite":
        sqlite_engine = create_engine(
            engine.url,
            connect_args={"check_same_thread": False, "timeout": READER_BUSY_TIMEOUT_MS / 1000},
            **_JSON_CODEC,
        )
        configure = partial(
            _configure_sqlite, busy_timeout_ms=READER_BUSY_TIMEOUT_MS, read_only=True
        )
        event.listen(sqlite_engine, "connect", configure)
        return InlineReader(sqlite_engine.connect, owned_engine=sqlite_engine)
    postgres_engine = create_async_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        **_JSON_CODEC,
        # Ten kept open: the shared pool's five closed their overflow on return and made
        # most reads under load reconnect. Up to 40 in all, the rest closed on return
        # (docs/operations.md counts an API process's connections).
        pool_size=10,
        max_overflow=30,
        connect_args=_POSTGRES_POOL["connect_args"],
    )
    return AsyncReader(postgres_engine)


def create_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session], *, write: bool = True) -> Iterator[Session]:
    """One unit of work outside a request: commit on success, roll back on error.

    write=False for a unit that only reads: on SQLite it then never waits for a writer.
    """
    options = {} if write else READ_ONLY
    with factory(execution_options=options) as session, session.begin():
        yield session
