"""Liveness (/v1/health) and readiness (/v1/ready: the database and the broker answer)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.dependencies import DispatcherDep
from app.api.system.schemas import Dependency, Health, Readiness

router = APIRouter(prefix="/v1", tags=["system"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """The process is alive."""
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The database or the broker is down"}},
)
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
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
