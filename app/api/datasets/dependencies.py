"""Dependencies of the dataset routes: lookups that can 404 (done once here, so no route
repeats them), and the upload slots that bound concurrent parsing."""

import threading
import uuid
from typing import Annotated

from fastapi import Depends, Request

from app.api.auth import CallerDep
from app.api.datasets import service
from app.api.datasets.service import UploadSlots
from app.api.dependencies import SessionDep
from app.core.config import Settings
from app.core.models import Dataset

_creating = threading.Lock()


def upload_from_path(dataset_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Dataset:
    return service.get_upload(session, dataset_id, caller)


def get_upload_slots(request: Request) -> UploadSlots:
    """The application's one UploadSlots, made on first use from its settings."""
    state = request.app.state
    with _creating:
        slots: UploadSlots | None = getattr(state, "upload_slots", None)
        if slots is None:
            settings: Settings = state.settings
            slots = UploadSlots(settings.upload_concurrency, settings.upload_wait_seconds)
            state.upload_slots = slots
    return slots


UploadDep = Annotated[Dataset, Depends(upload_from_path)]
UploadSlotsDep = Annotated[UploadSlots, Depends(get_upload_slots)]
