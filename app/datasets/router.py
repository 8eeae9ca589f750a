"""HTTP routes for datasets: list the built-in ones and those uploaded."""

from fastapi import APIRouter
from sqlalchemy import select

from app.datasets.catalog import BUILTIN_DATASETS
from app.datasets.schemas import DatasetList, DatasetRead
from app.datasets.service import info_from_row
from app.dependencies import SessionDep
from app.models import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep) -> DatasetList:
    """Built-in and uploaded datasets, with their shapes and classes."""
    items = [
        DatasetRead(
            name=info.name,
            source="builtin",
            kind=info.kind,
            input_shape=list(info.input_shape),
            num_classes=info.num_classes,
            n_samples=info.n_samples,
            synthetic=info.synthetic,
            description=info.description,
        )
        for info in BUILTIN_DATASETS.values()
    ]
    for row in session.scalars(select(Dataset).order_by(Dataset.created_at.desc())):
        info = info_from_row(row)
        items.append(
            DatasetRead(
                name=info.name,
                source="upload",
                kind=info.kind,
                input_shape=list(info.input_shape),
                num_classes=info.num_classes,
                n_samples=info.n_samples,
                synthetic=False,
                description=info.description,
                created_at=row.created_at,
            )
        )
    return DatasetList(items=items)
