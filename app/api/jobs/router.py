"""HTTP routes for jobs: thin, each parses, calls the service and returns a schema."""

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from app.api.auth import AUTH_RESPONSES, CallerDep, get_caller
from app.api.dependencies import DispatcherDep, SessionDep, SessionFactoryDep, SettingsDep
from app.api.errors import error_responses
from app.api.jobs import service
from app.api.jobs.dependencies import IdempotencyKeyDep, JobDep
from app.api.jobs.schemas import (
    CheckpointList,
    CheckpointRead,
    DeliveryList,
    DeliveryRead,
    EpochRead,
    JobPage,
    JobRead,
    MetricsRead,
)
from app.core.models import JobStatus
from app.core.spec import JobSpec

# Every route needs a caller; a route cannot opt out (tests/api/test_tenants.py checks).
router = APIRouter(
    prefix="/v1/jobs",
    tags=["jobs"],
    dependencies=[Depends(get_caller)],
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
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
    study_id: uuid.UUID | None = None,
    tenant: Annotated[
        str | None, Query(max_length=100, description="admin keys: only this tenant's jobs")
    ] = None,
    tag: Annotated[
        list[TagFilter] | None,
        Query(
            max_length=8,
            description="key:value: only jobs whose spec has this tag; repeat to require several",
        ),
    ] = None,
) -> JobPage:
    """List the caller's jobs, newest first; pass next_cursor back as cursor for the next page."""
    tags = [(key, value) for key, _, value in (item.partition(":") for item in tag or ())]
    jobs, next_cursor = service.list_jobs(
        session, caller, status, limit, cursor, tenant, study_id=study_id, tags=tags
    )
    return JobPage(items=[JobRead.from_job(job) for job in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobRead)
def get_job(job: JobDep) -> JobRead:
    """A job: its status, progress, attempts, summary and error."""
    return JobRead.from_job(job)


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=error_responses(409),
)
def delete_job(job: JobDep, session: SessionDep) -> Response:
    """Delete an ended job with its metrics and checkpoints; 409 while queued or running."""
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


@router.get("/{job_id}/metrics", response_model=MetricsRead)
def get_metrics(
    job: JobDep,
    session: SessionDep,
    since_epoch: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
) -> MetricsRead:
    """Per-epoch metrics and diagnostics, ascending; only epochs after since_epoch if given."""
    rows = service.list_metrics(session, job, since_epoch)
    return MetricsRead(job_id=job.id, epochs=[EpochRead.from_row(row) for row in rows])


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
