"""The one place that renders every error as JSON, and the status each domain error answers.

Every error body is {"error": <code>, "detail": <message or list of {field, message}>}.
Services raise domain errors (app/core/errors.py); routes never build error responses.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError

from app.core.errors import (
    Conflict,
    DatabaseUnavailable,
    DomainError,
    InvalidInput,
    LimitExceeded,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from app.core.spec import SpecError

logger = logging.getLogger(__name__)


# Each domain error family answers one status; the most specific class listed wins.
STATUS_CODES: dict[type[DomainError], int] = {
    InvalidInput: 422,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    QuotaExceeded: 413,
    LimitExceeded: 429,
    DatabaseUnavailable: 503,
}


def status_code_for(exc: DomainError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 500


def headers_for(exc: DomainError) -> dict[str, str] | None:
    if isinstance(exc, LimitExceeded):
        return {"Retry-After": str(exc.retry_after_seconds)}
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, DatabaseUnavailable):
        return {"Retry-After": "5"}
    return None


def _validation_details(exc: RequestValidationError) -> list[dict[str, str]]:
    details = []
    for err in exc.errors():
        loc = [
            str(part)
            for part in err.get("loc", ())
            if part not in ("body", "query", "path", "header")
        ]
        message = str(err.get("msg", "invalid"))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, SpecError):
            # A model validator's error: pydantic knows the model, the SpecError knows the field.
            loc += cause.field.split(".")
            message = cause.message
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        details.append({"field": ".".join(loc) or "body", "message": message})
    return details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _service_error(_request: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.code, "detail": exc.detail},
            status_code=status_code_for(exc),
            headers=headers_for(exc),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"error": "validation_error", "detail": _validation_details(exc)}, status_code=422
        )

    @app.exception_handler(OperationalError)
    async def _database_down(_request: Request, exc: DBAPIError) -> JSONResponse:
        # Connection refused, server restarting: the request may be retried once it is back.
        logger.warning("database unavailable: %s", exc.orig)
        error = DatabaseUnavailable("the database is unavailable; retry shortly")
        return await _service_error(_request, error)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return JSONResponse(
            {"error": "internal_error", "detail": "internal error"}, status_code=500
        )
