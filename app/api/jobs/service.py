"""Job operations behind the HTTP API. Services flush; the request's session commits."""

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Connection,
    RowMapping,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    func,
    select,
    text,
    tuple_,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker

from app.core import events, lifecycle, webhooks
from app.core.config import Settings
from app.core.datasets import resolve_dataset
from app.core.db import READ_ONLY
from app.core.errors import (
    CheckpointNotFound,
    IdempotencyKeyReused,
    InvalidInput,
    JobInStudy,
    JobNotEnded,
    JobNotFound,
    QuotaExceeded,
    TooManyActiveJobs,
    TooManyQueuedJobs,
)
from app.core.models import Checkpoint, EpochMetric, Job, JobAttempt, JobStatus, WebhookDelivery
from app.core.models.jobs import ACTIVE_STATUSES, ENDED_STATUSES
from app.core.spec import (
    EVALUATION_CHUNK_SAMPLES,
    JobSpec,
    SpecError,
    check_fits_dataset,
    count_parameters,
    memory_bytes,
    sample_count,
)
from app.core.tenancy import Caller, ScopedRead, scoped, storage_bytes


def spec_sha256(spec: JobSpec) -> str:
    # The dump leaves out callback.secret (write-only): a retry with the same key and spec but
    # another secret is the same submit, and keeps the first secret.
    canonical = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def check_callback(spec: JobSpec, settings: Settings) -> None:
    """A callback needs its secret (the stored spec has none, so the model cannot require
    it), and a URL to a host the operator allows: webhooks are a way out of the network."""
    if spec.callback is None:
        return
    if spec.callback.secret is None:
        raise InvalidInput("callback.secret", "a callback needs a secret (16 to 256 characters)")
    webhooks.check_url(spec.callback.url, webhooks.policy_from(settings))


def register_callback(session: Session, job: Job, spec: JobSpec) -> None:
    """Keep the callback, secret included, beside the job (never in its stored spec)."""
    if spec.callback is not None and spec.callback.secret is not None:
        secret = spec.callback.secret.get_secret_value()
        webhooks.register(session, job.id, spec.callback.url, secret)


def check_limits(session: Session, spec: JobSpec, settings: Settings, caller: Caller) -> None:
    """What pydantic cannot judge alone: the dataset's shape and the operator's limits."""
    check_callback(spec, settings)
    # Only the caller's own uploads: another tenant's is "no uploaded dataset", like a typo.
    info = resolve_dataset(session, spec.dataset.name, tenant=caller.tenant, hold=True)
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
    itemsize = 8 if settings.training_dtype == "float64" else 4
    needed = memory_bytes(spec, info, itemsize)
    if needed > settings.max_job_memory_bytes:
        raise InvalidInput(
            "model",
            f"training would take about {needed} bytes of memory (the parameters' state, and "
            "the activations of layers this wide for a batch, or for an evaluation chunk of "
            f"{EVALUATION_CHUNK_SAMPLES} samples); at most {settings.max_job_memory_bytes} "
            "(TRAINSVC_MAX_JOB_MEMORY_BYTES): use fewer or narrower layers, or a smaller "
            "batch_size",
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
    # The split exactly as worker/training/data.py prepare() makes it, so that a split the
    # worker cannot train on is a 422 here, not a failed job ("range() arg 3 must not be
    # zero"). A batch larger than the training set is fine: the trainer takes the minimum.
    dataset = spec.dataset
    n = sample_count(dataset, info)
    n_val = max(1, round(n * dataset.val_fraction))
    n_train = n - n_val
    if dataset.train_subset is not None and dataset.train_subset < n_train:
        if dataset.train_subset < 2:
            raise InvalidInput("dataset.train_subset", "train on at least 2 samples")
        n_train = dataset.train_subset
    if n_train < 2:
        raise InvalidInput(
            "dataset.val_fraction",
            f"val_fraction {dataset.val_fraction} of {n} samples leaves {n_val} for validation "
            f"and {n_train} for training; training needs at least 2",
        )
    noise_batch = spec.noise_micro_batch_size
    if noise_batch is not None and 2 * noise_batch > n_train:
        # The noise scale compares micro-batches of the training set: with fewer than two
        # it measures nothing, every epoch, and the job would look probed.
        raise InvalidInput(
            "diagnostics.gradient_noise.micro_batch_size",
            f"the gradient noise scale needs two micro-batches of {noise_batch} samples; "
            f"the training split has {n_train}: use a micro_batch_size of at most "
            f"{n_train // 2}",
        )


def check_queue_room(session: Session, settings: Settings, adding: int = 1) -> None:
    """Back-pressure: 429 if `adding` more queued jobs would pass the limit."""
    queued = session.scalar(
        select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
    )
    if (queued or 0) + adding > settings.max_queued_jobs:
        raise TooManyQueuedJobs(
            f"{queued} jobs are queued; the limit is {settings.max_queued_jobs}"
        )


def new_job(
    spec: JobSpec,
    *,
    tenant: str,
    idempotency_key: str | None = None,
    study_id: uuid.UUID | None = None,
    grid_point: dict[str, Any] | None = None,
) -> Job:
    """A queued job row for a validated spec (not yet added to a session)."""
    return Job(
        tenant=tenant,
        name=spec.name,
        spec=spec.model_dump(mode="json"),
        spec_sha256=spec_sha256(spec),
        idempotency_key=idempotency_key,
        epochs=spec.epochs,
        status=JobStatus.QUEUED,
        attempts=0,
        progress_epoch=0,
        cancel_requested=False,
        handback_requested=False,
        study_id=study_id,
        grid_point=grid_point,
    )


# The first key of the two-key advisory locks check_tenant_limits takes, one per tenant.
_TENANT_LIMITS_LOCK = 0x74736B  # "tsk"


def check_tenant_limits(session: Session, settings: Settings, tenant: str, adding: int = 1) -> None:
    """A tenant's share: its queued plus running jobs (`adding` more), and its stored bytes."""
    if session.get_bind().dialect.name == "postgresql":
        # Concurrent submits of one tenant each counted its jobs before any had inserted, and
        # together passed the limit (20 at once with a limit of 5: 20 stored). A lock per
        # tenant, held to the transaction's end, makes them take turns; SQLite's writing
        # transactions take turns already.
        session.execute(
            text("SELECT pg_advisory_xact_lock(:space, hashtext(:tenant))"),
            {"space": _TENANT_LIMITS_LOCK, "tenant": tenant},
        )
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant == tenant, Job.status.in_(ACTIVE_STATUSES))
    )
    if (active or 0) + adding > settings.tenant_max_active_jobs:
        raise TooManyActiveJobs(
            f"tenant {tenant!r} has {active} jobs queued or running; the limit is "
            f"{settings.tenant_max_active_jobs} (TRAINSVC_TENANT_MAX_ACTIVE_JOBS)"
        )
    stored = storage_bytes(session, tenant)
    if stored >= settings.tenant_storage_bytes:
        raise QuotaExceeded(
            f"tenant {tenant!r} stores {stored} bytes of uploads and checkpoints, at its quota "
            f"of {settings.tenant_storage_bytes} bytes (TRAINSVC_TENANT_STORAGE_BYTES); "
            "delete datasets or ended jobs first"
        )


def _by_key(tenant: str, key: str) -> Select[Job]:
    # Idempotency keys are the tenant's own namespace, also for an admin.
    return select(Job).where(Job.tenant == tenant, Job.idempotency_key == key)


def _find_by_key(session: Session, tenant: str, key: str, digest: str) -> Job:
    job = session.scalars(_by_key(tenant, key)).one()
    if job.spec_sha256 != digest:
        raise IdempotencyKeyReused(
            f"Idempotency-Key {key!r} was used for a different spec (job {job.id})"
        )
    return job


def submit_job(
    session: Session,
    spec: JobSpec,
    settings: Settings,
    idempotency_key: str | None,
    caller: Caller,
) -> tuple[Job, bool]:
    """Store a queued job of the caller's tenant: (job, created).

    A repeated Idempotency-Key returns the original.
    """
    digest = spec_sha256(spec)
    if idempotency_key is not None:
        existing = session.scalars(_by_key(caller.tenant, idempotency_key)).first()
        if existing is not None:
            return _find_by_key(session, caller.tenant, idempotency_key, digest), False
    check_limits(session, spec, settings, caller)
    check_tenant_limits(session, settings, caller.tenant)
    check_queue_room(session, settings)
    job = new_job(spec, tenant=caller.tenant, idempotency_key=idempotency_key)
    if idempotency_key is None:
        session.add(job)
        session.flush()
    else:
        # Two concurrent submits with one key: the unique index lets exactly one insert win.
        try:
            with session.begin_nested():
                session.add(job)
        except IntegrityError:
            return _find_by_key(session, caller.tenant, idempotency_key, digest), False
    register_callback(session, job, spec)
    events.record_submitted(session, [job])
    return job, True


def get_job(session: Session, job_id: uuid.UUID, caller: Caller) -> Job:
    """The job, if the caller may see it; another tenant's is not found, like an unknown id."""
    query = scoped(select(Job).where(Job.id == job_id), Job, caller)
    job = session.scalars(query.options(selectinload(Job.attempt_history))).first()
    if job is None:
        raise JobNotFound(f"no job {job_id}")
    return job


class _Keyset(Protocol):
    created_at: datetime
    id: uuid.UUID


def encode_cursor(row: _Keyset) -> str:
    """A keyset cursor on (created_at, id); also used for studies."""
    return encode_cursor_at(row.created_at, row.id)


def encode_cursor_at(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created_at, job_id = raw.split("|")
        return datetime.fromisoformat(created_at), uuid.UUID(job_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise InvalidInput("cursor", "not a cursor this service issued") from exc


# What a JobRead shows, read as plain rows (no ORM objects): status reads are what dashboards
# and services poll, so they are read with as little work per row as the database allows.
JOB_READ_COLUMNS = (
    Job.id,
    Job.tenant,
    Job.name,
    Job.status,
    Job.spec,
    Job.created_at,
    Job.updated_at,
    Job.started_at,
    Job.finished_at,
    Job.attempts,
    Job.cancel_requested,
    Job.progress_epoch,
    Job.epochs,
    Job.summary,
    Job.error_type,
    Job.error_message,
    Job.study_id,
    Job.grid_point,
    Job.pack,
)
ATTEMPT_READ_COLUMNS = (
    JobAttempt.job_id,
    JobAttempt.attempt,
    JobAttempt.worker_id,
    JobAttempt.started_at,
    JobAttempt.ended_at,
    JobAttempt.outcome,
)
ATTEMPT_FIELDS = ("attempt", "worker_id", "started_at", "ended_at", "outcome")
# The attempt's columns beside its job's in one row, named attempt_<field>.
ATTEMPT_COLUMNS_JOINED = tuple(
    getattr(JobAttempt, name).label(f"attempt_{name}") for name in ATTEMPT_FIELDS
)


# Built once: see ScopedRead (a new statement per poll cost more than the query).
_READ_JOB = ScopedRead.of(
    select(*JOB_READ_COLUMNS, *ATTEMPT_COLUMNS_JOINED)
    .outerjoin(JobAttempt, JobAttempt.job_id == Job.id)
    .where(Job.id == bindparam("job_id"))
    .order_by(JobAttempt.attempt),
    Job,
)
_READ_ATTEMPTS = (
    select(*ATTEMPT_READ_COLUMNS)
    .where(JobAttempt.job_id.in_(bindparam("job_ids", expanding=True)))
    .order_by(JobAttempt.job_id, JobAttempt.attempt)
)


def read_job(
    connection: Connection, job_id: uuid.UUID, caller: Caller
) -> tuple[RowMapping, list[dict[str, Any]]]:
    """The job's JobRead columns and its attempts, in one query, if the caller may see it
    (else JobNotFound, like get_job)."""
    query, parameters = _READ_JOB.for_caller(caller, job_id=job_id)
    rows = connection.execute(query, parameters).mappings().all()
    if not rows:
        raise JobNotFound(f"no job {job_id}")
    attempts = [
        {name: row[f"attempt_{name}"] for name in ATTEMPT_FIELDS}
        for row in rows
        if row["attempt_attempt"] is not None
    ]
    return rows[0], attempts


def read_attempts(
    connection: Connection, job_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[RowMapping]]:
    """The attempts of each job, in order: one query for a job or a page of them."""
    attempts: dict[uuid.UUID, list[RowMapping]] = {job_id: [] for job_id in job_ids}
    if job_ids:
        for row in connection.execute(_READ_ATTEMPTS, {"job_ids": list(job_ids)}).mappings():
            attempts[row["job_id"]].append(row)
    return attempts


def job_etag(job: Mapping[Any, Any]) -> str:
    """A strong ETag for the job's JobRead, from its row alone.

    Every change to what JobRead shows updates the job's row and its updated_at (each
    lifecycle UPDATE sets it, and attempts change only with their job's row), so the tag
    needs no encoding of the body: a poll that finds it unchanged is a 304 at once.
    """
    return _etag(
        "job",
        job["id"],
        job["updated_at"].isoformat(),
        job["status"],
        job["attempts"],
        job["progress_epoch"],
        job["cancel_requested"],
        job["finished_at"],
    )


def _etag(*parts: object) -> str:
    digest = hashlib.blake2b("|".join(map(str, parts)).encode(), digest_size=16).hexdigest()
    return f'"{digest}"'


def list_jobs(
    connection: Connection,
    caller: Caller,
    status: str | None,
    limit: int,
    cursor: str | None,
    tenant: str | None = None,
    study_id: uuid.UUID | None = None,
    tags: Sequence[tuple[str, str]] = (),
) -> tuple[Sequence[RowMapping], str | None]:
    """Newest first, keyset-paginated on (created_at, id): stable under concurrent inserts.

    Rows of JOB_READ_COLUMNS; read_attempts() gives their attempts. `tags` are (key, value)
    pairs the spec's tags must all hold.
    """
    query = scoped(select(*JOB_READ_COLUMNS), Job, caller, tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if study_id is not None:
        query = query.where(Job.study_id == study_id)
    for key, value in tags:
        query = query.where(Job.spec["tags"][key].as_string() == value)
    if cursor is not None:
        created_at, job_id = decode_cursor(cursor)
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(created_at, job_id))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = connection.execute(query).mappings().all()
    if len(jobs) > limit:
        last = jobs[limit - 1]
        return jobs[:limit], encode_cursor_at(last["created_at"], last["id"])
    return jobs, None


def request_cancel(session: Session, job: Job) -> Job:
    """A queued job is cancelled at once; a running one is flagged and stops within a batch."""
    lifecycle.request_cancel(session, job.id)
    session.refresh(job)  # what the request left in the row, not what was read before it
    return job


def delete_job(session: Session, job: Job) -> None:
    """Delete an ended job with its attempts, metrics and checkpoints (ON DELETE CASCADE)."""
    if job.study_id is not None:
        # One grid point gone would leave the study "complete" with a hole its report could
        # not show: a study's jobs go with their study.
        raise JobInStudy(
            f"job {job.id} is part of study {job.study_id}; delete the study "
            f"(DELETE /v1/studies/{job.study_id}) to delete its jobs"
        )
    # Conditional, so a job a worker is still running can never be deleted under it.
    deleted = session.scalars(
        delete(Job).where(Job.id == job.id, Job.status.in_(ENDED_STATUSES)).returning(Job.id)
    ).first()
    if deleted is None:
        raise JobNotEnded(f"job {job.id} is {job.status}; cancel it and wait until it ends")
    session.expunge(job)


def _metrics_etag_query(since: bool) -> ScopedRead[Any]:
    stored = [EpochMetric.job_id == Job.id]
    if since:
        stored.append(EpochMetric.epoch > bindparam("since_epoch"))
    aggregates: tuple[ColumnElement[Any], ...] = (
        func.count(EpochMetric.id),
        func.max(EpochMetric.epoch),
        func.max(EpochMetric.created_at),
        func.sum(EpochMetric.attempt),
    )
    return ScopedRead.of(
        select(*aggregates)
        .select_from(Job)
        .outerjoin(EpochMetric, and_(*stored))
        .where(Job.id == bindparam("job_id"))
        .group_by(Job.id),
        Job,
    )


# Built once, with and without since_epoch: see ScopedRead.
_METRICS_ETAG = {since: _metrics_etag_query(since) for since in (False, True)}


def metrics_etag(
    connection: Connection, job_id: uuid.UUID, caller: Caller, since_epoch: int | None
) -> str:
    """A strong ETag for the job's metrics (after since_epoch), from one aggregate query.

    JobNotFound if the caller may not see the job. A new epoch changes the count and the
    last epoch; a rerun epoch's overwrite (a resumed attempt) moves its created_at and raises
    its attempt, so it changes the latest created_at or the sum of attempts.
    """
    since = since_epoch is not None
    parameters: dict[str, Any] = {"job_id": job_id}
    if since:
        parameters["since_epoch"] = since_epoch
    query, parameters = _METRICS_ETAG[since].for_caller(caller, **parameters)
    row = connection.execute(query, parameters).first()
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    count, last_epoch, last_created_at, attempts = row
    stamp = last_created_at.isoformat() if last_created_at is not None else None
    return _etag("metrics", job_id, since_epoch, count, last_epoch, stamp, attempts)


# An epoch as EpochRead shows it: its scalar columns, then the diagnostics as stored JSON text.
EPOCH_READ_COLUMNS = (
    EpochMetric.epoch,
    EpochMetric.attempt,
    EpochMetric.train_loss,
    EpochMetric.train_accuracy,
    EpochMetric.val_loss,
    EpochMetric.val_accuracy,
    EpochMetric.lr,
    EpochMetric.epoch_seconds,
    cast(EpochMetric.diagnostics, Text).label("diagnostics"),
)
_LIST_METRICS = (
    select(*EPOCH_READ_COLUMNS)
    .where(EpochMetric.job_id == bindparam("job_id"), EpochMetric.epoch > bindparam("after"))
    .order_by(EpochMetric.epoch)
)


def list_metrics(
    connection: Connection, job_id: uuid.UUID, since_epoch: int | None
) -> Sequence[Sequence[Any]]:
    """The job's epochs, ascending, as rows of EPOCH_READ_COLUMNS: the diagnostics come as the
    stored JSON text, for the response to carry as they are (parsing and encoding them again
    was most of the cost of a metrics read).
    """
    after = since_epoch if since_epoch is not None else -1  # every epoch: none is negative
    return connection.execute(_LIST_METRICS, {"job_id": job_id, "after": after}).all()


def list_deliveries(session: Session, job: Job) -> Sequence[WebhookDelivery]:
    return webhooks.list_deliveries(session, job.id)


def list_checkpoints(session: Session, job: Job) -> Sequence[Checkpoint]:
    """`last` first (what a resume or a download usually wants), then `best`."""
    query = select(Checkpoint).where(Checkpoint.job_id == job.id)
    last_first = case((Checkpoint.kind == "last", 0), else_=1)
    return session.scalars(query.order_by(last_first, Checkpoint.kind)).all()


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
        with factory(execution_options=READ_ONLY) as session:
            chunk = session.scalar(
                select(func.substr(Checkpoint.weights, offset + 1, chunk_bytes)).where(
                    Checkpoint.id == checkpoint_id, Checkpoint.sha256 == sha256
                )
            )
        if chunk is None:
            raise CheckpointChanged(f"checkpoint {checkpoint_id} changed during the download")
        yield bytes(chunk)
