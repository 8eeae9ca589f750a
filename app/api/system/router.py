"""Liveness (/v1/health), readiness (/v1/ready: the database and broker answer), /metrics."""

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text

from app.api.auth import AUTH_RESPONSES, MetricsCallerDep
from app.api.dependencies import DispatcherDep
from app.api.errors import error_responses
from app.api.system.schemas import Dependency, Health, Readiness
from app.core.db import READ_ONLY
from app.core.observability import metrics

router = APIRouter(prefix="/v1", tags=["system"])
# Prometheus scrapes /metrics by convention, outside the versioned API. It needs no key unless
# settings.metrics_require_key is set (MetricsCallerDep), when it answers 401 and 429 as any
# keyed route does, and 403 to a key that is not an admin's.
metrics_router = APIRouter(tags=["system"])


# HEAD too: load balancers and uptime monitors often probe with it (a GET without the body).
# One route per method, so that each has its own OpenAPI operation id.
@router.get("/health", response_model=Health)
@router.head("/health", response_model=Health)
def health() -> Health:
    """The process is alive."""
    return Health(status="ok")


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": Readiness, "description": "The database or the broker is down"}
}


@router.get("/ready", response_model=Readiness, responses=_NOT_READY)
@router.head("/ready", response_model=Readiness, responses=_NOT_READY)
def ready(request: Request, dispatcher: DispatcherDep) -> JSONResponse:
    """200 when the database and the broker answer; 503 naming what is down."""
    checks: dict[Dependency, bool] = {
        "database": _database_up(request),
        "broker": dispatcher.broker_reachable(),
    }
    down: list[Dependency] = [name for name, up in checks.items() if not up]
    body = Readiness(
        status="ready" if not down else "unavailable",
        checks={name: "up" if up else "down" for name, up in checks.items()},
        down=down,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=503 if down else 200)


def _database_up(request: Request) -> bool:
    try:
        with request.app.state.session_factory(execution_options=READ_ONLY) as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {metrics.CONTENT_TYPE_LATEST: {}}, "description": "Metrics"},
        **AUTH_RESPONSES,
        **error_responses(403),
    },
)
def prometheus_metrics(request: Request, _caller: MetricsCallerDep) -> Response:
    """Prometheus metrics: requests, jobs by status, queue, outbox, attempts, training. No key
    is needed unless TRAINSVC_METRICS_REQUIRE_KEY is set, and then an admin key: the figures
    count every tenant's jobs together."""
    body = metrics.render(request.app.state.session_factory)
    return Response(body, media_type=metrics.CONTENT_TYPE_LATEST)
