"""SQLAlchemy tables. Importing this package registers every table on Base.metadata."""

from app.core.models.base import Base, utcnow
from app.core.models.datasets import Dataset
from app.core.models.jobs import (
    CHECKPOINT_KINDS,
    Checkpoint,
    EpochMetric,
    Job,
    JobAttempt,
    JobStatus,
)

__all__ = [
    "CHECKPOINT_KINDS",
    "Base",
    "Checkpoint",
    "Dataset",
    "EpochMetric",
    "Job",
    "JobAttempt",
    "JobStatus",
    "utcnow",
]
