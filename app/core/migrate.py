"""Schema migrations, run through Alembic from code (`trainsvc migrate`, `trainsvc up`), and
the check that `serve` and `worker` make before they start: a schema behind this code's
migrations is a clear refusal, not a 500 on every request."""

import logging
import sqlite3
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from app.core.db import create_db_engine

logger = logging.getLogger(__name__)

VERSION_TABLE = "alembic_version"  # Alembic's default, which migrations/env.py keeps


def alembic_config(database_url: str) -> Config:
    config = Config()
    # The package `migrations` (the repository's migrations/ folder), wherever it is installed:
    # a checkout, an editable install or a wheel. Installed as files, so this is a real path.
    config.set_main_option("script_location", str(files("migrations")))
    config.attributes["database_url"] = database_url
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(database_url), revision)


def downgrade(database_url: str, revision: str) -> None:
    command.downgrade(alembic_config(database_url), revision)


@dataclass(frozen=True)
class SchemaState:
    current: frozenset[str]  # the database's revisions (none before the first migration)
    heads: frozenset[str]  # this code's latest
    known: frozenset[str]  # every revision this code has

    @property
    def latest(self) -> bool:
        return self.current == self.heads

    @property
    def behind(self) -> bool:
        """Migrations of this code are missing. A revision this code does not know is a newer
        schema (migrated for a newer release during a rolling upgrade): not behind."""
        return not self.latest and self.current <= self.known

    def describe(self) -> str:
        have = ", ".join(sorted(self.current)) or "none"
        return f"the schema is at {have}; the latest is {', '.join(sorted(self.heads))}"


def schema_state(connection: sa.Connection, database_url: str) -> SchemaState:
    script = ScriptDirectory.from_config(alembic_config(database_url))
    # Read as Alembic's MigrationContext reads it, without the lines that context logs at INFO
    # on every start of serve and worker ("Context impl ...", "Will assume ... DDL").
    if sa.inspect(connection).has_table(VERSION_TABLE):
        current = frozenset(connection.scalars(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")))
    else:
        current = frozenset()
    return SchemaState(
        current=current,
        heads=frozenset(script.get_heads()),
        known=frozenset(revision.revision for revision in script.walk_revisions()),
    )


def _sqlite_file(url: str) -> Path | None:
    """The file a SQLite URL names, the database's or the embedded broker's (`sqla+`); None for
    another database, or SQLite in memory."""
    parsed = sa.make_url(url.removeprefix("sqla+"))
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(str(parsed.database))


def missing_sqlite_file(database_url: str) -> Path | None:
    """The embedded database's file when it does not exist (connecting would create it empty)."""
    path = _sqlite_file(database_url)
    return path if path is not None and not path.exists() else None


def schema_refusal(database_url: str) -> str | None:
    """Why a process must not start on this database, or None. Behind the code's migrations,
    every query of a changed table fails: refused, naming the fix. A database that does not
    answer is no reason to refuse: the process starts, reports it (/v1/ready, the sweeper's
    retries) and goes on when the database is back."""
    shown = sa.make_url(database_url).render_as_string(hide_password=True)
    if (path := missing_sqlite_file(database_url)) is not None:
        return f"there is no database at {path}: run `trainsvc migrate` first"
    engine = create_db_engine(database_url)
    try:
        with engine.connect() as connection:
            state = schema_state(connection, database_url)
    except sa.exc.SQLAlchemyError as exc:
        # Why, not only the exception's name: a database that does not exist, or a password
        # the server refused, starts the service too, and this line is where it says so.
        reason = str(exc.orig) if isinstance(exc, sa.exc.DBAPIError) else str(exc)
        first_line = reason.strip().splitlines()[0] if reason.strip() else type(exc).__name__
        logger.warning("could not check the schema of %s (%s); starting", shown, first_line)
        return None
    finally:
        engine.dispose()
    if state.behind:
        return f"{shown}: {state.describe()}: run `trainsvc migrate` first"
    if not state.latest:
        logger.warning("%s: %s, newer than this release knows; starting", shown, state.describe())
    return None


def unwritable_refusal(url: str) -> str | None:
    """Why the SQLite file named by `url`, the database's or the embedded broker's (`sqla+`),
    cannot be written, or None (and None for any other URL). SQLite opens a file it may not
    write read-only without a word, and one it cannot open is found only by the first query:
    `up` started on a read-only database served 500s and its worker logged a failed sweep
    every few seconds; on a broker file in a folder that does not exist it retried for ever.
    A write to the file's header, rolled back, finds out."""
    path = _sqlite_file(url)
    if path is None:
        return None
    try:
        connection = sqlite3.connect(path, timeout=1, isolation_level=None)
        try:
            connection.execute("BEGIN IMMEDIATE")
            (version,) = connection.execute("PRAGMA user_version").fetchone()
            connection.execute(f"PRAGMA user_version = {int(version)}")
            connection.execute("ROLLBACK")
        finally:
            connection.close()
    except sqlite3.Error as exc:
        if exc.sqlite_errorname == "SQLITE_BUSY":
            return None  # another process is writing it (a second `up`): no reason to refuse
        return f"cannot write {path}: {exc}; the file and its folder must be writable"
    return None
