"""Dataset uploads: the validation of an uploaded file, and storing it in canonical form.

An upload is checked completely here, before anything is stored: a file the worker could not
train on is a 422 naming the part at fault (the file, its x or y, a form field), never a
failed job later and never a 500.
"""

import csv
import hashlib
import io
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.core.catalog import UPLOAD_PREFIX, DataKind
from app.core.config import Settings
from app.core.errors import DatasetInUse, DatasetNotFound, InvalidInput, QuotaExceeded
from app.core.models import Dataset, Job
from app.core.tenancy import Caller, scoped, storage_bytes

# Fewer samples than this cannot be split into a training and a validation set worth the name.
MIN_UPLOAD_SAMPLES = 10


@dataclass(frozen=True)
class UploadForm:
    """What came with the file: its name, and the form fields that say how to read it."""

    filename: str
    content: bytes
    kind: DataKind | None  # None: tabular for [n, F], image for [n, H, W]
    label_column: str  # CSV only
    name: str | None  # a description; the file's name if not given


def create_upload(
    session: Session, form: UploadForm, settings: Settings, caller: Caller
) -> Dataset:
    """Validate an uploaded .npz or CSV, store it as the caller's and return its row."""
    source_format = _source_format(form.filename, form.content)
    if source_format == "npz":
        x, raw_labels = _read_npz(form.content, settings.max_upload_unpacked_bytes)
    else:
        x, raw_labels = _read_csv(form.content, form.label_column)
    y, class_names = _labels(raw_labels, settings.max_upload_classes)
    if len(y) != len(x):
        raise InvalidInput("file.y", f"y has {len(y)} labels for {len(x)} samples in x")
    kind = _kind(x, form.kind)
    _check_limits(x, settings)
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    # After the cast: a float64 beyond float32's range becomes inf here and must fail too.
    if not np.isfinite(x).all():
        raise InvalidInput("file.x", "x contains NaN or infinite values")

    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x, y=y)
    data = buffer.getvalue()
    _check_quota(session, caller.tenant, len(data), settings)
    row = Dataset(
        tenant=caller.tenant,
        name=(form.name or form.filename or "upload")[:200],
        source_format=source_format,
        kind=kind,
        n_samples=len(x),
        input_shape=list(x.shape[1:]),
        num_classes=int(y.max()) + 1,
        class_names=class_names,
        data=data,
        size_bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    session.add(row)
    session.flush()
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
    in_use = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(
            Job.status.in_(("queued", "running")),
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


def _source_format(filename: str, content: bytes) -> str:
    suffix = PurePath(filename).suffix.lower()
    if suffix in (".npz", ".csv"):
        return suffix[1:]
    # No telling suffix: an .npz is a zip archive, anything else is read as CSV text.
    return "npz" if content.startswith(b"PK") else "csv"


def _read_npz(content: bytes, max_unpacked_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        # allow_pickle=False: an object array in an upload is refused, never unpickled.
        with np.load(io.BytesIO(content), allow_pickle=False) as archive:
            missing = {"x", "y"} - set(archive.files)
            if missing:
                raise InvalidInput(
                    "file", f"the .npz has no array named {' or '.join(sorted(missing))}"
                )
            # An .npz is a zip: a few compressed megabytes can unpack to gigabytes. Judge each
            # member by its declared size before reading; zipfile never reads past that size.
            for member in ("x", "y"):
                unpacked = archive.zip.getinfo(f"{member}.npy").file_size
                if unpacked > max_unpacked_bytes:
                    raise InvalidInput(
                        f"file.{member}",
                        f"{member} unpacks to {unpacked} bytes, over the limit of "
                        f"{max_unpacked_bytes} (TRAINSVC_MAX_UPLOAD_UNPACKED_BYTES)",
                    )
            x, y = archive["x"], archive["y"]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        # ValueError is also what numpy raises for a pickled (object) array.
        raise InvalidInput("file", f"not a readable .npz without pickled objects: {exc}") from exc
    if x.dtype.kind not in "biuf":
        raise InvalidInput("file.x", f"x must be numeric, not {x.dtype}")
    return x, y


def _read_csv(content: bytes, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput("file", "a CSV must be UTF-8 text") from exc
    rows = list(csv.reader(io.StringIO(text)))
    rows = [row for row in rows if any(cell.strip() for cell in row)]
    if not rows:
        raise InvalidInput("file", "the CSV is empty")
    header = [cell.strip() for cell in rows[0]]
    if label_column not in header:
        raise InvalidInput(
            "label_column", f"the CSV header has no column {label_column!r}: {header[:20]}"
        )
    label_index = header.index(label_column)
    features = np.empty((len(rows) - 1, len(header) - 1), dtype=np.float64)
    labels: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise InvalidInput(
                "file", f"line {line} has {len(row)} fields; the header has {len(header)}"
            )
        labels.append(row[label_index].strip())
        cells = row[:label_index] + row[label_index + 1 :]
        try:
            features[line - 2] = [float(cell) for cell in cells]
        except ValueError as exc:
            raise InvalidInput("file", f"line {line}: every feature must be a number") from exc
    return features, np.array(labels)


def _labels(raw: np.ndarray, max_classes: int) -> tuple[np.ndarray, list[str] | None]:
    """Class indices 0..C-1, and the class names when the labels were strings."""
    if raw.ndim != 1:
        raise InvalidInput("file.y", f"y must be one label per sample, not of shape {raw.shape}")
    class_names = None
    if raw.dtype.kind in "US":
        as_text = np.char.strip(raw.astype(str))
        if all(label.lstrip("-").isdigit() for label in as_text):
            # A CSV's "0", "1", ... are class indices; Python ints cannot overflow on the way.
            raw = np.array([int(label) for label in as_text], dtype=object)
        else:
            if (as_text == "").any():
                raise InvalidInput("file.y", "a label is empty")
            names, raw = np.unique(as_text, return_inverse=True)
            class_names = [str(name) for name in names]
    elif raw.dtype.kind == "b":
        raw = raw.astype(np.int64)
    elif raw.dtype.kind not in "iu":
        raise InvalidInput(
            "file.y", f"labels must be integers 0..C-1 or strings, not {raw.dtype} values"
        )
    if len(raw) == 0:
        raise InvalidInput("file.y", "y is empty")
    low, high = int(raw.min()), int(raw.max())
    if low < 0:
        raise InvalidInput("file.y", f"labels must be 0..C-1; found {low}")
    if high + 1 > max_classes:
        raise InvalidInput(
            "file.y", f"label {high} makes {high + 1} classes, over the limit of {max_classes}"
        )
    y = raw.astype(np.int64)
    if len(np.unique(y)) < 2:
        raise InvalidInput("file.y", "a classification dataset needs at least two classes")
    return y, class_names


def _kind(x: np.ndarray, requested: DataKind | None) -> DataKind:
    per_sample = x.ndim - 1
    if per_sample not in (1, 2):
        raise InvalidInput(
            "file.x",
            f"x must be [samples, features] or [samples, height, width], not {list(x.shape)}",
        )
    kind: DataKind = requested or ("tabular" if per_sample == 1 else "image")
    if (kind == "image") != (per_sample == 2):
        wanted = "[samples, height, width]" if kind == "image" else "[samples, length]"
        raise InvalidInput("kind", f"kind {kind!r} needs x of shape {wanted}, not {list(x.shape)}")
    return kind


def _check_limits(x: np.ndarray, settings: Settings) -> None:
    if len(x) < MIN_UPLOAD_SAMPLES:
        raise InvalidInput("file.x", f"at least {MIN_UPLOAD_SAMPLES} samples are needed")
    if len(x) > settings.max_upload_samples:
        raise InvalidInput(
            "file.x", f"{len(x)} samples is over the limit of {settings.max_upload_samples}"
        )
    features = int(np.prod(x.shape[1:]))
    if features == 0:
        raise InvalidInput("file.x", f"x has no features: shape {list(x.shape)}")
    if features > settings.max_upload_features:
        raise InvalidInput(
            "file.x",
            f"{features} features per sample is over the limit of {settings.max_upload_features}",
        )
