"""What goes over the wire for jobs (the spec itself lives in app/jobs/spec.py)."""

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from app.core.models import Checkpoint, EpochMetric, Job, JobStatus, WebhookDelivery


class Progress(BaseModel):
    epoch: int
    epochs: int


class JobError(BaseModel):
    type: str
    message: str


class AttemptRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    attempt: int
    worker_id: str
    started_at: datetime
    ended_at: datetime | None
    outcome: str | None


class JobRead(BaseModel):
    id: uuid.UUID
    tenant: str
    name: str | None
    status: JobStatus
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    attempt_history: list[AttemptRead]
    cancel_requested: bool
    progress: Progress
    summary: dict[str, Any] | None
    error: JobError | None
    study_id: uuid.UUID | None = None
    grid_point: dict[str, Any] | None = None

    @classmethod
    def from_job(cls, job: Job) -> "JobRead":
        return cls(
            id=job.id,
            tenant=job.tenant,
            name=job.name,
            status=JobStatus(job.status),  # the table's CHECK holds it to JobStatus
            spec=job.spec,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            attempts=job.attempts,
            attempt_history=[AttemptRead.model_validate(a) for a in job.attempt_history],
            cancel_requested=job.cancel_requested,
            progress=Progress(epoch=job.progress_epoch, epochs=job.epochs),
            summary=job.summary,
            error=JobError(type=job.error_type, message=job.error_message or "")
            if job.error_type
            else None,
            study_id=job.study_id,
            grid_point=job.grid_point,
        )


class JobPage(BaseModel):
    items: list[JobRead]
    next_cursor: str | None


class EpochRead(BaseModel):
    """One epoch's metrics; the trainer's diagnostics appear as further fields."""

    model_config = ConfigDict(extra="allow")

    epoch: int
    attempt: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float

    @classmethod
    def from_row(cls, row: EpochMetric) -> "EpochRead":
        return cls(
            epoch=row.epoch,
            attempt=row.attempt,
            train_loss=row.train_loss,
            train_accuracy=row.train_accuracy,
            val_loss=row.val_loss,
            val_accuracy=row.val_accuracy,
            lr=row.lr,
            epoch_seconds=row.epoch_seconds,
            **row.diagnostics,
        )


class MetricsRead(BaseModel):
    job_id: uuid.UUID
    epochs: list[EpochRead]


class CheckpointRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    epoch: int
    kind: Literal["last", "best"]
    size_bytes: int
    sha256: str
    created_at: datetime

    @classmethod
    def from_row(cls, row: Checkpoint) -> "CheckpointRead":
        return cls.model_validate(row)


class CheckpointList(BaseModel):
    items: list[CheckpointRead]


class DeliveryRead(BaseModel):
    """One webhook delivery of the job's end to its callback URL, and how it went."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    next_attempt_at: datetime | None
    created_at: datetime
    delivered_at: datetime | None

    @classmethod
    def from_row(cls, row: WebhookDelivery) -> "DeliveryRead":
        read = cls.model_validate(row)
        # Only a pending delivery has a next attempt worth showing.
        return (
            read if row.status == "pending" else read.model_copy(update={"next_attempt_at": None})
        )


class DeliveryList(BaseModel):
    items: list[DeliveryRead]
