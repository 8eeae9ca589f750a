"""HTTP routes for jobs: thin, each parses, calls the service and returns a schema."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints
from sqlalchemy import Connection

from app.api.auth import AUTH_RESPONSES, CallerDep, TenantFilter, get_caller
from app.api.dependencies import (
    DispatcherDep,
    IdempotencyKeyDep,
    ReaderDep,
    SessionDep,
    SessionFactoryDep,
    SettingsDep,
    check_query_parameters,
    refuse_repeated_json_keys,
)
from app.api.errors import error_responses
from app.api.jobs import service
from app.api.jobs.dependencies import (
    ETAG_HEADER,
    NOT_MODIFIED,
    IfNoneMatchDep,
    JobDep,
    etag_matches,
    not_modified,
)
from app.api.jobs.schemas import (
    CheckpointList,
    CheckpointRead,
    DeliveryList,
    DeliveryRead,
    JobPage,
    JobRead,
    MetricsRead,
    metrics_json,
)
from app.core.db import Reader
from app.core.models import JobStatus
from app.core.spec import JobSpec
from app.core.tenancy import Caller

# Every route needs a caller; a route cannot opt out (tests/api/test_tenants.py checks).
router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_caller), Depends(check_query_parameters)],
    responses=AUTH_RESPONSES,
)
# A tag filter is key:value, as a spec's tags allow them (key up to 64 characters, value up to
# 256; no NUL, which PostgreSQL text cannot hold); the key holds no colon, the value may. The
# key also holds no quote or backslash: SQLite reads it inside a JSON path.
TAG_FILTER_PATTERN = r'^[^:"\\\x00]{1,64}:[^\x00]{0,256}$'
TagFilter = Annotated[str, StringConstraints(pattern=TAG_FILTER_PATTERN, max_length=64 + 1 + 256)]


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRead,
    dependencies=[Depends(refuse_repeated_json_keys)],
    responses={
        200: {"model": JobRead, "description": "A repeated Idempotency-Key: the original job"},
        **error_responses(409, 413, 429),
    },
)
def submit_job(
    spec: JobSpec,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKeyDep,
) -> JobRead:
    """Submit a training job; a repeated Idempotency-Key returns the original job (200)."""
    job, created = service.submit_job(session, spec, settings, idempotency_key, caller)
    # Commit before publishing: a worker must find the row the message names.
    session.commit()
    if created:
        dispatcher.publish([job.id])
    else:
        response.status_code = status.HTTP_200_OK
    return JobRead.from_job(service.get_job(session, job.id, caller))


@router.get("", response_model=JobPage)
async def list_jobs(
    reader: ReaderDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
    study_id: uuid.UUID | None = None,
    tenant: TenantFilter = None,
    tag: Annotated[
        list[TagFilter] | None,
        Query(
            max_length=8,
            description="key:value: only jobs whose spec has this tag; repeat to require several",
        ),
    ] = None,
) -> Response:
    """List the caller's jobs, newest first; pass next_cursor back as cursor for the next page."""
    tags = [(key, value) for key, _, value in (item.partition(":") for item in tag or ())]
    return await _list_jobs_response(reader, caller, status, limit, cursor, tenant, study_id, tags)


@router.get(
    "/{job_id}",
    response_model=JobRead,
    responses={200: {"headers": ETAG_HEADER}, **NOT_MODIFIED},
)
async def get_job(
    job_id: uuid.UUID, reader: ReaderDep, caller: CallerDep, if_none_match: IfNoneMatchDep
) -> Response:
    """A job: its status, progress, attempts, summary and error; 304 if If-None-Match matches."""
    return await _job_response(reader, job_id, caller, if_none_match)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(409),
)
def delete_job(job: JobDep, session: SessionDep) -> Response:
    """Delete an ended job with its metrics and checkpoints; 409 while queued or running, and
    for a study's job (delete the study)."""
    service.delete_job(session, job)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobRead,
    responses=error_responses(409),
)
def cancel_job(job: JobDep, session: SessionDep) -> JobRead:
    """Cancel a job: a queued one at once, a running one within a batch (checkpoints kept)."""
    return JobRead.from_job(service.request_cancel(session, job))


@router.get(
    "/{job_id}/metrics",
    response_model=MetricsRead,
    responses={200: {"headers": ETAG_HEADER}, **NOT_MODIFIED},
)
async def get_metrics(
    job_id: uuid.UUID,
    reader: ReaderDep,
    caller: CallerDep,
    if_none_match: IfNoneMatchDep,
    since_epoch: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> Response:
    """Per-epoch metrics and diagnostics, ascending; only epochs after since_epoch if given;
    304 if If-None-Match matches."""
    return await _metrics_response(reader, job_id, caller, since_epoch, if_none_match)


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job: JobDep, session: SessionDep) -> CheckpointList:
    """The job's checkpoints: the latest epoch's and the best validation epoch's."""
    rows = service.list_checkpoints(session, job)
    return CheckpointList(items=[CheckpointRead.from_row(row) for row in rows])


@router.get(
    "/{job_id}/checkpoints/{checkpoint_id}",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def download_checkpoint(
    job: JobDep, checkpoint_id: uuid.UUID, session: SessionDep, factory: SessionFactoryDep
) -> StreamingResponse:
    """The checkpoint's model weights, as a safetensors file."""
    checkpoint = service.find_checkpoint(session, job, checkpoint_id)
    filename = f"{job.id}-epoch{checkpoint.epoch}-{checkpoint.kind}.safetensors"
    return StreamingResponse(
        service.stream_weights(factory, checkpoint),
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "Content-Length": str(checkpoint.size_bytes),
            "ETag": f'"{checkpoint.sha256}"',
        },
    )


@router.get("/{job_id}/deliveries", response_model=DeliveryList)
def list_deliveries(job: JobDep, session: SessionDep) -> DeliveryList:
    """The webhook deliveries of the job's end to its callback, oldest first, with outcomes."""
    rows = service.list_deliveries(session, job)
    return DeliveryList(items=[DeliveryRead.from_row(row) for row in rows])


# The read routes above are what dashboards and services poll. Each does all of its database
# work and encoding in one call of the Reader (app.core.db: on the event loop, with no hop to a
# worker thread, which cost as much as the read; a plain-def route with session and lookup
# dependencies took five hops to worker threads), reads plain rows with no session and no
# transaction, with statements built once (ScopedRead), and returns the JSON it encoded once
# (FastAPI would validate the returned model again). The response_model still documents the
# body in OpenAPI.


async def _job_response(
    reader: Reader, job_id: uuid.UUID, caller: Caller, if_none_match: str | None
) -> Response:
    def read(connection: Connection) -> Response:
        job, attempts = service.read_job(connection, job_id, caller)
        etag = service.job_etag(job)
        if etag_matches(if_none_match, etag):
            return not_modified(etag)
        body = JobRead.from_columns(job, attempts).model_dump_json()
        return Response(body, media_type="application/json", headers={"ETag": etag})

    return await reader.run(read)


async def _list_jobs_response(
    reader: Reader,
    caller: Caller,
    status: JobStatus | None,
    limit: int,
    cursor: str | None,
    tenant: str | None,
    study_id: uuid.UUID | None,
    tags: list[tuple[str, str]],
) -> Response:
    def read(connection: Connection) -> Response:
        jobs, next_cursor = service.list_jobs(
            connection, caller, status, limit, cursor, tenant, study_id=study_id, tags=tags
        )
        attempts = service.read_attempts(connection, [job["id"] for job in jobs])
        page = JobPage(
            items=[JobRead.from_columns(job, attempts[job["id"]]) for job in jobs],
            next_cursor=next_cursor,
        )
        return Response(page.model_dump_json(), media_type="application/json")

    return await reader.run(read)


async def _metrics_response(
    reader: Reader,
    job_id: uuid.UUID,
    caller: Caller,
    since_epoch: int | None,
    if_none_match: str | None,
) -> Response:
    def read(connection: Connection) -> Response:
        etag = service.metrics_etag(connection, job_id, caller, since_epoch)
        if etag_matches(if_none_match, etag):
            return not_modified(etag)
        # After the tag, in a statement of its own: an epoch stored in between makes the body
        # newer than its tag (the next poll fetches it again), never a stale body under a
        # current tag.
        rows = service.list_metrics(connection, job_id, since_epoch)
        return Response(
            metrics_json(job_id, rows), media_type="application/json", headers={"ETag": etag}
        )

    return await reader.run(read)
