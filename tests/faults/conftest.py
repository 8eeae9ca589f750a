"""Fixtures for fault-injection tests: private servers, real processes, and a view of the jobs.

Every server and process a test starts is stopped by a finalizer, pass or fail; a failing test
prints its processes' logs.
"""

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from app.api.jobs.service import submit_job
from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.models import EpochMetric, Job, JobAttempt
from app.core.outbox import Dispatcher
from app.core.spec import JobSpec
from app.core.tenancy import UNAUTHENTICATED
from tests.factories import spec_payload
from tests.faults.servers import PostgresServer, RedisServer
from tests.support.processes import Processes

# Short leases so a lost worker is noticed within seconds; every wait in the tests is a poll
# with a deadline derived from these.
LEASE_SECONDS = 3.0
FAST = {
    "TRAINSVC_LEASE_SECONDS": str(LEASE_SECONDS),
    "TRAINSVC_HEARTBEAT_SECONDS": "0.5",
    "TRAINSVC_CONTROL_POLL_SECONDS": "0.2",
    "TRAINSVC_SWEEP_SECONDS": "0.5",
    "TRAINSVC_REPUBLISH_AFTER_SECONDS": "10",
}


def tiny_spec(epochs: int = 2, **overrides: Any) -> dict[str, Any]:
    """A job that trains in well under a second per epoch; top-level keys may be replaced."""
    tiny = {
        "dataset": {"name": "digits", "batch_size": 32, "train_subset": 128},
        "model": {"architecture": "mlp", "hidden_sizes": [8]},
        "epochs": epochs,
    }
    return spec_payload(**{**tiny, **overrides})


def slow_spec(epochs: int = 6) -> dict[str, Any]:
    """About 0.7 s an epoch on one CPU core: long enough to be interrupted in the middle."""
    return spec_payload(
        dataset={"name": "digits", "batch_size": 2},
        model={"architecture": "mlp", "hidden_sizes": [256, 256]},
        epochs=epochs,
    )


class Jobs:
    """The test's direct view of the jobs table, and a way to submit without an API process."""

    def __init__(self, database_url: str, broker_url: str) -> None:
        self.settings = Settings(database_url=database_url, broker_url=broker_url)
        self.engine = create_db_engine(database_url)
        self.session_factory: sessionmaker[Session] = create_session_factory(self.engine)
        self.dispatcher = Dispatcher(create_celery_app(self.settings), self.session_factory)

    def submit(self, spec: dict[str, Any], publish: bool = True) -> uuid.UUID:
        with transaction(self.session_factory) as session:
            job, _ = submit_job(
                session, JobSpec.model_validate(spec), self.settings, None, UNAUTHENTICATED
            )
            job_id = job.id
        if publish:
            self.dispatcher.publish([job_id])
        return job_id

    def get(self, job_id: uuid.UUID) -> Job:
        with self.session_factory() as session:
            job = session.get(Job, job_id)
            assert job is not None
            session.expunge(job)
            return job

    def status(self, job_id: uuid.UUID) -> str:
        return self.get(job_id).status

    def attempts(self, job_id: uuid.UUID) -> list[JobAttempt]:
        with self.session_factory() as session:
            rows = session.scalars(
                sa.select(JobAttempt)
                .where(JobAttempt.job_id == job_id)
                .order_by(JobAttempt.attempt)
            ).all()
            session.expunge_all()
            return list(rows)

    def metric_epochs(self, job_id: uuid.UUID) -> list[int]:
        return self._by_epoch(job_id, EpochMetric.epoch)

    def metric_attempts(self, job_id: uuid.UUID) -> list[int]:
        """Which attempt stored each epoch, in epoch order."""
        return self._by_epoch(job_id, EpochMetric.attempt)

    def _by_epoch(self, job_id: uuid.UUID, column: sa.orm.InstrumentedAttribute[int]) -> list[int]:
        with self.session_factory() as session:
            return list(
                session.scalars(
                    sa.select(column)
                    .where(EpochMetric.job_id == job_id)
                    .order_by(EpochMetric.epoch)
                )
            )

    def all_ended(self, job_ids: list[uuid.UUID]) -> bool:
        with self.session_factory() as session:
            unfinished = session.scalar(
                sa.select(sa.func.count())
                .select_from(Job)
                .where(Job.id.in_(job_ids), Job.status.in_(("queued", "running")))
            )
        return unfinished == 0

    def dispose(self) -> None:
        self.engine.dispose()


@pytest.fixture
def processes(processes: Processes) -> Processes:
    """The shared fixture's processes, with leases short enough to lose a worker quickly."""
    processes.env.update(FAST)
    return processes


@pytest.fixture
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.destroy()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.destroy()


@pytest.fixture
def jobs_on(processes: Processes) -> Iterator[Any]:
    """jobs_on(database_url, broker_url, **settings) -> Jobs, disposed of at the end.

    Also points every process the test starts afterwards at the same database and broker,
    with any further TRAINSVC_<NAME> settings given, so the test and its processes never
    disagree about which servers they use.
    """
    made: list[Jobs] = []

    def make(database_url: str, broker_url: str, **settings: str) -> Jobs:
        processes.env.update(
            TRAINSVC_DATABASE_URL=database_url,
            TRAINSVC_BROKER_URL=broker_url,
            **{f"TRAINSVC_{name.upper()}": value for name, value in settings.items()},
        )
        jobs = Jobs(database_url, broker_url)
        made.append(jobs)
        return jobs

    yield make
    for jobs in made:
        jobs.dispose()
