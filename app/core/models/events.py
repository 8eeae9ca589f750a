"""Job events: every status change and every stored epoch, in commit order, for live streams.

Written in the same transaction as the change they describe, so a stream built from this table
sees exactly what was committed, from any API process, across restarts.
"""

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, ForeignKey, Index, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from app.core.models.base import Base, BigIntId, UTCDateTime, utcnow
from app.core.models.keys import TENANT_NAME_LENGTH


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (
        # A reconnecting client replays one job's events after its Last-Event-ID.
        Index("ix_job_events_job_id_id", "job_id", "id"),
    )

    # The event's SSE id: increasing in insertion order.
    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), index=False
    )
    # The job's owner and study, copied so that a stream filters events without a join.
    tenant: Mapped[str] = mapped_column(String(TENANT_NAME_LENGTH))
    study_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    kind: Mapped[str] = mapped_column(String(16))  # status | epoch
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
