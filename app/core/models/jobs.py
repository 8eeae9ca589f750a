"""Tables of the job family: jobs, their attempts, per-epoch metrics and checkpoints."""

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.core.models.base import Base, BigIntId, UTCDateTime, utcnow
from app.core.models.keys import DEFAULT_TENANT, TENANT_NAME_LENGTH


class JobStatus(StrEnum):
    """A job's status: the one definition (the table's CHECK, the API's enum, every query)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A job in one of these is waiting for a worker or training.
ACTIVE_STATUSES = frozenset({JobStatus.QUEUED, JobStatus.RUNNING})
# A job in one of these has ended: nothing more happens to it.
ENDED_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

CHECKPOINT_KINDS = ("last", "best")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN {tuple(status.value for status in JobStatus)}", name="status"),
        # Listing: newest first, optionally by status, with (created_at, id) as the keyset.
        Index("ix_jobs_created_at_id", "created_at", "id"),
        Index("ix_jobs_status_created_at_id", "status", "created_at", "id"),
        # The reaper's scan for expired leases, and the outbox's scan for unpublished jobs.
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        Index("ix_jobs_status_published_at", "status", "published_at"),
        # A study's jobs, and GET /v1/jobs?study_id=.
        Index("ix_jobs_study_id_created_at_id", "study_id", "created_at", "id"),
        # A tenant's listing, and its count of active jobs.
        Index("ix_jobs_tenant_created_at_id", "tenant", "created_at", "id"),
        Index("ix_jobs_tenant_status", "tenant", "status"),
        # Idempotency keys are per tenant: one tenant's key never finds another's job.
        UniqueConstraint("tenant", "idempotency_key"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant: Mapped[str] = mapped_column(
        String(TENANT_NAME_LENGTH), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT
    )
    name: Mapped[str | None] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    # sha256 of the canonical normalized spec: an Idempotency-Key reused with another body is a 409.
    spec_sha256: Mapped[str] = mapped_column(String(64))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # The attempt number is also the fencing token: every write a worker makes names it, and
    # a write from an attempt that is no longer current is refused.
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Written by the claim that made the current attempt, chosen by its caller before the
    # first try: a claim retried after its commit's acknowledgement was lost finds its own
    # token and gets the same attempt back instead of "nothing to claim".
    claim_token: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set when the worker holding the lease is shutting down: the job is handed back at once.
    handback_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Outbox: NULL until the broker has accepted a "run job X" message for the current queueing.
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    progress_epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_type: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Set for a job a study made: the study, and the axis values it was made from.
    study_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("studies.id", ondelete="CASCADE"))
    grid_point: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # Set when the job's latest attempt trained packed with others (worker/packing.py): the
    # pack's id, shared by every job of that pack; NULL when it trained alone.
    pack: Mapped[uuid.UUID | None] = mapped_column(Uuid)

    attempt_history: Mapped[list["JobAttempt"]] = relationship(
        back_populates="job", order_by="JobAttempt.attempt", cascade="all, delete-orphan"
    )


class JobAttempt(Base):
    """One claim of a job by one worker process: who ran it, when, and how it ended."""

    __tablename__ = "job_attempts"
    __table_args__ = (UniqueConstraint("job_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    worker_id: Mapped[str] = mapped_column(String(200))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # succeeded | failed | cancelled | handed_back | lost (lease expired); NULL while it runs.
    outcome: Mapped[str | None] = mapped_column(String(32))

    job: Mapped[Job] = relationship(back_populates="attempt_history")


class EpochMetric(Base):
    __tablename__ = "epoch_metrics"
    # One row per job and epoch: a resumed or duplicated attempt can never store an epoch twice.
    __table_args__ = (UniqueConstraint("job_id", "epoch"),)

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    attempt: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Float)
    train_accuracy: Mapped[float] = mapped_column(Float)
    val_loss: Mapped[float] = mapped_column(Float)
    val_accuracy: Mapped[float] = mapped_column(Float)
    lr: Mapped[float] = mapped_column(Float)
    epoch_seconds: Mapped[float] = mapped_column(Float)
    # Everything else the trainer measured (gradient norms, per-layer statistics, ...).
    diagnostics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (
        CheckConstraint(f"kind IN {CHECKPOINT_KINDS}", name="kind"),
        # A job keeps its latest and its best checkpoint; a newer one replaces the old row.
        UniqueConstraint("job_id", "kind"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    epoch: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(8))
    attempt: Mapped[int] = mapped_column(Integer)
    # The model's weights as a safetensors file: what users download.
    weights: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    # What a resume needs beyond the weights (optimizer, scheduler, RNG states, data order),
    # also as safetensors; only the "last" checkpoint carries it.
    trainer_state: Mapped[bytes | None] = mapped_column(LargeBinary, deferred=True)
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
