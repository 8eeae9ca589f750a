"""Test data: job specs and rows, with overrides for what a test cares about."""

import copy
import hashlib
import json
import uuid
from typing import Any

from sqlalchemy.orm import Session

from app.api.jobs.service import spec_sha256
from app.core.models import Checkpoint, EpochMetric, Job
from app.core.spec import JobSpec

BASE_SPEC: dict[str, Any] = {
    "name": "bn-digits",
    "dataset": {"name": "digits", "val_fraction": 0.2, "batch_size": 64},
    "model": {
        "architecture": "mlp",
        "hidden_sizes": [32, 16],
        "activation": "relu",
        "normalization": {"type": "batch_norm", "position": "before_activation"},
        "dropout": {"rate": 0.2},
    },
    "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.0},
    "epochs": 3,
    "seed": 0,
    "tags": {"team": "vision"},
}


# One epoch's metrics as the trainer reports them, for tests that store epochs by hand.
METRICS = {
    "train_loss": 1.0,
    "train_accuracy": 0.5,
    "val_loss": 1.1,
    "val_accuracy": 0.4,
    "lr": 0.1,
    "epoch_seconds": 0.1,
}


def spec_payload(**overrides: Any) -> dict[str, Any]:
    """BASE_SPEC with top-level keys replaced; nested dicts are replaced whole."""
    payload = copy.deepcopy(BASE_SPEC)
    payload.update(overrides)
    return payload


def make_job(session: Session, status: str = "queued", **spec_overrides: Any) -> Job:
    spec = JobSpec.model_validate(spec_payload(**spec_overrides))
    job = Job(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_sha256=spec_sha256(spec),
        epochs=spec.epochs,
        status=status,
        attempts=0,
        progress_epoch=0,
        cancel_requested=False,
        handback_requested=False,
    )
    session.add(job)
    session.flush()
    return job


def make_checkpoint(job_id: uuid.UUID, weights: bytes, **overrides: Any) -> Checkpoint:
    """The `last` checkpoint of epoch 1, attempt 1, holding `weights` (any bytes), with the
    given fields replaced."""
    values: dict[str, Any] = {"epoch": 1, "kind": "last", "attempt": 1, **overrides}
    return Checkpoint(
        job_id=job_id,
        weights=weights,
        size_bytes=len(weights),
        sha256=hashlib.sha256(weights).hexdigest(),
        **values,
    )


def make_epoch(job_id: uuid.UUID, epoch: int = 1, **overrides: Any) -> EpochMetric:
    """A stored epoch of METRICS (attempt 1, no diagnostics) with the given fields replaced."""
    values: dict[str, Any] = {"attempt": 1, "diagnostics": {}, **METRICS, **overrides}
    return EpochMetric(job_id=job_id, epoch=epoch, **values)


def with_lone_surrogate(payload: dict[str, Any]) -> bytes:
    """The payload as JSON text with each "@" written as the escape \\ud800: a lone surrogate,
    valid JSON, parsed to a str that no UTF-8 encoder can write."""
    return json.dumps(payload).replace("@", "\\ud800").encode("ascii")
