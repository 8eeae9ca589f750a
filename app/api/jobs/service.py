"""Job operations behind the HTTP API. Services flush; the request's session commits."""

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import func, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.core.config import Settings
from app.core.datasets import resolve_dataset
from app.core.errors import (
    CheckpointNotFound,
    IdempotencyKeyReused,
    InvalidInput,
    JobNotCancellable,
    JobNotFound,
    TooManyQueuedJobs,
)
from app.core.models import Checkpoint, EpochMetric, Job, JobStatus, utcnow
from app.core.spec import JobSpec, SpecError, check_fits_dataset, count_parameters


def spec_sha256(spec: JobSpec) -> str:
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_limits(session: Session, spec: JobSpec, settings: Settings) -> None:
    """What pydantic cannot judge alone: the dataset's shape and the operator's limits."""
    info = resolve_dataset(session, spec.dataset.name)
    try:
        check_fits_dataset(spec, info)
    except SpecError as exc:
        raise InvalidInput(exc.field, exc.message) from exc
    if spec.epochs > settings.max_epochs:
        raise InvalidInput("epochs", f"at most {settings.max_epochs} epochs (TRAINSVC_MAX_EPOCHS)")
    widths = spec.model.hidden_sizes
    if len(widths) > settings.max_layers:
        raise InvalidInput(
            "model.hidden_sizes", f"at most {settings.max_layers} layers (TRAINSVC_MAX_LAYERS)"
        )
    if max(widths) > settings.max_layer_width:
        raise InvalidInput(
            "model.hidden_sizes",
            f"each width at most {settings.max_layer_width} (TRAINSVC_MAX_LAYER_WIDTH)",
        )
    parameters = count_parameters(spec, info)
    if parameters > settings.max_parameters:
        raise InvalidInput(
            "model",
            f"{parameters} parameters; at most {settings.max_parameters} (TRAINSVC_MAX_PARAMETERS)",
        )
    if spec.max_wall_seconds is not None and spec.max_wall_seconds > settings.max_wall_seconds:
        raise InvalidInput(
            "max_wall_seconds",
            f"at most {settings.max_wall_seconds} seconds (TRAINSVC_MAX_WALL_SECONDS)",
        )
    if spec.dataset.train_subset is not None and spec.dataset.train_subset > info.n_samples:
        raise InvalidInput(
            "dataset.train_subset",
            f"{spec.dataset.name!r} has {info.n_samples} samples, fewer than train_subset",
        )


def _find_by_key(session: Session, key: str, digest: str) -> Job:
    job = session.scalars(select(Job).where(Job.idempotency_key == key)).one()
    if job.spec_sha256 != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for a different spec (job {job.id})"
        )
    return job


def submit_job(
    session: Session, spec: JobSpec, settings: Settings, idempotency_key: str | None
) -> tuple[Job, bool]:
    """Store a queued job: (job, created). A repeated Idempotency-Key returns the original."""
    digest = spec_sha256(spec)
    if idempotency_key is not None:
        existing = session.scalars(
            select(Job).where(Job.idempotency_key == idempotency_key)
        ).first()
        if existing is not None:
            return _find_by_key(session, idempotency_key, digest), False
    check_limits(session, spec, settings)
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
    )
    if (queued or 0) >= settings.max_queued_jobs:
        raise TooManyQueuedJobs(
            f"{queued} jobs are queued; the limit is {settings.max_queued_jobs}"
        )
    job = Job(
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_sha256=digest,
        idempotency_key=idempotency_key,
        epochs=spec.epochs,
        status=JobStatus.QUEUED,
        attempts=0,
        progress_epoch=0,
        cancel_requested=False,
        handback_requested=False,
    )
    if idempotency_key is None:
        session.add(job)
        session.flush()
        return job, True
    # Two concurrent submits with one key: the unique index lets exactly one insert win.
    try:
        with session.begin_nested():
            session.add(job)
        return job, True
    except IntegrityError:
        return _find_by_key(session, idempotency_key, digest), False


def get_job(session: Session, job_id: uuid.UUID) -> Job:
    job = session.get(Job, job_id, options=[selectinload(Job.attempt_history)])
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


def encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_id = raw.split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor", "not a cursor this service issued") from exc


def list_jobs(
    session: Session, status: str | None, limit: int, cursor: str | None
) -> tuple[Sequence[Job], str | None]:
    """Newest first, keyset-paginated on (created_at, id): stable under concurrent inserts."""
    query = select(Job).options(selectinload(Job.attempt_history))
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        created_at, job_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = session.scalars(query).all()
    if len(jobs) > limit:
        return jobs[:limit], encode_cursor(jobs[limit - 1])
    return jobs, None


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is flagged and stops within a batch."""
    if job.status in ("succeeded", "failed"):
        raise JobNotCancellable(f"job {job.id} already ended {job.status}")
    now = utcnow()
    # Conditional updates, so a worker's concurrent claim or finish is never overwritten.
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "queued")
        .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now)
    )
    session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status == "running")
        .values(cancel_requested=True, updated_at=now)
    )
    session.refresh(job)
    return job


def list_metrics(session: Session, job: Job, since_epoch: int | None) -> Sequence[EpochMetric]:
    query = select(EpochMetric).where(EpochMetric.job_id == job.id)
    if since_epoch is not None:
        query = query.where(EpochMetric.epoch > since_epoch)
    return session.scalars(query.order_by(EpochMetric.epoch)).all()


def list_checkpoints(session: Session, job: Job) -> Sequence[Checkpoint]:
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    return session.scalars(query.order_by(Checkpoint.epoch, Checkpoint.kind)).all()


# What one query of a download reads: large enough to be few queries, small enough that a
# download of a 240 MB checkpoint never holds more than this in the API process.
DOWNLOAD_CHUNK_BYTES = 1 << 20


class CheckpointChanged(Exception):
    """The checkpoint was rewritten while it was being streamed: the download must not go on."""


def find_checkpoint(session: Session, job: Job, checkpoint_id: uuid.UUID) -> Checkpoint:
    """The checkpoint's row without its blobs (they stay deferred)."""
    query = select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id)
    checkpoint = session.scalars(query).first()
    if checkpoint is None:
        raise CheckpointNotFound(f"job {job.id} has no checkpoint {checkpoint_id}")
    return checkpoint


def stream_weights(
    factory: sessionmaker[Session],
    checkpoint: Checkpoint,
    chunk_bytes: int = DOWNLOAD_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The weights in chunks, each read by its own short query (substr of the blob).

    Each query also names the sha256 the download announced: a checkpoint rewritten meanwhile
    ends the stream early (the client sees fewer bytes than Content-Length), never a mix.
    """
    # Read now, not as the stream goes: the row object may be refreshed or expired meanwhile.
    return _chunks(factory, checkpoint.id, checkpoint.sha256, checkpoint.size_bytes, chunk_bytes)


def _chunks(
    factory: sessionmaker[Session],
    checkpoint_id: uuid.UUID,
    sha256: str,
    size_bytes: int,
    chunk_bytes: int,
) -> Iterator[bytes]:
    for offset in range(0, size_bytes, chunk_bytes):
        with factory() as session:
            chunk = session.scalar(
                select(func.substr(Checkpoint.weights, offset + 1, chunk_bytes)).where(
                    Checkpoint.id == checkpoint_id, Checkpoint.sha256 == sha256
                )
            )
        if chunk is None:
            raise CheckpointChanged(f"checkpoint {checkpoint_id} changed during the download")
        yield bytes(chunk)
