"""Typed service errors and the one place that renders every error as JSON.

Every error body is {"error": <code>, "detail": <message or list of {field, message}>}.
Services raise these; routes never build error responses themselves.
"""

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError

from app.jobs.spec import SpecError

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    status_code = 500
    code = "internal_error"
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: Any) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ServiceError):
    status_code = 404
    code = "not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class CheckpointNotFound(NotFound):
    code = "checkpoint_not_found"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class IdempotencyKeyReused(ServiceError):
    status_code = 409
    code = "idempotency_key_reused"


class JobNotCancellable(ServiceError):
    status_code = 409
    code = "job_not_cancellable"


class PayloadTooLarge(ServiceError):
    status_code = 413
    code = "payload_too_large"


class TooManyQueuedJobs(ServiceError):
    status_code = 429
    code = "too_many_queued_jobs"
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "30"}


class InvalidInput(ServiceError):
    """A 422 found by a service rather than by pydantic: names the field like pydantic's do."""

    status_code = 422
    code = "validation_error"

    def __init__(self, field: str, message: str) -> None:
        super().__init__([{"field": field, "message": message}])


class DatabaseUnavailable(ServiceError):
    status_code = 503
    code = "database_unavailable"
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "5"}


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
    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return JSONResponse(
            {"error": exc.code, "detail": exc.detail},
            status_code=exc.status_code,
            headers=exc.headers,
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
