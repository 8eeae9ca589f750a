"""What a worker may do to a job: claim it, keep its lease, record epochs, end or hand it back.

The database is the source of truth; the broker only says "run job X". A claim is one atomic
conditional UPDATE, so a message delivered twice trains the job once. The attempt number the
claim hands out is a fencing token: every later write names it and is refused (LeaseLost)
once the job has moved on to another attempt, so a worker that stalled past its lease and
wakes up cannot overwrite the attempt that replaced it.

Lease deadlines are the database's clock (database_now), never a worker's: a worker whose
clock is skewed can neither steal a live lease nor lose its own early. A retry (the worker
retries every write while the database is away) whose first try committed unseen is
recognised: the claim by the token its caller chose, finish and hand_back by the outcome the
first try wrote, and a stored epoch is simply overwritten by its retry.
"""

import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Float, and_, case, func, literal, select, update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, undefer
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from app.core import events, webhooks
from app.core.errors import JobNotCancellable, JobNotFound
from app.core.models import Checkpoint, EpochMetric, Job, JobAttempt, JobStatus, utcnow
from app.core.models.base import UTCDateTime
from app.core.models.jobs import ACTIVE_STATUSES, ENDED_STATUSES


class database_now(FunctionElement[datetime]):  # noqa: N801 (an SQL function, named as one)
    """The database server's clock plus `offset_seconds`, as an SQL expression.

    Stored in the columns' own format, so it compares with timestamps bound from Python:
    timestamptz on PostgreSQL; on SQLite the 'YYYY-MM-DD HH:MM:SS.ffffff' text SQLAlchemy
    writes (SQLite's clock has milliseconds; the padding keeps six digits).
    """

    type = UTCDateTime()
    inherit_cache = True

    def __init__(self, offset_seconds: float = 0.0) -> None:
        super().__init__(literal(float(offset_seconds), Float()))


@compiles(database_now, "postgresql")
def _database_now_postgresql(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    # statement_timestamp(), not now(): now() stands still for a whole transaction.
    offset = compiler.process(element.clauses, **kw)
    return f"(statement_timestamp() + make_interval(secs => CAST({offset} AS FLOAT)))"


@compiles(database_now, "sqlite")
def _database_now_sqlite(element: database_now, compiler: SQLCompiler, **kw: Any) -> str:
    offset = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', 'now', printf('%.6f seconds', {offset})) || '000')"


class LeaseLost(Exception):
    """This attempt is no longer the job's current one; the worker must stop writing."""


@dataclass(frozen=True)
class Claim:
    job_id: uuid.UUID
    attempt: int
    spec: dict[str, Any]
    resume_weights: bytes | None
    resume_state: bytes | None
    # Time since the job's first attempt started, by the database's clock: the wall-time
    # limit counts across attempts, and a worker's own clock may be skewed.
    wall_seconds_used: float
    # How long the job waited from submit to its first start (the database's clock).
    queued_seconds: float
    # This host's monotonic clock at the claim: with wall_seconds_used, the job's duration.
    claimed_at_monotonic: float = field(default_factory=time.monotonic)


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
    session: Session,
    job_id: uuid.UUID,
    worker_id: str,
    lease_seconds: float,
    claim_token: uuid.UUID | None = None,
) -> Claim | None:
    """queued -> running, attempts + 1, atomically; None if someone else has it or it ended.

    Pass the same `claim_token` to every try of one claim: a try that finds the job running
    under its token (the previous try committed, its acknowledgement was lost) gets that
    claim back, with the same attempt number and no second attempt row.
    """
    token = claim_token or uuid.uuid4()
    now = utcnow()
    own_attempt = session.scalar(
        select(Job.attempts).where(
            Job.id == job_id, Job.status == JobStatus.RUNNING, Job.claim_token == token
        )
    )
    if own_attempt is not None:
        _fenced_update(session, job_id, own_attempt, lease_expires_at=database_now(lease_seconds))
    else:
        result = session.execute(
            update(Job)
            .where(
                Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False)
            )
            .values(
                status=JobStatus.RUNNING,
                attempts=Job.attempts + 1,
                claim_token=token,
                lease_owner=worker_id,
                lease_expires_at=database_now(lease_seconds),
                started_at=func.coalesce(Job.started_at, database_now()),
                handback_requested=False,
                pack=None,  # a packed attempt's caller marks its pack (claim_companions)
                updated_at=now,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            return None
    job = session.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one()
    if own_attempt is None:
        session.add(
            JobAttempt(job_id=job_id, attempt=job.attempts, worker_id=worker_id, started_at=now)
        )
        record_change(session, job_id)
    last = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job_id, Checkpoint.kind == "last")
        .options(undefer(Checkpoint.weights), undefer(Checkpoint.trainer_state))
    ).first()
    moment = session.scalar(select(database_now()))
    assert job.started_at is not None
    assert moment is not None
    return Claim(
        job_id=job_id,
        attempt=job.attempts,
        spec=job.spec,
        resume_weights=last.weights if last else None,
        resume_state=last.trainer_state if last else None,
        wall_seconds_used=max(0.0, (moment - job.started_at).total_seconds()),
        queued_seconds=max(0.0, (job.started_at - job.created_at).total_seconds()),
    )


def claim_companions(
    session: Session,
    leader: Claim,
    worker_id: str,
    lease_seconds: float,
    claim_token: uuid.UUID,
    pack: uuid.UUID,
    packs_with: Callable[[dict[str, Any]], bool],
    limit: int,
) -> list[Claim]:
    """Claim up to `limit` queued jobs that can train in one pack with the leader's job.

    Candidates are the leader's tenant's queued jobs on the same dataset and architecture,
    oldest first; `packs_with` (the worker's pack_key comparison) decides on each spec. Each
    is claimed by claim()'s one conditional UPDATE, so a job another worker took meanwhile is
    passed over and no job trains twice. When any was claimed, the leader and its companions
    are marked with `pack`; the companions' claims are returned.

    Pass the same `claim_token` and `pack` to every try: a retry whose first try committed
    unseen finds its companions running under that token and gets the same claims back.
    """
    tenant = session.scalar(select(Job.tenant).where(Job.id == leader.job_id))
    spec = leader.spec
    own = (Job.status == JobStatus.RUNNING) & (Job.claim_token == claim_token)
    queued = (Job.status == JobStatus.QUEUED) & Job.cancel_requested.is_(False)
    candidates = session.execute(
        select(Job.id, Job.spec)
        .where(
            Job.tenant == tenant,
            Job.id != leader.job_id,
            queued | own,
            Job.spec[("dataset", "name")].as_string() == spec["dataset"]["name"],
            Job.spec[("model", "architecture")].as_string() == spec["model"]["architecture"],
        )
        .order_by(Job.created_at, Job.id)
        .limit(max(limit * 4, 32))  # a few that do not pack may sit among the oldest
    ).all()
    claims: list[Claim] = []
    for candidate in candidates:
        if len(claims) >= limit:
            break
        if not packs_with(candidate.spec):
            continue
        companion = claim(session, candidate.id, worker_id, lease_seconds, claim_token)
        if companion is not None:
            claims.append(companion)
    if claims:
        for member in (leader, *claims):
            _fenced_update(session, member.job_id, member.attempt, pack=pack)
    return claims


def _fenced_update(session: Session, job_id: uuid.UUID, attempt: int, **values: Any) -> None:
    """Update the job only while `attempt` holds it; this also row-locks it until commit."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.RUNNING)
        .values(updated_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        raise LeaseLost(f"job {job_id}: attempt {attempt} no longer holds the job")


def renew_lease(session: Session, job_id: uuid.UUID, attempt: int, lease_seconds: float) -> None:
    _fenced_update(session, job_id, attempt, lease_expires_at=database_now(lease_seconds))


def read_controls(
    session: Session, attempts: Sequence[tuple[uuid.UUID, int]]
) -> dict[uuid.UUID, Control | None]:
    """What each (job, attempt) is asked now, in one query for all of them (a worker polls the
    jobs it trains, a pack's every job, twice a second); None where that attempt no longer
    holds its job."""
    held = dict(attempts)
    rows = session.execute(
        select(
            Job.id, Job.status, Job.attempts, Job.cancel_requested, Job.handback_requested
        ).where(Job.id.in_(held))
    ).all()
    controls: dict[uuid.UUID, Control | None] = dict.fromkeys(held)
    for row in rows:
        if row.status == JobStatus.RUNNING and row.attempts == held[row.id]:
            controls[row.id] = Control(row.cancel_requested, row.handback_requested)
    return controls


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
        lease_expires_at=database_now(lease_seconds),
    )
    # JSON has no Infinity or NaN (PostgreSQL's jsonb refuses them, SQLite's JSON functions
    # reject the row): a gradient norm that overflowed is stored as null.
    diagnostics = _finite_or_null(diagnostics)
    values: dict[str, Any] = {"attempt": attempt, "diagnostics": diagnostics, **metrics}
    rerun = session.execute(
        update(EpochMetric)
        .where(EpochMetric.job_id == job_id, EpochMetric.epoch == epoch)
        .values(created_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if rerun.rowcount == 0:  # type: ignore[attr-defined]
        session.add(EpochMetric(job_id=job_id, epoch=epoch, **values))
        # Streams carry each epoch once (a rerun after a resume is not news), with its scalars;
        # per-layer lists stay behind the metrics endpoint.
        scalars = {k: v for k, v in diagnostics.items() if isinstance(v, int | float)}
        events.record_epoch(session, job_id, epoch, {**metrics, **scalars})
    _write_checkpoints(session, job_id, attempt, checkpoints)


def _finite_or_null(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite_or_null(item) for item in value]
    return value


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


def _ended_with(session: Session, job_id: uuid.UUID, attempt: int, outcome: str) -> bool:
    """Whether this attempt already ended with `outcome`: a retry whose first try landed.

    Only this attempt's own finish or hand-back writes these outcomes (the reaper writes
    "lost"), and it writes the job's row in the same transaction.
    """
    ended = session.scalar(
        select(JobAttempt.outcome).where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt)
    )
    return ended == outcome


def finish(
    session: Session,
    job_id: uuid.UUID,
    attempt: int,
    status: str,
    summary: dict[str, Any] | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
) -> None:
    """End the job succeeded, failed or cancelled; a retry of a finish that landed is a no-op."""
    try:
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
    except LeaseLost:
        if _ended_with(session, job_id, attempt, status):
            return
        raise
    _end_attempt(session, job_id, attempt, status)
    record_change(session, job_id)


def hand_back(session: Session, job_id: uuid.UUID, attempt: int) -> None:
    """Give a job back to the queue (its worker is shutting down); it resumes elsewhere.

    A cancel that arrived meanwhile wins: a queued job with cancel_requested set could never
    be claimed again, so it would sit in the queue for ever. A retry of a hand-back that
    landed is a no-op.
    """
    now = utcnow()
    try:
        _fenced_update(
            session,
            job_id,
            attempt,
            status=case((Job.cancel_requested, JobStatus.CANCELLED), else_=JobStatus.QUEUED),
            finished_at=case((Job.cancel_requested, now), else_=None),
            lease_owner=None,
            lease_expires_at=None,
            handback_requested=False,
            published_at=None,
        )
    except LeaseLost:
        if _ended_with(session, job_id, attempt, "handed_back"):
            return
        raise
    _end_attempt(session, job_id, attempt, "handed_back")
    record_change(session, job_id)


def record_change(session: Session, job_id: uuid.UUID) -> None:
    """In the transaction that changed a job's status: its event, and its webhook if it ended."""
    events.record_status(session, job_id)
    ended = session.scalar(select(Job.status).where(Job.id == job_id)) in ENDED_STATUSES
    if ended:
        webhooks.enqueue_if_ended(session, job_id)


def request_cancel(session: Session, job_id: uuid.UUID) -> str:
    """A queued job is cancelled at once; a running one is flagged and stops within a batch.

    Returns the status the job has after the request (cancelled, or running with the flag).
    One UPDATE decides, from the row as it is when the statement gets it: a hand-back, claim
    or reaper committing at the same moment cannot slip between two checks. (PostgreSQL makes
    the UPDATE wait for a concurrent writer's row lock and re-read the row; SQLite holds the
    database's write lock.) The worker's writes are conditional as well, so none overwrites
    the flag: a hand-back or the reaper then ends the job cancelled.
    """
    now = utcnow()
    queued = Job.status == JobStatus.QUEUED
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
        .values(
            status=case((queued, JobStatus.CANCELLED), else_=Job.status),
            finished_at=case((queued, now), else_=Job.finished_at),
            cancel_requested=True,
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(f"no job {job_id}")
    if status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        raise JobNotCancellable(f"job {job_id} already ended {status}")
    if result.rowcount == 1 and status == JobStatus.CANCELLED:  # type: ignore[attr-defined]
        record_change(session, job_id)  # it was queued: cancelled now, not just flagged
    return status


def request_handback(session: Session, worker_prefix: str) -> int:
    """Ask every job leased by this worker node (all its processes) to come back at once."""
    result = session.execute(
        update(Job)
        .where(
            Job.status == JobStatus.RUNNING,
            Job.lease_owner.startswith(worker_prefix, autoescape=True),
        )
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
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < database_now())
        .with_for_update(skip_locked=True)  # two reapers never handle the same job
        .limit(100)
        .execution_options(populate_existing=True)
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
            values: dict[str, Any] = {"status": JobStatus.CANCELLED, "finished_at": now}
        elif (lost or 0) >= max_attempts:
            values = {
                "status": JobStatus.FAILED,
                "finished_at": now,
                "error_type": "worker_lost",
                "error_message": f"its worker was lost {lost} times (max_attempts={max_attempts})",
            }
        else:
            values = {"status": JobStatus.QUEUED, "published_at": None, "handback_requested": False}
            requeued.append(job.id)
        session.execute(
            update(Job)
            .where(
                and_(
                    Job.id == job.id, Job.attempts == job.attempts, Job.status == JobStatus.RUNNING
                )
            )
            .values(**common, **values)
            .execution_options(synchronize_session=False)
        )
        record_change(session, job.id)
    return requeued


def jobs_to_publish(
    session: Session, republish_after_seconds: float, limit: int = 500
) -> list[uuid.UUID]:
    """The outbox: queued jobs never published, or published long ago and still unclaimed."""
    stale = database_now(-republish_after_seconds)
    return list(
        session.scalars(
            select(Job.id)
            .where(
                Job.status == JobStatus.QUEUED,
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
            .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
            .values(published_at=database_now())
            .execution_options(synchronize_session=False)
        )
