"""Alembic migrations: they build exactly the tables the models describe, and they reverse."""

import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.orm import Session

from app.api.jobs.service import list_jobs
from app.core.db import create_db_engine
from app.core.migrate import downgrade, upgrade
from app.core.models import Base
from app.core.tenancy import UNAUTHENTICATED
from tests.factories import make_job


def _schema_differences(url: str) -> list[object]:
    engine = create_db_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_migrations_match_models_and_reverse(fresh_postgres_url: str, tmp_path: Path) -> None:
    sqlite_url = f"sqlite:///{tmp_path}/migrations.db"
    for url in (fresh_postgres_url, sqlite_url):
        upgrade(url)
        assert _schema_differences(url) == []
        downgrade(url, "base")
        engine = create_db_engine(url)
        with engine.connect() as connection:
            assert set(sa.inspect(connection).get_table_names()) <= {"alembic_version"}
        engine.dispose()
        upgrade(url)
        assert _schema_differences(url) == []


def test_trainsvc_migrate_builds_the_schema(tmp_path: Path, repo_root: Path) -> None:
    url = f"sqlite:///{tmp_path}/cli.db"
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "migrate"],
        env={**os.environ, "TRAINSVC_DATABASE_URL": url},
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "latest schema" in result.stdout
    assert _schema_differences(url) == []


def test_specs_stored_with_escapes_are_found_by_tag_on_sqlite(tmp_path: Path) -> None:
    """Rows written before 0010 hold "\\u00fc" for "ü"; 0010 rewrites them so the tag filter,
    which SQLite matches against the stored text, finds them."""
    url = f"sqlite:///{tmp_path}/escaped.db"
    upgrade(url, "0009")
    engine = sa.create_engine(url)  # the default serializer: json.dumps, ASCII escapes
    with Session(engine) as session:
        job = make_job(session, tags={"ü": "日本"})
        session.commit()
        job_id = job.id
    with engine.connect() as connection:
        stored = connection.execute(sa.text("SELECT spec FROM jobs")).scalar_one()
    assert '"\\u00fc": "\\u65e5\\u672c"' in stored
    engine.dispose()

    upgrade(url)
    engine = create_db_engine(url)
    with engine.connect() as connection:
        found = list_jobs(connection, UNAUTHENTICATED, None, 10, None, tags=[("ü", "日本")])[0]
    engine.dispose()
    assert [row["id"] for row in found] == [job_id]


def test_trainsvc_migrate_run_several_at_once_migrates_once(fresh_postgres_url: str) -> None:
    """Before: each found the schema behind and created it; all but one ended in PostgreSQL's
    UniqueViolation (a traceback), as a deploy that migrates from every replica would."""
    downgrade(fresh_postgres_url, "base")  # the fixture's database comes migrated
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "app.cli", "migrate"],
            env={**os.environ, "TRAINSVC_DATABASE_URL": fresh_postgres_url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    for run in runs:
        stdout, stderr = run.communicate(timeout=120)
        assert run.returncode == 0, stderr
        assert "latest schema" in stdout
    assert _schema_differences(fresh_postgres_url) == []
