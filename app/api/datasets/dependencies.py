"""Dependencies of the dataset routes: the upload slots that bound concurrent parsing."""

import threading
from typing import Annotated

from fastapi import Depends, Request

from app.api.datasets.service import UploadSlots
from app.core.config import Settings

_creating = threading.Lock()


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


UploadSlotsDep = Annotated[UploadSlots, Depends(get_upload_slots)]
