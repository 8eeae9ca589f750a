"""What the API returns, as pydantic models that keep fields this client does not know yet."""

import uuid
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

ENDED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Model(BaseModel):
    # A newer server may send more fields: keep them rather than fail.
    model_config = ConfigDict(extra="allow")


class Progress(_Model):
    epoch: int
    epochs: int


class JobError(_Model):
    type: str
    message: str


class Job(_Model):
    id: uuid.UUID
    name: str | None = None
    status: str
    spec: dict[str, Any]
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int = 0
    progress: Progress
    summary: dict[str, Any] | None = None
    error: JobError | None = None
    study_id: uuid.UUID | None = None
    grid_point: dict[str, Any] | None = None  # its study's values for it
    # The pack its latest attempt trained in (trained with other jobs as one batched model);
    # None: alone. Servers before packing do not send it.
    pack: uuid.UUID | None = None

    @property
    def ended(self) -> bool:
        return self.status in ENDED_STATUSES


class Epoch(_Model):
    """One epoch's metrics; diagnostics arrive as further fields."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    epoch_seconds: float


class Checkpoint(_Model):
    id: uuid.UUID
    epoch: int
    kind: str
    size_bytes: int
    sha256: str
