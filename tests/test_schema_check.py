"""`trainsvc serve` and `trainsvc worker` refuse a database whose schema is behind this
release's migrations, naming `trainsvc migrate`: started anyway, the API answered every
request with a 500 while /v1/ready said "ready", and the worker logged a failed sweep every
few seconds."""

import ctypes
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from app.core.migrate import downgrade, schema_refusal, unwritable_refusal, upgrade
from tests.support.processes import free_port

LATEST = "0010"


def _trainsvc(
    cwd: Path,
    args: list[str],
    env: dict[str, str],
    timeout: float,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`trainsvc ARGS` in `cwd` with `env` over this environment, run to its end, its output
    captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=preexec_fn,
    )


def stamp(url: str, revision: str) -> None:
    """Record `revision` as the schema's, as a release newer than this one would."""
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    engine.dispose()


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "trainsvc.db"
    refusal = schema_refusal(f"sqlite:///{path}")
    assert refusal == f"there is no database at {path}: run `trainsvc migrate` first"
    assert not path.exists()


def test_a_database_never_migrated_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trainsvc.db"
    sqlite3.connect(path).close()
    refusal = schema_refusal(f"sqlite:///{path}")
    assert refusal is not None
    assert f"the schema is at none; the latest is {LATEST}: run `trainsvc migrate`" in refusal


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_a_schema_one_migration_behind_is_refused_and_the_latest_starts(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'trainsvc.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("fresh_postgres_url")
    )
    upgrade(url)
    downgrade(url, "0009")
    refusal = schema_refusal(url)
    assert refusal is not None
    assert f"the schema is at 0009; the latest is {LATEST}" in refusal
    assert refusal.startswith(sa.make_url(url).render_as_string(hide_password=True))
    assert refusal.endswith("run `trainsvc migrate` first")
    upgrade(url)
    assert schema_refusal(url) is None


def test_a_schema_newer_than_this_release_starts_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A rolling upgrade migrates first, while this release's processes still run and restart:
    a revision it does not know is a newer schema, not a missing one."""
    url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(url)
    stamp(url, "0011")
    with caplog.at_level("WARNING", logger="app.core.migrate"):
        assert schema_refusal(url) is None
    assert "the schema is at 0011; the latest is 0010, newer than this release knows" in (
        caplog.text
    )


def test_a_database_that_does_not_answer_is_no_reason_to_refuse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It may be starting too: /v1/ready says it is down, and the service goes on once it is up.
    The warning says why (it said "OperationalError", for a refused connection and for a
    database that does not exist alike)."""
    with caplog.at_level("WARNING", logger="app.core.migrate"):
        assert schema_refusal(f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/x") is None
    [record] = caplog.records
    assert "Connection refused); starting" in record.getMessage()


@pytest.mark.e2e
@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", [["serve", "--port", "{port}"], ["worker"]])
def test_serve_and_worker_exit_on_an_unmigrated_database(
    command: list[str], tmp_path: Path, redis_url: str
) -> None:
    path = tmp_path / "trainsvc.db"
    sqlite3.connect(path).close()
    port = free_port()
    env = {
        "TRAINSVC_DATABASE_URL": f"sqlite:///{path}",
        "TRAINSVC_BROKER_URL": redis_url,
    }
    result = _trainsvc(tmp_path, [part.format(port=port) for part in command], env, timeout=100)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().endswith(
        f"the schema is at none; the latest is {LATEST}: run `trainsvc migrate` first"
    )


@pytest.mark.parametrize("command", ["migrate", "up"])
@pytest.mark.parametrize("where", ["missing folder", "server not answering"])
def test_a_database_that_cannot_be_reached_is_one_line_not_a_traceback(
    command: str, where: str, tmp_path: Path
) -> None:
    """Before: `migrate` and `up` ended in SQLAlchemy's OperationalError traceback."""
    url = (
        f"sqlite:///{tmp_path / 'missing' / 'trainsvc.db'}"
        if where == "missing folder"
        else f"postgresql+psycopg://trainsvc:secret@127.0.0.1:{free_port()}/trainsvc"
    )
    args = [command] if command == "migrate" else [command, "--port", str(free_port())]
    result = _trainsvc(tmp_path, args, {"TRAINSVC_DATABASE_URL": url}, timeout=60)
    assert result.returncode == 1, result.stderr
    shown = sa.make_url(url).render_as_string(hide_password=True)
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"cannot migrate {shown}: "), line
    assert ("unable to open database file" if where == "missing folder" else "refused") in line
    assert "secret" not in result.stderr


def _without_root_file_access() -> None:
    """In the child, before exec: as root, drop what lets root write a file it may not (the
    bounding set becomes the capabilities after exec), so the file's mode decides."""
    if os.geteuid() == 0:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        for capability in (1, 2, 3):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER
            assert prctl(24, capability) == 0  # PR_CAPBSET_DROP


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["up", "worker"])
def test_a_read_only_sqlite_file_is_refused_before_anything_starts(
    command: str, tmp_path: Path
) -> None:
    """Before: SQLite opened the file read-only without a word, `up` started its API and
    worker, every submit was a 500 and the worker logged a failed sweep every few seconds."""
    path = tmp_path / "trainsvc.db"
    upgrade(f"sqlite:///{path}")
    path.chmod(0o444)
    args = [command] if command == "worker" else [command, "--port", str(free_port())]
    result = _trainsvc(
        tmp_path,
        args,
        {"TRAINSVC_DATABASE_URL": f"sqlite:///{path}"},
        timeout=100,
        preexec_fn=_without_root_file_access,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"cannot write {path}: attempt to write a readonly database; "
        "the file and its folder must be writable"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", ["up", "worker"])
def test_an_embedded_broker_file_that_cannot_be_opened_is_refused(
    command: str, tmp_path: Path
) -> None:
    """Before: the worker's consumer reconnected to it for ever, a warning and Celery's long
    notice each time, while `up` served an API whose jobs no worker would ever get."""
    upgrade(f"sqlite:///{tmp_path / 'trainsvc.db'}")
    broker = tmp_path / "missing" / "trainsvc-broker.db"
    args = [command] if command == "worker" else [command, "--port", str(free_port())]
    result = _trainsvc(
        tmp_path,
        args,
        {"TRAINSVC_BROKER_URL": f"sqla+sqlite:///{broker}"},
        timeout=100,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"cannot write {broker}: unable to open database file; "
        "the file and its folder must be writable"
    )


def test_a_sqlite_file_another_process_is_writing_is_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "trainsvc.db"
    upgrade(f"sqlite:///{path}")
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # as a worker storing an epoch holds it
    try:
        assert unwritable_refusal(f"sqlite:///{path}") is None
    finally:
        writer.execute("ROLLBACK")
        writer.close()


@pytest.mark.parametrize("where", ["not migrated", "server not answering"])
def test_the_keys_commands_say_why_the_database_cannot_be_used(where: str, tmp_path: Path) -> None:
    """Before: SQLAlchemy's traceback, from a `keys create` run before `migrate` (or while the
    database was away)."""
    url = f"postgresql+psycopg://trainsvc:secret@127.0.0.1:{free_port()}/trainsvc"
    if where == "not migrated":
        url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
        sqlite3.connect(tmp_path / "trainsvc.db").close()
    for args in (["create", "--tenant", "acme"], ["list"]):
        result = _trainsvc(tmp_path, ["keys", *args], {"TRAINSVC_DATABASE_URL": url}, timeout=60)
        assert result.returncode == 1, result.stderr
        [line] = result.stderr.strip().splitlines()
        shown = sa.make_url(url).render_as_string(hide_password=True)
        if where == "not migrated":
            assert line == f"{shown}: the schema is at none; the latest is {LATEST}: " + (
                "run `trainsvc migrate` first"
            )
        else:
            assert line.startswith(f"cannot reach {shown}: "), line
            assert "refused" in line
