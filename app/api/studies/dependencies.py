"""Lookups that can 404, done once here so no route repeats them."""

import uuid
from typing import Annotated

from fastapi import Depends

from app.api.dependencies import SessionDep
from app.api.studies import service
from app.core.models import Study


def study_from_path(study_id: uuid.UUID, session: SessionDep) -> Study:
    return service.get_study(session, study_id)


StudyDep = Annotated[Study, Depends(study_from_path)]
