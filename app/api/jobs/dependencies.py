"""Lookups that can 404, done once here so no route repeats them."""

import uuid
from typing import Annotated

from fastapi import Depends

from app.api.auth import CallerDep
from app.api.dependencies import SessionDep
from app.api.jobs import service
from app.core.models import Job


def job_from_path(job_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Job:
    return service.get_job(session, job_id, caller)


JobDep = Annotated[Job, Depends(job_from_path)]
