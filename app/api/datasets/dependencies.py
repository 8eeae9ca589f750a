"""Lookups that can 404, done once here so no route repeats them."""

import uuid
from typing import Annotated

from fastapi import Depends

from app.api.auth import CallerDep
from app.api.datasets import service
from app.api.dependencies import SessionDep
from app.core.models import Dataset


def upload_from_path(dataset_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Dataset:
    return service.get_upload(session, dataset_id, caller)


UploadDep = Annotated[Dataset, Depends(upload_from_path)]
