"""The one place that renders every error as JSON, and the status each domain error answers.

Every error body is {"error": <code>, "detail": <message or list of {field, message}>}.
Services raise domain errors (app/core/errors.py); routes never build error responses.
"""

import json
import logging
import sys
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from starlette.exceptions import HTTPException
from starlette.routing import Match

from app.core.errors import (
    Conflict,
    DatabaseUnavailable,
    DomainError,
    Forbidden,
    InvalidInput,
    LimitExceeded,
    NotFound,
    QuotaExceeded,
    Unauthorized,
)
from app.core.spec import SpecError

logger = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """JSON escaped to ASCII: an error may quote the client's input, and a lone surrogate
    (valid in a JSON escape, not encodable as UTF-8) must not turn its 422 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":")).encode("ascii")


class FieldError(BaseModel):
    field: str = Field(description="the dotted path at fault, e.g. model.normalization.type")
    message: str


class ErrorBody(BaseModel):
    """Every error the service answers: a stable code, and a message or the fields at fault."""

    error: str = Field(
        description="a stable code: validation_error, job_not_found, database_unavailable, ..."
    )
    detail: str | list[FieldError]


_RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}
}
_ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: {"description": "The request body could not be parsed"},
    401: {
        "description": "No usable API key: missing_key, malformed_key, unknown_key or revoked_key",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
    },
    403: {"description": "The key is valid but may not do this (admin_key_required)"},
    404: {"description": "Not found: no such id, or not the caller's (the same answer)"},
    409: {"description": "The request contradicts what is stored"},
    413: {"description": "Over the body size limit, or the tenant's storage quota"},
    431: {"description": "The request line and headers are over TRAINSVC_HTTP_MAX_HEADER_BYTES"},
    422: {"description": "A field is invalid; detail names each field and the reason"},
    429: {
        "description": "Over a limit (queued jobs, the tenant's active jobs, the key's request "
        "rate, busy uploads); retry after Retry-After",
        "headers": _RETRY_AFTER,
    },
    503: {"description": "The database is unavailable; retry shortly", "headers": _RETRY_AFTER},
}


def error_responses(*status_codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for these statuses, each with the ErrorBody schema."""
    return {code: {**_ERROR_RESPONSES[code], "model": ErrorBody} for code in status_codes}


# Each domain error family answers one status; the most specific class listed wins.
STATUS_CODES: dict[type[DomainError], int] = {
    InvalidInput: 422,
    Unauthorized: 401,
    Forbidden: 403,
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
        elif err.get("type") == "json_invalid":
            # FastAPI puts the offset of the syntax error where a field name goes.
            position = loc.pop() if loc else "?"
            message = f"not valid JSON at character {position}: {cause or message}"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        details.append({"field": ".".join(loc) or "body", "message": message})
    return details


def _unparsable_json(cause: BaseException | None) -> str | None:
    """Why a JSON body failed to parse other than by its syntax (FastAPI answers those with a
    bare 400, "There was an error parsing the body"), or None if it was not that."""
    if isinstance(cause, RecursionError):
        return "not valid JSON here: nested too deeply to parse"
    if isinstance(cause, UnicodeDecodeError):
        return f"not valid JSON: not UTF-8 text ({cause.reason} at byte {cause.start})"
    if isinstance(cause, ValueError) and "integer string conversion" in str(cause):
        return f"not valid JSON here: an integer of more than {sys.get_int_max_str_digits()} digits"
    return None


def is_json(media: str) -> bool:
    """Whether FastAPI reads a body of this media type (no parameters) as JSON."""
    media = media.lower()
    return media == "application/json" or media.endswith("+json")


def database_is_away(exc: DBAPIError) -> bool:
    """Connection refused, dropped or reset, server restarting: worth a retry once it is back."""
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def _framework_error_code(status_code: int) -> str:
    # 404 -> "not_found", 405 -> "method_not_allowed": the reason phrase, as our codes are.
    try:
        return HTTPStatus(status_code).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> str:
    # Starlette's Allow names only the first route matching the path; a path can have several
    # (GET and POST /v1/jobs), so ask the router which methods it would take on this path.
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] == Match.FULL
            for route in request.app.router.routes
        )
    ]
    return ", ".join(allowed)


def _framework_error(request: Request, exc: HTTPException) -> JSONResponse:
    detail = str(exc.detail)
    headers = dict(exc.headers or {})
    if exc.status_code == 404 and exc.detail == "Not Found":
        detail = f"no route {request.url.path}"
    elif exc.status_code == 405 and exc.detail == "Method Not Allowed":
        # Routes the router cannot ask (the dashboard's static files) keep Starlette's answer.
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "GET, HEAD")
        detail = (
            f"{request.method} is not allowed on {request.url.path}; allowed: {headers['Allow']}"
        )
    return ErrorResponse(
        {"error": _framework_error_code(exc.status_code), "detail": detail},
        status_code=exc.status_code,
        headers=headers or None,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def _service_error(_request: Request, exc: DomainError) -> JSONResponse:
        return ErrorResponse(
            {"error": exc.code, "detail": exc.detail},
            status_code=status_code_for(exc),
            headers=headers_for(exc),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = _validation_details(exc)
        media = request.headers.get("content-type", "").partition(";")[0].strip()
        if not is_json(media):
            # FastAPI parses only a JSON content type as JSON: any other body reaches the
            # model as bytes, and "should be a valid dictionary" would hide the real mistake.
            media = media or "none"
            for detail in details:
                if detail["field"] == "body":
                    detail["message"] = (
                        f"send the body as JSON with Content-Type: application/json "
                        f"(this request's Content-Type: {media})"
                    )
        return ErrorResponse({"error": "validation_error", "detail": details}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        # The router's 404/405 and the body parser's 400, in the same shape as ours.
        if exc.status_code == 400 and (reason := _unparsable_json(exc.__cause__)):
            detail = [{"field": "body", "message": reason}]
            return ErrorResponse({"error": "validation_error", "detail": detail}, status_code=422)
        return _framework_error(request, exc)

    @app.exception_handler(DBAPIError)
    async def _database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if database_is_away(exc):
            logger.warning("database unavailable: %s", exc.orig)
            error = DatabaseUnavailable("the database is unavailable; retry shortly")
            return await _service_error(request, error)
        if isinstance(exc, DataError):
            # A value the database refused: inputs are validated before they reach it, so this
            # is a gap in validation (logged as such), but still the client's input, not a 500.
            logger.error("database refused a value: %s", exc.orig)
            return ErrorResponse(
                {
                    "error": "validation_error",
                    "detail": [{"field": "body", "message": "a value the database cannot store"}],
                },
                status_code=422,
            )
        return await _unexpected(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error", exc_info=exc)
        return ErrorResponse(
            {"error": "internal_error", "detail": "internal error"}, status_code=500
        )


def document_errors(app: FastAPI) -> None:
    """Declare in OpenAPI the errors every operation of a kind can give, in their real shape.

    Routers declare what their domain raises (409, 429, 503); what applies to every operation
    of a kind is declared here: a 404 wherever the path names an id, a 422 in our ErrorBody
    (not FastAPI's HTTPValidationError) wherever there is input to validate, a 400 wherever
    there is a body, and a 413 and a 431 everywhere: the size limits refuse an oversized body
    or head before routing, whatever the operation (a GET can carry a body too).
    """
    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = default_openapi()
        error_ref = {"$ref": "#/components/schemas/ErrorBody"}

        def declare(responses: dict[str, Any], code: int) -> None:
            response = responses.setdefault(str(code), {})
            response.setdefault("description", _ERROR_RESPONSES[code]["description"])
            response["content"] = {"application/json": {"schema": error_ref}}

        for path, path_item in schema.get("paths", {}).items():
            for operation in path_item.values():
                responses = operation["responses"]
                if "{" in path:
                    declare(responses, 404)  # an id in the path may name nothing (of the caller's)
                declare(responses, 413)
                declare(responses, 431)
                for code, response in responses.items():
                    # An error is JSON whatever the operation streams on success: FastAPI
                    # would give a `model` response the route's media type (an event stream).
                    media = response.get("content", {})
                    if code[0] in "45" and any(
                        item.get("schema") == error_ref for item in media.values()
                    ):
                        response["content"] = {"application/json": {"schema": error_ref}}
                if (
                    "422" in responses
                    or operation.get("parameters")
                    # Every keyed /v1 operation refuses a query parameter it does not take
                    # (dependencies.check_query_parameters), even one that takes none.
                    or (path.startswith("/v1/") and "401" in responses)
                ):
                    declare(responses, 422)
                body = operation.get("requestBody")
                if body is not None:
                    # Starlette's parsers answer 400 for a body they cannot decode at all
                    # (bytes that are not UTF-8, a broken multipart form).
                    declare(responses, 400)
                    declare(responses, 422)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        if "ErrorBody" not in components:
            generated = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(generated.pop("$defs", {}))
            components["ErrorBody"] = generated
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
