"""Lifecycle races with the commit order forced, on committed SQLite and PostgreSQL databases.

Each test makes the interleaving that used to go wrong happen on purpose: a hand-back
committed between a cancel's checks, a COMMIT whose acknowledgement is lost, a lease keeper
that fails. Two connections (or threads) see each other's commits, so these tests need a
database of their own rather than the rolled-back transaction of the unit tests.
"""

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.api.datasets.service import delete_upload
from app.core import lifecycle
from app.core.broker import create_celery_app
from app.core.catalog import UPLOAD_PREFIX
from app.core.config import Settings
from app.core.datasets import resolve_dataset
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.errors import DatasetInUse, InvalidInput
from app.core.migrate import upgrade
from app.core.models import DEFAULT_TENANT, Dataset, Job
from app.core.outbox import Dispatcher
from tests.factories import make_job
from worker.execution import WorkerContext, execute_job

WORKER_ID = "node@host#1"


@pytest.fixture(params=["sqlite", "postgres"])
def committed_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'races.db'}"
        upgrade(url)
        return url
    postgres: str = request.getfixturevalue("fresh_postgres_url")
    return postgres


@pytest.fixture
def engines(committed_url: str) -> Iterator[Callable[[], Engine]]:
    """Engines of their own (separate pools), each as another process would have."""
    made: list[Engine] = []

    def make() -> Engine:
        made.append(create_db_engine(committed_url))
        return made[-1]

    yield make
    for engine in made:
        engine.dispose()


@pytest.fixture
def factory(engines: Callable[[], Engine]) -> sessionmaker[Session]:
    return create_session_factory(engines())


def _job(factory: sessionmaker[Session], **spec: Any) -> uuid.UUID:
    with transaction(factory) as session:
        return make_job(session, **spec).id


def _stored(factory: sessionmaker[Session], job_id: uuid.UUID) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        _ = job.attempt_history  # loaded while the session is open
        return job


# -- a cancel against a hand-back ------------------------------------------------------------


def test_a_hand_back_committed_mid_cancel_cannot_lose_the_cancel(
    engines: Callable[[], Engine],
) -> None:
    """The old cancel ran `queued -> cancelled`, then `running -> cancel_requested`: a
    hand-back committing between the two made both miss, and the job trained on."""
    worker = create_session_factory(engines())
    api_engine = engines()
    api = create_session_factory(api_engine)
    job_id = _job(worker)
    with transaction(worker) as session:
        claim = lifecycle.claim(session, job_id, WORKER_ID, 30)
    assert claim is not None

    def hand_back() -> None:
        with transaction(worker) as session:
            lifecycle.hand_back(session, job_id, claim.attempt)

    handing_back = threading.Thread(target=hand_back)
    fired: list[str] = []

    @event.listens_for(api_engine, "after_cursor_execute")
    def between_statements(*args: Any) -> None:
        statement: str = args[2]
        if statement.lstrip().upper().startswith("UPDATE JOBS") and not fired:
            fired.append(statement)
            # The hand-back commits now, right after the cancel's first statement, unless the
            # cancel holds the row (PostgreSQL) or the database (SQLite): then it waits.
            handing_back.start()
            handing_back.join(timeout=1.0)

    with transaction(api) as session:
        answered = lifecycle.request_cancel(session, job_id)
    handing_back.join(timeout=60)
    assert not handing_back.is_alive()
    job = _stored(worker, job_id)
    assert (job.status, job.cancel_requested) == ("cancelled", True)
    # What the cancel answered was true when it committed: the flag on the running job, or
    # the job cancelled if the hand-back came first.
    assert answered in ("running", "cancelled")
    assert [attempt.outcome for attempt in job.attempt_history] == ["handed_back"]


# -- a COMMIT whose acknowledgement is lost ------------------------------------------------


def _settings(url: str, redis_url: str, **overrides: Any) -> Settings:
    fast = {"control_poll_seconds": 0.05, "heartbeat_seconds": 0.1, "db_retry_seconds": 10.0}
    return Settings(database_url=url, broker_url=redis_url, **{**fast, **overrides})


def _context(settings: Settings, factory: sessionmaker[Session]) -> WorkerContext:
    return WorkerContext(
        settings, factory, Dispatcher(create_celery_app(settings), factory), WORKER_ID
    )


def _after_first_commit_of(
    monkeypatch: pytest.MonkeyPatch, name: str, then: Callable[[Session], None]
) -> list[int]:
    """Run `then` right after the first transaction that called lifecycle.<name> commits."""
    real = getattr(lifecycle, name)
    calls: list[int] = []

    def wrapper(session: Session, *args: Any, **kwargs: Any) -> Any:
        result = real(session, *args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            event.listen(session, "after_commit", then, once=True)
        return result

    monkeypatch.setattr(lifecycle, name, wrapper)
    return calls


def _lose_acknowledgement(_: Session) -> None:
    # The COMMIT reached the database; the connection broke before the client heard so.
    raise OperationalError("COMMIT", None, ConnectionResetError("connection reset by peer"))


@pytest.mark.parametrize("step", ["claim", "finish"])
def test_a_retry_after_a_lost_acknowledgement_recognises_its_own_write(
    committed_url: str,
    fresh_redis_url: str,
    factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    job_id = _job(factory, epochs=2)
    calls = _after_first_commit_of(monkeypatch, step, _lose_acknowledgement)
    ctx = _context(_settings(committed_url, fresh_redis_url), factory)
    assert execute_job(ctx, job_id) == "succeeded"
    assert len(calls) == 2  # the write was retried, and the retry recognised it
    job = _stored(factory, job_id)
    assert (job.status, job.attempts, job.progress_epoch) == ("succeeded", 1, 2)
    assert [attempt.outcome for attempt in job.attempt_history] == ["succeeded"]


def test_a_retried_hand_back_after_a_lost_acknowledgement_succeeds(
    committed_url: str,
    fresh_redis_url: str,
    factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = _job(factory, epochs=200)
    ctx = _context(_settings(committed_url, fresh_redis_url), factory)

    def worker_shutting_down(_: Session) -> None:
        with transaction(factory) as session:
            assert lifecycle.request_handback(session, "node@host#") == 1

    _after_first_commit_of(monkeypatch, "claim", worker_shutting_down)
    calls = _after_first_commit_of(monkeypatch, "hand_back", _lose_acknowledgement)
    assert execute_job(ctx, job_id) == "handed_back"
    assert len(calls) == 2
    job = _stored(factory, job_id)
    assert (job.status, job.attempts, job.published_at is not None) == ("queued", 1, True)
    assert [attempt.outcome for attempt in job.attempt_history] == ["handed_back"]
    # ... and the next worker takes it up as the second attempt.
    monkeypatch.undo()
    with transaction(factory) as session:
        claim = lifecycle.claim(session, job_id, "other@host#1", 30)
    assert claim is not None
    assert claim.attempt == 2


# -- the lease keeper fails ----------------------------------------------------------------


@pytest.mark.parametrize("call", ["renew_lease", "read_controls"])
def test_a_failing_lease_keeper_stops_the_attempt(
    committed_url: str,
    fresh_redis_url: str,
    factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    call: str,
) -> None:
    """The thread used to die on anything but three exceptions, leaving training running
    without a lease (here it would have trained all 200 epochs and succeeded)."""
    job_id = _job(factory, epochs=200)

    def broken(*_: Any) -> None:
        raise RuntimeError("unexpected: the heartbeat broke")

    monkeypatch.setattr(lifecycle, call, broken)
    ctx = _context(_settings(committed_url, fresh_redis_url), factory)
    assert execute_job(ctx, job_id) == "heartbeat_failed"
    job = _stored(factory, job_id)
    assert (job.status, job.error_type) == ("failed", "heartbeat_failed")
    assert "RuntimeError: unexpected: the heartbeat broke" in (job.error_message or "")
    assert job.progress_epoch < 200
    assert job.lease_expires_at is None
    assert [attempt.outcome for attempt in job.attempt_history] == ["failed"]


def test_an_invalid_stored_spec_fails_the_job_at_once(
    committed_url: str, fresh_redis_url: str, factory: sessionmaker[Session]
) -> None:
    job_id = _job(factory)
    with transaction(factory) as session:
        job = session.get(Job, job_id)
        assert job is not None
        # As an older API version might have stored it: a field this version does not know.
        job.spec = {**job.spec, "model": {**job.spec["model"], "architecture": "transformer"}}
    ctx = _context(_settings(committed_url, fresh_redis_url), factory)
    assert execute_job(ctx, job_id) == "failed"
    stored = _stored(factory, job_id)
    assert (stored.status, stored.error_type, stored.attempts) == ("failed", "invalid_spec", 1)
    assert "model.architecture" in (stored.error_message or "")
    assert stored.lease_expires_at is None
    assert [attempt.outcome for attempt in stored.attempt_history] == ["failed"]


def _upload(factory: sessionmaker[Session]) -> uuid.UUID:
    with transaction(factory) as session:
        row = Dataset(
            name="rows.npz",
            source_format="npz",
            kind="tabular",
            n_samples=40,
            input_shape=[4],
            num_classes=2,
            data=b"stored arrays",
            size_bytes=13,
            sha256="0" * 64,
        )
        session.add(row)
        session.flush()
        return row.id


def _delete_in_thread(factory: sessionmaker[Session], dataset_id: uuid.UUID) -> threading.Thread:
    """Deletes the upload as DELETE /v1/datasets/{id} does; records how that ended."""

    def delete() -> None:
        try:
            with transaction(factory) as session:
                row = session.get(Dataset, dataset_id)
                assert row is not None
                delete_upload(session, row)
            outcomes.append("deleted")
        except DatasetInUse:
            outcomes.append("in use")

    outcomes: list[str] = []
    thread = threading.Thread(target=delete)
    thread.outcomes = outcomes  # type: ignore[attr-defined]
    thread.start()
    return thread


def test_an_upload_is_not_deleted_under_a_job_being_submitted(
    engines: Callable[[], Engine],
) -> None:
    submits, deletes = create_session_factory(engines()), create_session_factory(engines())
    dataset_id = _upload(submits)
    name = f"{UPLOAD_PREFIX}{dataset_id}"
    with submits() as submit, submit.begin():
        # The submit has checked the upload (and holds it) and stored its job, not yet committed.
        resolve_dataset(submit, name, tenant=DEFAULT_TENANT, hold=True)
        make_job(submit, dataset={"name": name})
        deleting = _delete_in_thread(deletes, dataset_id)
        deleting.join(0.5)
        assert deleting.is_alive()  # the delete waits for the submit to end
    deleting.join(30)
    assert deleting.outcomes == ["in use"]  # type: ignore[attr-defined]


def test_a_job_is_not_submitted_on_an_upload_being_deleted(
    engines: Callable[[], Engine],
) -> None:
    submits, deletes = create_session_factory(engines()), create_session_factory(engines())
    dataset_id = _upload(submits)
    name = f"{UPLOAD_PREFIX}{dataset_id}"
    checked: list[str] = []
    with deletes() as deleting, deleting.begin():
        row = deleting.get(Dataset, dataset_id)
        assert row is not None
        delete_upload(deleting, row)  # deleted, not yet committed

        def submit() -> None:
            try:
                with transaction(submits) as session:
                    resolve_dataset(session, name, tenant=DEFAULT_TENANT, hold=True)
                checked.append("accepted")
            except InvalidInput as exc:
                checked.append(exc.message)

        submitting = threading.Thread(target=submit)
        submitting.start()
        submitting.join(0.5)
        assert submitting.is_alive()  # the submit waits for the delete to end
    submitting.join(30)
    assert checked == [f"no uploaded dataset {name!r}"]
