"""Worker heartbeats in the database: written by each worker's sweeper, read by the doctor.

The database, not the broker: Celery's remote control (inspect ping) needs fanout exchanges,
which the embedded SQLite broker does not have.
"""

from datetime import timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.core.models import WorkerHeartbeat, utcnow

# A worker silent this long is forgotten (its row deleted by any other worker's sweep).
FORGET_AFTER = timedelta(days=7)


def touch(session: Session, worker_id: str, hostname: str) -> None:
    """This worker is alive now. Only this worker writes its row, so update-else-insert is safe."""
    now = utcnow()
    updated = session.execute(
        update(WorkerHeartbeat)
        .where(WorkerHeartbeat.worker_id == worker_id)
        .values(seen_at=now)
        .execution_options(synchronize_session=False)
    )
    if updated.rowcount == 0:  # type: ignore[attr-defined]
        session.add(
            WorkerHeartbeat(
                worker_id=worker_id,
                hostname=hostname,
                started_at=now,
                seen_at=now,
            )
        )
    session.execute(delete(WorkerHeartbeat).where(WorkerHeartbeat.seen_at < now - FORGET_AFTER))


def seen_since(session: Session, seconds: float) -> list[WorkerHeartbeat]:
    since = utcnow() - timedelta(seconds=seconds)
    return list(
        session.scalars(
            select(WorkerHeartbeat)
            .where(WorkerHeartbeat.seen_at >= since)
            .order_by(WorkerHeartbeat.worker_id)
        )
    )
