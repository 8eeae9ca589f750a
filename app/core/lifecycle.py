"""What a worker may do to a job: claim it, keep its lease, record epochs, end or hand it back.

The database is the source of truth; the broker only says "run job X". A claim is one atomic
conditional UPDATE, so a message delivered twice trains the job once. The attempt number the
claim hands out is a fencing token: every later write names it and is refused (LeaseLost)
once the job has moved on to another attempt, so a worker that stalled past its lease and
wakes up cannot overwrite the attempt that replaced it.
"""

import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import and_, case, func, select, update
from sqlalchemy.orm import Session, undefer

from app.core.models import Checkpoint, EpochMetric, Job, JobAttempt, utcnow


class LeaseLost(Exception):
    """This attempt is no longer the job's current one; the worker must stop writing."""


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    attempt: int
    spec: dict[str, Any]
    started_at_epoch: int  # epochs already stored; training resumes after them
    resume_weights: bytes | None
    resume_state: bytes | None
    first_started_at_ts: float


@dataclass(frozen=True)
class Control:
    cancel_requested: bool
    handback_requested: bool


@dataclass(frozen=True)
class CheckpointBlob:
    kind: str  # last | best
    epoch: int
    weights: bytes
    trainer_state: bytes | None
    sha256: str


def claim(
    session: Session, job_id: uuid.UUID, worker_id: str, lease_seconds: float
) -> Claim | None:
    """queued -> running, attempts + 1, atomically; None if someone else has it or it ended."""
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued", Job.cancel_requested.is_(False))
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=func.coalesce(Job.started_at, now),
            handback_requested=False,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one()
    session.add(
        JobAttempt(job_id=job_id, attempt=job.attempts, worker_id=worker_id, started_at=now)
    )
    last = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.kind == "last")
        .options(undefer(Checkpoint.weights), undefer(Checkpoint.trainer_state))
    ).first()
    assert job.started_at is not None
    return Claim(
        job_id=job_id,
        attempt=job.attempts,
        spec=job.spec,
        started_at_epoch=last.epoch if last else 0,
        resume_weights=last.weights if last else None,
        resume_state=last.trainer_state if last else None,
        first_started_at_ts=job.started_at.timestamp(),
    )


def _fenced_update(session: Session, job_id: uuid.UUID, attempt: int, **values: Any) -> None:
    """Update the job only while `attempt` holds it; this also row-locks it until commit."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status == "running")
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the job")


def renew_lease(session: Session, job_id: uuid.UUID, attempt: int, lease_seconds: float) -> None:
    _fenced_update(
        session, job_id, attempt, lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)
    )


def read_control(session: Session, job_id: uuid.UUID, attempt: int) -> Control:
    row = session.execute(
        select(Job.status, Job.attempts, Job.cancel_requested, Job.handback_requested).where(
            Job.id == job_id
        )
    ).one()
    if row.status != "running" or row.attempts != attempt:
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the job")
    return Control(cancel_requested=row.cancel_requested, handback_requested=row.handback_requested)


def record_epoch(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    epoch: int,
    metrics: dict[str, float],
    diagnostics: dict[str, Any],
    checkpoints: list[CheckpointBlob],
    lease_seconds: float,
) -> None:
    """One epoch's metrics (and checkpoints, when due), in the caller's one transaction.

    Checkpoints are stored only every so often, so a resume may start before the last stored
    epoch and train it again: the rerun's numbers replace the stored row (the later epochs grow
    from the rerun, and on CPU it is bit-identical anyway), never a second row. A write retried
    after its commit landed is the same overwrite, so retries need no special case.
    """
    _fenced_update(
        session,
        job_id,
        attempt,
        # A rerun epoch does not take the progress back: its metrics are stored already.
        progress_epoch=case((Job.progress_epoch > epoch, Job.progress_epoch), else_=epoch),
        lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
    )
    values: dict[str, Any] = {"attempt": attempt, "diagnostics": diagnostics, **metrics}
    rerun = session.execute(
        update(EpochMetric)
        .where(EpochMetric.job_id == job_id, EpochMetric.epoch == epoch)
        .values(created_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if rerun.rowcount == 0:  # type: ignore[attr-defined]
        session.add(EpochMetric(job_id=job_id, epoch=epoch, **values))
    _write_checkpoints(session, job_id, attempt, checkpoints)


def store_checkpoints(
    session: Session, job_id: uuid.UUID, attempt: int, checkpoints: list[CheckpointBlob]
) -> None:
    """Checkpoints alone, e.g. the last completed epoch's when an attempt is stopped."""
    _fenced_update(session, job_id, attempt)
    _write_checkpoints(session, job_id, attempt, checkpoints)


def _write_checkpoints(
    session: Session, job_id: uuid.UUID, attempt: int, checkpoints: list[CheckpointBlob]
) -> None:
    """In place: a job's `last` and `best` rows keep their ids, and a rewrite moves created_at.

    An UPDATE of the blob, not a delete and an insert: half the writes, and the id a client
    listed still names the checkpoint. The fence holds the job's row, so no other attempt
    inserts the same kind meanwhile.
    """
    for blob in checkpoints:
        values: dict[str, Any] = {
            "epoch": blob.epoch,
            "attempt": attempt,
            "weights": blob.weights,
            "trainer_state": blob.trainer_state,
            "size_bytes": len(blob.weights),
            "sha256": blob.sha256,
            "created_at": utcnow(),
        }
        rewritten = session.execute(
            update(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.kind == blob.kind)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
        if rewritten.rowcount == 0:  # type: ignore[attr-defined]
            session.add(Checkpoint(job_id=job_id, kind=blob.kind, **values))
    session.flush()


def _end_attempt(session: Session, job_id: uuid.UUID, attempt: int, outcome: str) -> None:
    session.execute(
        update(JobAttempt)
        .where(
            JobAttempt.job_id == job_id,
            JobAttempt.attempt == attempt,
            JobAttempt.ended_at.is_(None),
        )
        .values(ended_at=utcnow(), outcome=outcome)
    )


def finish(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    status: str,
    summary: dict[str, Any] | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
) -> None:
    """End the job succeeded, failed or cancelled."""
    _fenced_update(
        session,
        job_id,
        attempt,
        status=status,
        finished_at=utcnow(),
        summary=summary,
        error_type=error_type,
        error_message=error_message,
        lease_owner=None,
        lease_expires_at=None,
    )
    _end_attempt(session, job_id, attempt, status)


def hand_back(session: Session, job_id: uuid.UUID, attempt: int) -> None:
    """Give a job back to the queue (its worker is shutting down); it resumes elsewhere.

    A cancel that arrived meanwhile wins: a queued job with cancel_requested set could never
    be claimed again, so it would sit in the queue for ever.
    """
    now = utcnow()
    _fenced_update(
        session,
        job_id,
        attempt,
        status=case((Job.cancel_requested, "cancelled"), else_="queued"),
        finished_at=case((Job.cancel_requested, now), else_=None),
        lease_owner=None,
        lease_expires_at=None,
        handback_requested=False,
        published_at=None,
    )
    _end_attempt(session, job_id, attempt, "handed_back")


def request_handback(session: Session, worker_prefix: str) -> int:
    """Ask every job leased by this worker node (all its processes) to come back at once."""
    result = session.execute(
        update(Job)
        .where(Job.status == "running", Job.lease_owner.startswith(worker_prefix, autoescape=True))
        .values(handback_requested=True, updated_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def reap_expired_leases(session: Session, max_attempts: int) -> list[uuid.UUID]:
    """Jobs whose worker vanished: queue them again, or end them if they ran out of attempts.

    Returns the ids put back in the queue (for the dispatcher to publish).
    """
    now = utcnow()
    expired = session.scalars(
        select(Job)
        .where(Job.status == "running", Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)  # two reapers never handle the same job
        .limit(100)
    ).all()
    requeued = []
    for job in expired:
        _end_attempt(session, job.id, job.attempts, "lost")
        lost = session.scalar(
            select(func.count())
            .select_from(JobAttempt)
            .where(JobAttempt.job_id == job.id, JobAttempt.outcome == "lost")
        )
        common = {"lease_owner": None, "lease_expires_at": None, "updated_at": now}
        if job.cancel_requested:
            values: dict[str, Any] = {"status": "cancelled", "finished_at": now}
        elif (lost or 0) >= max_attempts:
            values = {
                "status": "failed",
                "finished_at": now,
                "error_type": "worker_lost",
                "error_message": f"its worker was lost {lost} times (max_attempts={max_attempts})",
            }
        else:
            values = {"status": "queued", "published_at": None, "handback_requested": False}
            requeued.append(job.id)
        session.execute(
            update(Job)
            .where(and_(Job.id == job.id, Job.attempts == job.attempts, Job.status == "running"))
            .values(**common, **values)
            .execution_options(synchronize_session=False)
        )
    return requeued


def jobs_to_publish(
    session: Session, republish_after_seconds: float, limit: int = 500
) -> list[uuid.UUID]:
    """The outbox: queued jobs never published, or published long ago and still unclaimed."""
    stale = utcnow() - timedelta(seconds=republish_after_seconds)
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == "queued",
                (Job.published_at.is_(None)) | (Job.published_at < stale),
            )
            .order_by(Job.created_at)
            .limit(limit)
        )
    )


def mark_published(session: Session, job_ids: list[uuid.UUID]) -> None:
    if job_ids:
        session.execute(
            update(Job)
            .where(Job.id.in_(job_ids), Job.status == "queued")
            .values(published_at=utcnow())
            .execution_options(synchronize_session=False)
        )
