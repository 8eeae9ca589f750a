"""Lookups that can 404, done once here so no route repeats them."""

import uuid
from typing import Annotated

from fastapi import Depends, Header, Request

from app.api.auth import CallerDep
from app.api.dependencies import SessionDep
from app.api.jobs import service
from app.core.errors import InvalidInput
from app.core.models import Job


def job_from_path(job_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Job:
    return service.get_job(session, job_id, caller)


JobDep = Annotated[Job, Depends(job_from_path)]


def idempotency_key_from_headers(
    request: Request,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=200,
            description="repeat a submit safely: the same key and body return the original job",
        ),
    ] = None,
) -> str | None:
    # Starlette hands the first of repeated headers to the parameter; two keys are ambiguous.
    count = len(request.headers.getlist("idempotency-key"))
    if count > 1:
        raise InvalidInput("idempotency-key", f"send one Idempotency-Key header, not {count}")
    return idempotency_key


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key_from_headers)]
