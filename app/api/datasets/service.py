"""Dataset uploads: the validation of an uploaded file, and storing it in canonical form.

An upload is checked completely here, before anything is stored: a file the worker could not
train on is a 422 naming the part at fault (the file, its x or y, a form field), never a
failed job later and never a 500.

Memory: the upload arrives streamed into a spooled temporary file (at most 1 MiB of it in
memory, the rest on disk; TRAINSVC_MAX_UPLOAD_BYTES is enforced as it streams in), and is
parsed from there (parsing.py) into its features as float32, which
TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES bounds. Storing adds a compressed copy and the database
driver's copy of it, so one upload holds at most about 3 x TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES,
and at most TRAINSVC_UPLOAD_CONCURRENCY uploads are parsed at once (UploadSlots): the API's
memory for uploads stays under TRAINSVC_UPLOAD_CONCURRENCY x 3 x that limit.
"""

import hashlib
import io
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import PurePath
from typing import IO

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.api.datasets import parsing
from app.core.catalog import UPLOAD_PREFIX, DataKind
from app.core.config import Settings
from app.core.errors import (
    DatasetInUse,
    DatasetNotFound,
    InvalidInput,
    LimitExceeded,
    QuotaExceeded,
)
from app.core.models import Dataset, Job
from app.core.models.jobs import ACTIVE_STATUSES
from app.core.spec import unstorable
from app.core.tenancy import Caller, scoped, storage_bytes


class UploadsBusy(LimitExceeded):
    """Every upload slot stayed taken for TRAINSVC_UPLOAD_WAIT_SECONDS: try again shortly."""

    code = "uploads_busy"
    retry_after_seconds = 5


class UploadSlots:
    """At most `concurrency` uploads parsed at once; a request waits up to `wait_seconds`
    for a slot, then is refused with a 429, so memory does not add up past the bound."""

    def __init__(self, concurrency: int, wait_seconds: float) -> None:
        self.concurrency = concurrency
        self.wait_seconds = wait_seconds
        self._semaphore = threading.BoundedSemaphore(concurrency)

    @contextmanager
    def slot(self) -> Iterator[None]:
        if not self._semaphore.acquire(timeout=self.wait_seconds):
            raise UploadsBusy(
                f"{self.concurrency} uploads are being parsed (TRAINSVC_UPLOAD_CONCURRENCY); "
                "retry shortly"
            )
        try:
            yield
        finally:
            self._semaphore.release()


@dataclass(frozen=True)
class UploadForm:
    """What came with the file: its name, and the form fields that say how to read it."""

    filename: str
    file: IO[bytes]  # seekable: the spooled temporary file the upload was streamed to
    kind: DataKind | None  # None: tabular for [n, F], image for [n, H, W]
    label_column: str  # CSV only
    name: str | None  # a label to recognise the dataset by; the file's name if not given


def create_upload(
    session: Session, form: UploadForm, settings: Settings, caller: Caller
) -> Dataset:
    """Validate an uploaded .npz or CSV, store it as the caller's and return its row."""
    if form.name is not None and (reason := unstorable(form.name)) is not None:
        raise InvalidInput("name", f"the name {reason}")
    limits = parsing.UploadLimits.from_settings(settings)
    source_format = _source_format(form.filename, form.file)
    labels: np.ndarray | list[str] | None
    raw_labels = None
    if source_format == "npz":
        x, raw_labels = parsing.read_npz(form.file, limits)
        labels = parsing.labels_as_text(raw_labels)
        if labels is None:
            labels = raw_labels
    else:
        x, labels = parsing.read_csv(form.file, form.label_column, limits)
    y, class_names = parsing.class_indices(labels, settings.max_upload_classes)
    parsing.check_enough_samples(x)
    kind = parsing.check_kind(x.ndim, form.kind)
    parsing.check_finite(x)

    n_samples, input_shape, num_classes = len(x), list(x.shape[1:]), int(y.max()) + 1
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x, y=y)
    del (
        x,
        y,
        labels,
        raw_labels,
    )  # the arrays go before the database driver copies the compressed bytes
    data = buffer.getvalue()
    del buffer
    _check_quota(session, caller.tenant, len(data), settings)
    name = form.name or form.filename.replace("\x00", "") or "upload"
    row = Dataset(
        tenant=caller.tenant,
        name=name[:200],
        source_format=source_format,
        kind=kind,
        n_samples=n_samples,
        input_shape=input_shape,
        num_classes=num_classes,
        class_names=class_names,
        data=data,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    del data
    session.add(row)
    session.flush()
    # Written: the session need not hold the bytes until the request's commit.
    session.expire(row, ["data"])
    return row


def list_uploads(session: Session, caller: Caller, tenant: str | None) -> Sequence[Dataset]:
    query = scoped(select(Dataset), Dataset, caller, tenant)
    return session.scalars(query.order_by(Dataset.created_at.desc(), Dataset.id.desc())).all()


def get_upload(session: Session, dataset_id: uuid.UUID, caller: Caller) -> Dataset:
    """The upload, if the caller may see it; another tenant's is not found, like an unknown id."""
    query = scoped(select(Dataset).where(Dataset.id == dataset_id), Dataset, caller)
    row = session.scalars(query).first()
    if row is None:
        raise DatasetNotFound(f"no uploaded dataset {dataset_id}")
    return row


def delete_upload(session: Session, row: Dataset) -> None:
    """Delete an upload no queued or running job needs; jobs that ended keep their results."""
    # Locked first, then counted: a submit that holds the row (resolve_dataset) is counted
    # once it commits, and one that comes after finds the upload gone.
    session.execute(select(Dataset.id).where(Dataset.id == row.id).with_for_update())
    in_use = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status.in_(ACTIVE_STATUSES),
            Job.spec["dataset"]["name"].as_string() == f"{UPLOAD_PREFIX}{row.id}",
        )
    )
    if in_use:
        raise DatasetInUse(
            f"{in_use} queued or running jobs train on {UPLOAD_PREFIX}{row.id}; "
            "cancel them or wait until they end"
        )
    session.execute(delete(Dataset).where(Dataset.id == row.id))
    session.expunge(row)


def _check_quota(session: Session, tenant: str, size: int, settings: Settings) -> None:
    stored = storage_bytes(session, tenant)
    if stored + size > settings.tenant_storage_bytes:
        raise QuotaExceeded(
            f"tenant {tenant!r} stores {stored} bytes of uploads and checkpoints; {size} more "
            f"would pass its quota of {settings.tenant_storage_bytes} bytes "
            "(TRAINSVC_TENANT_STORAGE_BYTES)"
        )


def _source_format(filename: str, file: IO[bytes]) -> str:
    suffix = PurePath(filename.replace("\x00", "")).suffix.lower()
    if suffix in (".npz", ".csv"):
        return suffix[1:]
    # No telling suffix: an .npz is a zip archive, anything else is read as CSV text.
    magic = file.read(2)
    file.seek(0)
    return "npz" if magic == b"PK" else "csv"
