"""SQLAlchemy tables. Importing this package registers every table on Base.metadata."""

from app.core.models.base import Base, utcnow
from app.core.models.datasets import Dataset
from app.core.models.events import JobEvent
from app.core.models.jobs import (
    CHECKPOINT_KINDS,
    Checkpoint,
    EpochMetric,
    Job,
    JobAttempt,
    JobStatus,
)
from app.core.models.keys import DEFAULT_TENANT, ApiKey
from app.core.models.studies import Study
from app.core.models.webhooks import JobCallback, WebhookDelivery
from app.core.models.workers import WorkerHeartbeat

__all__ = [
    "CHECKPOINT_KINDS",
    "DEFAULT_TENANT",
    "ApiKey",
    "Base",
    "Checkpoint",
    "Dataset",
    "EpochMetric",
    "Job",
    "JobAttempt",
    "JobCallback",
    "JobEvent",
    "JobStatus",
    "Study",
    "WebhookDelivery",
    "WorkerHeartbeat",
    "utcnow",
]
