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
        description=row.name,
    )


def resolve_dataset(session: Session, name: str, tenant: str | None = None) -> DatasetInfo:
    """The shape of the dataset a spec names; an unknown upload is a 422 on dataset.name.

    With `tenant` (the API), only that tenant's uploads count; without (the worker, running a
    job whose spec was checked at submit), any upload.
    """
    if name in BUILTIN_DATASETS:
        return BUILTIN_DATASETS[name]
    row = session.get(Dataset, uuid.UUID(name.removeprefix(UPLOAD_PREFIX)))
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
