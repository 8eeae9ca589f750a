"""HTTP routes for datasets: list the built-in ones and those uploaded, and take uploads."""

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile, status
from sqlalchemy import select

from app.api.datasets.dependencies import UploadSlotsDep
from app.api.datasets.schemas import DatasetList, DatasetRead
from app.api.datasets.service import UploadForm, create_upload
from app.api.dependencies import SessionDep, SettingsDep
from app.core.catalog import BUILTIN_DATASETS, DataKind
from app.core.datasets import info_from_row
from app.core.models import Dataset

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])


@router.get("", response_model=DatasetList)
def list_datasets(session: SessionDep) -> DatasetList:
    """Built-in and uploaded datasets, with their shapes and classes."""
    items = [DatasetRead.from_info(info) for info in BUILTIN_DATASETS.values()]
    for row in session.scalars(select(Dataset).order_by(Dataset.created_at.desc())):
        items.append(DatasetRead.from_info(info_from_row(row), row))
    return DatasetList(items=items)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=DatasetRead)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    slots: UploadSlotsDep,
    file: Annotated[UploadFile, File(description=".npz with arrays x and y, or CSV")],
    kind: Annotated[
        DataKind | None,
        Form(description="tabular or sequence for [n, L] data; default tabular ([n, H, W]: image)"),
    ] = None,
    label_column: Annotated[str, Form(max_length=200, description="CSV only")] = "label",
    name: Annotated[
        str | None,
        Form(
            max_length=200,
            description="a label to recognise the dataset by (display_name); specs name an "
            "upload by the name this returns, upload:<id>, never by this label",
        ),
    ] = None,
) -> DatasetRead:
    """Upload a dataset; a spec then names it as {"name": "upload:<id>"}."""
    # The file was streamed to a spooled temporary file; it is parsed from there, never read
    # into memory whole, and only a few uploads at a time.
    form = UploadForm(file.filename or "", file.file, kind, label_column, name)
    with slots.slot():
        row = create_upload(session, form, settings)
    return DatasetRead.from_info(info_from_row(row), row)
