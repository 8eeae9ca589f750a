"""Alembic environment: migrates the database named by TRAINSVC_DATABASE_URL (or the caller's)."""

from alembic import context
from sqlalchemy import Connection, text

from app.core.config import get_settings
from app.core.db import create_db_engine
from app.core.models import Base

target_metadata = Base.metadata

# The advisory lock that `trainsvc migrate` holds on PostgreSQL while it migrates: any number,
# the same in every release.
MIGRATION_LOCK = 0x7472_6169_6E73_7663  # "trainsvc"


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying
        compare_type=True,
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two `trainsvc migrate` at once (two deploys, one per replica) both found the
            # schema behind and both created it: the second ended in a UniqueViolation
            # traceback. The second now waits here, then reads the version the first wrote.
            # (SQLite's write lock already serializes migrations.)
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        context.run_migrations()


def main() -> None:
    url = context.config.attributes.get("database_url") or get_settings().database_url
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            run_migrations(connection)
            connection.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; run trainsvc migrate")
main()
