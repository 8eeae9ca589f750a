"""HTTP routes for studies: thin, each parses, calls the service and returns a schema."""

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response, status
from fastapi.responses import HTMLResponse

from app.api.auth import AUTH_RESPONSES, CallerDep, TenantFilter, get_caller
from app.api.dependencies import (
    DispatcherDep,
    IdempotencyKeyDep,
    SessionDep,
    SettingsDep,
    check_query_parameters,
    refuse_repeated_json_keys,
)
from app.api.errors import error_responses
from app.api.studies import rendering, service
from app.api.studies.dependencies import PlotCacheDep, StudyDep
from app.api.studies.schemas import (
    PresetList,
    PresetRead,
    StudyCreate,
    StudyJob,
    StudyPage,
    StudyRead,
    StudyReport,
    StudySummary,
)
from app.core.errors import PlotNotFound
from app.core.models import Study
from app.core.studies import plots
from app.core.studies.presets import PRESETS
from app.core.studies.report import build_report

# Every route needs a caller; a route cannot opt out (tests/api/test_tenants.py checks).
router = APIRouter(
    prefix="/v1/studies",
    tags=["studies"],
    dependencies=[Depends(get_caller), Depends(check_query_parameters)],
    responses=AUTH_RESPONSES,
)


def _summary(study: Study, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": study.id,
        "name": study.name,
        "preset": study.preset,
        "created_at": study.created_at,
        "ended": not counts["queued"] and not counts["running"],
        "counts": counts,
    }


def _read(session: SessionDep, study: Study) -> StudyRead:
    counts = service.job_counts(session, [study.id])[study.id]
    jobs = [
        StudyJob(id=job_id, status=job_status, grid_point=point)
        for job_id, job_status, point in service.study_jobs(session, study)
    ]
    return StudyRead(**_summary(study, counts), base=study.base, grid=study.grid, jobs=jobs)


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=StudyRead,
    dependencies=[Depends(refuse_repeated_json_keys)],
    responses={
        200: {"model": StudyRead, "description": "A repeated Idempotency-Key: the original study"},
        **error_responses(409),
    },
)
def create_study(
    request: StudyCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    dispatcher: DispatcherDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKeyDep,
) -> StudyRead:
    """Create a study: one job per grid point, all or none; a repeated Idempotency-Key
    returns the original study (200)."""
    study, job_ids, created = service.create_study(
        session, request, settings, idempotency_key, caller
    )
    # Commit before publishing: a worker must find the rows the messages name.
    session.commit()
    if created:
        dispatcher.publish(job_ids)  # one group, in grid order
    else:
        response.status_code = status.HTTP_200_OK
    return _read(session, study)


@router.get("", response_model=StudyPage)
def list_studies(
    session: SessionDep,
    caller: CallerDep,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: str | None = None,
    tenant: TenantFilter = None,
) -> StudyPage:
    """List the caller's studies, newest first; pass next_cursor back as cursor."""
    studies, next_cursor = service.list_studies(session, caller, limit, cursor, tenant)
    counts = service.job_counts(session, [study.id for study in studies])
    return StudyPage(
        items=[StudySummary(**_summary(study, counts[study.id])) for study in studies],
        next_cursor=next_cursor,
    )


@router.get("/presets", response_model=PresetList)
def list_presets() -> PresetList:
    """The named studies a POST may give as {"preset": name}."""
    return PresetList(
        items=[
            PresetRead(name=p.name, description=p.description, base=p.base, grid=p.grid)
            for p in PRESETS.values()
        ]
    )


@router.get("/{study_id}", response_model=StudyRead)
def get_study(study: StudyDep, session: SessionDep) -> StudyRead:
    """A study: its grid, its jobs by status, and each job's grid point."""
    return _read(session, study)


@router.post("/{study_id}/cancel", status_code=status.HTTP_202_ACCEPTED, response_model=StudyRead)
def cancel_study(study: StudyDep, session: SessionDep) -> StudyRead:
    """Cancel every job that has not ended: queued ones at once, running ones within a batch."""
    service.cancel_study(session, study)
    session.commit()
    return _read(session, study)


@router.delete(
    "/{study_id}", status_code=status.HTTP_204_NO_CONTENT, responses=error_responses(409)
)
def delete_study(study: StudyDep, session: SessionDep) -> Response:
    """Delete an ended study with its jobs and their metrics (409 while jobs are active)."""
    service.delete_study(session, study)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


def _plot_urls(study: Study) -> dict[str, str]:
    return {
        name: f"/v1/studies/{study.id}/plots/{name}.png"
        for name in plots.available(study.grid, study.base)
    }


@router.get(
    "/{study_id}/report",
    # Keys the report leaves out (a configuration's probes where no job had any) stay out.
    response_model=StudyReport,
    response_model_exclude_unset=True,
    responses={
        200: {
            "content": {"text/html": {}, "text/csv": {}},
            "description": "the report; ?format=html a page with the plots, ?format=csv the "
            "configuration table",
        }
    },
)
def get_report(
    study: StudyDep,
    session: SessionDep,
    target: Annotated[float | None, Query(gt=0.0, le=1.0)] = None,
    format: Literal["json", "html", "csv"] = "json",
) -> Any:
    """Configurations aggregated over seeds, the largest stable learning rate and each axis
    value's paired effect with a bootstrap 95% interval; works while jobs still run."""
    built = build_report(study.grid, service.load_runs(session, study), target)
    report = {"study_id": str(study.id), "name": study.name, **built, "plots": _plot_urls(study)}
    if format == "csv":
        return Response(
            rendering.csv_table(report),
            media_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="study-{study.id}.csv"'},
        )
    if format == "html":
        return HTMLResponse(rendering.html_page(report, report["plots"]))
    return report


@router.get(
    "/{study_id}/plots/{name}.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def get_plot(study: StudyDep, name: str, session: SessionDep, cache: PlotCacheDep) -> Response:
    """A plot of the study: one of the names the report lists under plots."""
    names = plots.available(study.grid, study.base)
    if name not in names:
        raise PlotNotFound(f"study {study.id} has no plot {name!r}; it has {', '.join(names)}")
    counts = service.job_counts(session, [study.id])[study.id]
    ended = not counts["queued"] and not counts["running"]
    key = (study.id, name, tuple(sorted(counts.items())))
    png = cache.get(key) if ended else None
    if png is None:
        png = plots.draw(name, study.grid, service.load_runs(session, study))
        if ended:
            cache.put(key, png)
    return Response(png, media_type="image/png")
