"""HTTP routes for datasets: list the built-in ones and the caller's uploads, take, read and
delete uploads."""

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Response, UploadFile, status

from app.api.auth import AUTH_RESPONSES, CallerDep, TenantFilter, get_caller
from app.api.datasets import service
from app.api.datasets.dependencies import UploadDep, UploadSlotsDep
from app.api.datasets.schemas import DatasetList, DatasetRead
from app.api.datasets.service import UploadForm, create_upload
from app.api.dependencies import (
    SessionDep,
    SettingsDep,
    check_form_fields,
    check_query_parameters,
)
from app.core.catalog import BUILTIN_DATASETS, DataKind
from app.core.datasets import info_from_row

# Every route needs a caller; a route cannot opt out (tests/api/test_tenants.py checks).
router = APIRouter(
    prefix="/v1/datasets",
    tags=["datasets"],
    dependencies=[Depends(get_caller), Depends(check_query_parameters)],
    responses=AUTH_RESPONSES,
)


@router.get("", response_model=DatasetList)
def list_datasets(
    session: SessionDep,
    caller: CallerDep,
    tenant: TenantFilter = None,
) -> DatasetList:
    """Built-in datasets and the caller's uploads, with their shapes and classes."""
    items = [DatasetRead.from_info(info) for info in BUILTIN_DATASETS.values()]
    for row in service.list_uploads(session, caller, tenant):
        items.append(DatasetRead.from_info(info_from_row(row), row))
    return DatasetList(items=items)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=DatasetRead,
    responses={413: {"description": "Over the upload size or the tenant's storage quota"}},
    dependencies=[Depends(check_form_fields)],
)
def upload_dataset(
    session: SessionDep,
    settings: SettingsDep,
    slots: UploadSlotsDep,
    caller: CallerDep,
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
        row = create_upload(session, form, settings, caller)
    return DatasetRead.from_info(info_from_row(row), row)


@router.get("/{dataset_id}", response_model=DatasetRead)
def get_dataset(row: UploadDep) -> DatasetRead:
    """An uploaded dataset: its shape, classes and owner."""
    return DatasetRead.from_info(info_from_row(row), row)


@router.delete(
    "/{dataset_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses={409: {"description": "A queued or running job uses it (dataset_in_use)"}},
)
def delete_dataset(row: UploadDep, session: SessionDep) -> Response:
    """Delete an upload; 409 while a queued or running job trains on it."""
    service.delete_upload(session, row)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
