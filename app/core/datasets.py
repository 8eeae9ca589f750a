"""Datasets as both processes see them: what a spec's dataset name refers to, and an upload's
stored arrays (read back without pickle)."""

import io
import uuid

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session, undefer

from app.core.catalog import BUILTIN_DATASETS, UPLOAD_PREFIX, DataKind, DatasetInfo
from app.core.errors import DatasetNotFound, InvalidInput
from app.core.models import Dataset


def info_from_row(row: Dataset) -> DatasetInfo:
    kind: DataKind = row.kind  # type: ignore[assignment]  # written only by create_upload
    return DatasetInfo(
        name=f"{UPLOAD_PREFIX}{row.id}",
        kind=kind,
        input_shape=tuple(row.input_shape),
        num_classes=row.num_classes,
        n_samples=row.n_samples,
        # row.name is the upload's display name (the API shows it as display_name).
        description=f"uploaded .{row.source_format} file",
    )


def resolve_dataset(
    session: Session, name: str, tenant: str | None = None, *, hold: bool = False
) -> DatasetInfo:
    """The shape of the dataset a spec names; an unknown upload is a 422 on dataset.name.

    With `tenant` (the API), only that tenant's uploads count; without (the worker, running a
    job whose spec was checked at submit), any upload. With `hold` (a job being submitted), an
    upload's row stays share-locked until the session's transaction ends: delete_upload locks
    it for update before it counts the jobs that need it, so a submit and a delete of the same
    upload take turns, and no job is stored on an upload deleted under it (on PostgreSQL; on
    SQLite every writing transaction takes turns anyway).
    """
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name]
    try:
        dataset_id = uuid.UUID(name.removeprefix(UPLOAD_PREFIX))
    except ValueError:
        # The spec's pattern admits only UUIDs; a name from elsewhere must not be a 500 either.
        raise InvalidInput("dataset.name", f"no uploaded dataset {name!r}") from None
    row = session.get(Dataset, dataset_id, with_for_update={"read": True} if hold else None)
    if row is None or (tenant is not None and row.tenant != tenant):
        raise InvalidInput("dataset.name", f"no uploaded dataset {name!r}")
    return info_from_row(row)


def load_upload_arrays(session: Session, dataset_id: uuid.UUID) -> tuple[np.ndarray, np.ndarray]:
    """An uploaded dataset's arrays; stored as .npz and read back without pickle."""
    row = session.scalars(
        select(Dataset).where(Dataset.id == dataset_id).options(undefer(Dataset.data))
    ).first()
    if row is None:
        raise DatasetNotFound(f"no uploaded dataset {dataset_id}")
    with np.load(io.BytesIO(row.data), allow_pickle=False) as archive:
        return archive["x"], archive["y"]
