"""Engine and session factory, built at start-up from the settings (never at import)."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

# Execution options of a session that only reads: `factory(execution_options=READ_ONLY)`, or
# `transaction(factory, write=False)`. On SQLite its transactions begin DEFERRED and take no
# lock; elsewhere the option means nothing (PostgreSQL's MVCC never makes a reader wait).
READ_ONLY: Final[Mapping[str, Any]] = {"trainsvc_read_only": True}


def create_db_engine(database_url: str) -> Engine:
    if database_url.startswith("sqlite"):
        engine = create_engine(
            database_url,
            # API threads and worker threads share the engine; SQLite itself serializes writers.
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
        return engine
    return create_engine(
        database_url,
        pool_pre_ping=True,  # a connection the server dropped (restart) is replaced, not used
        pool_size=5,
        max_overflow=10,
        connect_args={"connect_timeout": 5},
    )


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
    if connection.get_execution_options().get("trainsvc_read_only"):
        connection.exec_driver_sql("PRAGMA query_only=1")
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("PRAGMA query_only=0")
        connection.exec_driver_sql("BEGIN IMMEDIATE")


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
