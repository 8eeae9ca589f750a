"""Job events: recorded by the lifecycle in the transaction of each change, read by streams.

A status event's payload is {"job_id", "status", "attempt", "epoch"} (plus "error" when the
job failed); an epoch event's is {"job_id", "epoch", <the epoch's metrics>}. Streams send the
row id as the SSE id, so a client reconnecting with Last-Event-ID resumes exactly.
"""

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.core.models import Job, JobEvent

STATUS = "status"
EPOCH = "epoch"


@dataclass(frozen=True)
class Event:
    id: int
    job_id: uuid.UUID
    tenant: str
    study_id: uuid.UUID | None
    kind: str
    payload: dict[str, Any]


def record_status(session: Session, job_id: uuid.UUID) -> None:
    """The job's status as this transaction leaves it (read back, so it is what commits)."""
    job = session.execute(
        select(
            Job.tenant,
            Job.study_id,
            Job.status,
            Job.attempts,
            Job.progress_epoch,
            Job.error_type,
            Job.error_message,
        ).where(Job.id == job_id)
    ).one()
    payload: dict[str, Any] = {
        "job_id": str(job_id),
        "status": str(job.status),
        "attempt": job.attempts,
        "epoch": job.progress_epoch,
    }
    if job.error_type:
        payload["error"] = {"type": job.error_type, "message": job.error_message or ""}
    session.execute(
        insert(JobEvent).values(
            job_id=job_id, tenant=job.tenant, study_id=job.study_id, kind=STATUS, payload=payload
        )
    )


def record_submitted(session: Session, jobs: Sequence[Job]) -> None:
    """The `queued` event of jobs just created, in one statement (a study makes hundreds)."""
    if jobs:
        session.execute(
            insert(JobEvent),
            [
                {
                    "job_id": job.id,
                    "tenant": job.tenant,
                    "study_id": job.study_id,
                    "kind": STATUS,
                    "payload": {
                        "job_id": str(job.id),
                        "status": "queued",
                        "attempt": 0,
                        "epoch": 0,
                    },
                }
                for job in jobs
            ],
        )


def record_epoch(session: Session, job_id: uuid.UUID, epoch: int, metrics: dict[str, Any]) -> None:
    owner = session.execute(select(Job.tenant, Job.study_id).where(Job.id == job_id)).one()
    payload = {"job_id": str(job_id), "epoch": epoch, **metrics}
    session.execute(
        insert(JobEvent).values(
            job_id=job_id,
            tenant=owner.tenant,
            study_id=owner.study_id,
            kind=EPOCH,
            payload=payload,
        )
    )


def read_events(
    session: Session,
    *,
    after_id: int = 0,
    job_id: uuid.UUID | None = None,
    until_id: int | None = None,
    ids: Sequence[int] = (),
    limit: int = 1000,
) -> list[Event]:
    """Events after `after_id` (up to `until_id`, and any listed `ids`), oldest first; one
    job's if `job_id`."""
    condition = JobEvent.id > after_id
    if until_id is not None:
        condition = condition & (JobEvent.id <= until_id)
    if ids:
        condition = condition | JobEvent.id.in_(ids)
    query = select(
        JobEvent.id,
        JobEvent.job_id,
        JobEvent.tenant,
        JobEvent.study_id,
        JobEvent.kind,
        JobEvent.payload,
    ).where(condition)
    if job_id is not None:
        query = query.where(JobEvent.job_id == job_id)
    rows = session.execute(query.order_by(JobEvent.id).limit(limit)).all()
    return [
        Event(row.id, row.job_id, row.tenant, row.study_id, row.kind, row.payload) for row in rows
    ]


def last_event_id(session: Session) -> int:
    return session.scalar(select(JobEvent.id).order_by(JobEvent.id.desc()).limit(1)) or 0
