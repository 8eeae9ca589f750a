"""Liveness (/v1/health) and readiness (/v1/ready: the database and the broker answer)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.api.dependencies import DispatcherDep

router = APIRouter(prefix="/v1", tags=["system"])


@router.get("/health")
def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/ready")
def ready(request: Request, dispatcher: DispatcherDep) -> JSONResponse:
    """200 when the database and the broker answer; 503 naming what is down."""
    checks = {"database": _database_up(request), "broker": dispatcher.broker_reachable()}
    down = [name for name, up in checks.items() if not up]
    body = {
        "status": "ready" if not down else "unavailable",
        "checks": {name: "up" if up else "down" for name, up in checks.items()},
        "down": down,
    }
    return JSONResponse(body, status_code=503 if down else 200)


def _database_up(request: Request) -> bool:
    try:
        with request.app.state.session_factory() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception:
        return False
