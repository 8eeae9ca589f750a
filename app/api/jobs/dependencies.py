"""Lookups that can 404, done once here so no route repeats them."""

import uuid
from typing import Annotated, Any

from fastapi import Depends, Header, Response

from app.api.auth import CallerDep
from app.api.dependencies import SessionDep
from app.api.jobs import service
from app.core.models import Job


def job_from_path(job_id: uuid.UUID, session: SessionDep, caller: CallerDep) -> Job:
    return service.get_job(session, job_id, caller)


JobDep = Annotated[Job, Depends(job_from_path)]


async def if_none_match_from_headers(
    if_none_match: Annotated[
        str | None,
        Header(
            max_length=2000,
            description="the ETag of a previous response: 304 without a body if it still holds",
        ),
    ] = None,
) -> str | None:
    # async: a header needs no worker thread (a plain def would hop to one on every poll).
    return if_none_match


IfNoneMatchDep = Annotated[str | None, Depends(if_none_match_from_headers)]
ETAG_HEADER = {
    "ETag": {
        "description": "This representation's version: send it back as If-None-Match",
        "schema": {"type": "string"},
    }
}
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {
        "description": "Not modified: If-None-Match names the current ETag (no body)",
        "headers": ETAG_HEADER,
    }
}


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """If-None-Match's weak comparison (RFC 9110 13.1.2): a listed tag, W/ or not, or *."""
    if if_none_match is None:
        return False
    for candidate in if_none_match.split(","):
        tag = candidate.strip()
        if tag == "*" or tag.removeprefix("W/") == etag:
            return True
    return False


def not_modified(etag: str) -> Response:
    return Response(status_code=304, headers={"ETag": etag})
