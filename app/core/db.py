"""Engine and session factory, built at start-up from the settings (never at import)."""

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import orjson
from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

# Execution options of a session that only reads: `factory(execution_options=READ_ONLY)`, or
# `transaction(factory, write=False)`. On SQLite its transactions begin DEFERRED and take no
# lock; elsewhere the option means nothing (PostgreSQL's MVCC never makes a reader wait).
READ_ONLY: Final[Mapping[str, Any]] = {"trainsvc_read_only": True}
# A SQLite connection whose statements each run on their own: no BEGIN (see Reader).
_AUTOCOMMIT_READ: Final[Mapping[str, Any]] = {"trainsvc_autocommit_read": True}
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
            connect_args={"check_same_thread": False, "timeout": 30},
            json_deserializer=_json_loads,
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
        return engine
    return create_engine(
        database_url,
        pool_pre_ping=True,  # a connection the server dropped (restart) is replaced, not used
        json_deserializer=_json_loads,
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


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN (see _begin_sqlite) instead of the driver.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL: a reader reads a snapshot beside the one writer instead of waiting for it, as long
    # as the reader's own transaction takes no write lock (see _begin_sqlite). busy_timeout:
    # a second writer waits for the first instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    """Readers take no lock; a unit of work that may write takes the write lock up front.

    A deferred transaction that reads and then writes fails at once (SQLITE_BUSY_SNAPSHOT, no
    busy_timeout wait) if another writer committed after its read, so writers begin IMMEDIATE:
    they queue for the write lock and never fail halfway. Readers begin DEFERRED and, in WAL
    mode, never wait for a writer; query_only makes a write in a read-only session an error
    at once instead of an occasional "database is locked".
    """
    options = connection.get_execution_options()
    if options.get("trainsvc_autocommit_read"):
        return  # the driver runs each statement on its own (isolation_level None)
    if options.get("trainsvc_read_only"):
        connection.exec_driver_sql("PRAGMA query_only=1")
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("PRAGMA query_only=0")
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@dataclass(frozen=True)
class Reader:
    """How the polled status reads (job, list, metrics) reach the database: `reader.run(read)`
    calls `read(connection)` on a connection that runs each statement on its own, with no
    transaction around them.

    Dashboards and services poll these reads, so their round trips are the cost that matters:
    on PostgreSQL a transaction adds BEGIN and ROLLBACK, and the pool's pre-ping (see
    create_db_engine) one more, to a one-query read; on SQLite BEGIN and the query_only pragma
    were a fifth of a job GET. A transaction would add nothing a read needs: at PostgreSQL's
    READ COMMITTED each statement sees its own snapshot anyway.

    Instead of pinging before each read, a read that meets a connection the server dropped
    (a restart) runs once more: SQLAlchemy has then discarded every older pooled connection,
    and a read is idempotent. This is SQLAlchemy's "optimistic" disconnect handling.
    """

    connect: Callable[[], AbstractContextManager[Connection]]
    owned_engine: Engine | None = None  # a pool of the reader's own, disposed by close()

    def run(self, read: Callable[[Connection], _T]) -> _T:
        try:
            with self.connect() as connection:
                return read(connection)
        except DBAPIError as exc:
            if not exc.connection_invalidated:
                raise
        with self.connect() as connection:
            return read(connection)

    def close(self) -> None:
        if self.owned_engine is not None:
            self.owned_engine.dispose()


def create_reader(engine: Engine) -> Reader:
    """The Reader for the database behind `engine` (made by create_db_engine); close() it
    when done.

    SQLite: `engine`'s own pool (file connections cost nothing to keep), with BEGIN skipped
    (see _begin_sqlite): a lone SELECT is its own snapshot and, in WAL mode, never waits for
    a writer. PostgreSQL: a pool of its own, in autocommit and without the pre-ping.
    """
    if engine.dialect.name == "sqlite":
        return Reader(engine.execution_options(**_AUTOCOMMIT_READ).connect)
    read_engine = create_engine(
        engine.url,
        isolation_level="AUTOCOMMIT",
        json_deserializer=_json_loads,
        # Ten kept open: the shared pool's five closed their overflow on return and made
        # most reads under load reconnect. Up to the API's worker threads (40) in all, the
        # rest closed on return (docs/operations.md counts an API process's connections).
        pool_size=10,
        max_overflow=30,
        connect_args=_POSTGRES_POOL["connect_args"],
    )
    return Reader(read_engine.connect, owned_engine=read_engine)


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
