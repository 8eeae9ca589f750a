"""Structured logs: one configuration for every process, with request and job context.

Every line a request causes carries its request id, and every line a job causes its job id and
attempt, whichever thread or module logs it: the ids live in context variables (set by the
API's middleware and by worker.execution), and a filter on the one root handler copies them
onto each record. `TRAINSVC_LOG_FORMAT=json` writes JSON lines; `console` a readable line;
the default picks console on a terminal and JSON otherwise (a container's log collector).
"""

import json
import logging
import re
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from celery.signals import setup_logging

from app.core.config import Settings

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)
attempt_var: ContextVar[int | None] = ContextVar("attempt", default=None)

# A client's X-Request-ID is echoed into every log line and header: bounded and plain, so it
# can neither flood a line nor forge one (no spaces, quotes or newlines).
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# API keys look like tsk_<url-safe base64>. They are never logged on purpose; this catches one
# that slips into a message or a traceback anyway.
_SECRET = re.compile(r"tsk_[A-Za-z0-9_-]+")
REDACTED = "tsk_[REDACTED]"

_CONTEXT_FIELDS = ("request_id", "job_id", "attempt")


def accept_request_id(header: str | None) -> str:
    """The client's X-Request-ID when it is safe to repeat, else a new one."""
    if header is not None and _REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


def redact(text: str) -> str:
    return _SECRET.sub(REDACTED, text)


@contextmanager
def job_context(job_id: object, attempt: int | None = None) -> Iterator[None]:
    """Lines logged inside carry this job id (and attempt, once there is one)."""
    job_token = job_id_var.set(str(job_id))
    attempt_token = attempt_var.set(attempt)
    try:
        yield
    finally:
        attempt_var.reset(attempt_token)
        job_id_var.reset(job_token)


def bind_attempt(attempt: int) -> None:
    """The attempt is known once a claim succeeds, inside job_context's block."""
    attempt_var.set(attempt)


class ContextFilter(logging.Filter):
    """Copies the request id, job id and attempt of the current context onto each record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.job_id = job_id_var.get()
        record.attempt = attempt_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and whatever context is set."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        for field in _CONTEXT_FIELDS:
            value = getattr(record, field, None)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(line, default=str))


class ConsoleFormatter(logging.Formatter):
    """A line for people: time, level, logger, [context], message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s %(context)s%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        context = " ".join(
            f"{field}={getattr(record, field)}"
            for field in _CONTEXT_FIELDS
            if getattr(record, field, None) is not None
        )
        record.context = f"[{context}] " if context else ""
        return redact(super().format(record))


def resolved_format(settings: Settings) -> str:
    if settings.log_format != "auto":
        return settings.log_format
    return "console" if sys.stderr.isatty() else "json"


def configure_logging(settings: Settings) -> None:
    """Configure the root logger once at process start; uvicorn's and Celery's loggers join it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    handler.setFormatter(
        JsonFormatter() if resolved_format(settings) == "json" else ConsoleFormatter()
    )
    root = logging.getLogger()
    for existing in root.handlers[:]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    # uvicorn installs handlers of its own unless told not to (log_config=None); either way its
    # lines go through the root handler, so they are formatted and carry the request id too.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "celery", "celery.task"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # Alembic announces each of its plugins at INFO whenever its scripts are read (serve and
    # worker read them at start to check the schema): seven lines of nothing for an operator.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    # A receiver of Celery's setup_logging signal tells a worker to leave logging as it is.
    setup_logging.connect(_already_configured, weak=False)


def _already_configured(**_: object) -> None:
    """Celery's worker would otherwise add handlers of its own to the root logger."""
