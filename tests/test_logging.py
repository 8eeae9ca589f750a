"""Structured logs: the request id on every line a request causes, the job id and attempt on
every line a job causes, and no API key in any line."""

import io
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session, sessionmaker

from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.migrate import upgrade
from app.core.observability.logs import ContextFilter, JsonFormatter, accept_request_id
from app.core.outbox import Dispatcher
from tests.factories import make_job
from tests.support.processes import Processes, free_port
from worker import execution
from worker.execution import WorkerContext, execute_job


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@pytest.fixture
def serve_with_json_logs(processes: Processes, tmp_path: Path) -> tuple[str, Path]:
    """`trainsvc serve` logging JSON, with a broker that is down (so a submit logs a warning)."""
    database_url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(database_url)
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": database_url,
            "TRAINSVC_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",  # nothing listens
            "TRAINSVC_LOG_FORMAT": "json",
        }
    )
    url = processes.api("serve")
    return url, processes.started[0][1]


@pytest.mark.e2e
def test_every_line_a_request_causes_carries_its_request_id(
    serve_with_json_logs: tuple[str, Path],
) -> None:
    url, log = serve_with_json_logs
    response = httpx.post(
        f"{url}/v1/jobs",
        json={"dataset": {"name": "digits"}, "epochs": 1},
        headers={"X-Request-ID": "submit-1"},
        timeout=30,
    )
    assert response.status_code == 201
    assert response.headers["X-Request-ID"] == "submit-1"
    made = httpx.get(f"{url}/v1/jobs/{response.json()['id']}", timeout=30)
    made_id = made.headers["X-Request-ID"]
    assert len(made_id) == 32  # none given: one is made, and returned

    lines = json_lines(log.read_text())  # every line the process wrote is JSON, uvicorn's too
    caused = [line for line in lines if line.get("request_id") == "submit-1"]
    messages = " | ".join(line["message"] for line in caused)
    assert "broker unavailable" in messages  # the outbox's warning, logged inside the request
    assert '"POST /v1/jobs HTTP/1.1" 201' in messages  # uvicorn's access line
    assert any(
        line.get("request_id") == made_id and "GET /v1/jobs/" in line["message"] for line in lines
    )
    # Lines that no request caused (startup) carry no request id.
    assert any("Application startup complete" in line["message"] for line in lines)
    assert all("request_id" not in line for line in lines if "startup" in line["message"].lower())


@pytest.mark.e2e
def test_an_api_key_never_reaches_the_log(serve_with_json_logs: tuple[str, Path]) -> None:
    url, log = serve_with_json_logs
    key = "tsk_" + "A1b2_C3d4-" * 4
    httpx.get(f"{url}/v1/jobs/{key}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    text = log.read_text()
    assert "tsk_[REDACTED]" in text  # the access line names the path, with the key cut out
    assert key not in text
    assert key[4:] not in text


@pytest.mark.parametrize(
    "header", [None, "", "has space", "x" * 129, "new\nline", 'quo"te', "ünïcode"]
)
def test_an_unsafe_request_id_is_replaced(header: str | None) -> None:
    made = accept_request_id(header)
    assert made != header
    assert len(made) == 32


def test_a_safe_request_id_is_kept() -> None:
    assert accept_request_id("abc-123_x.y:z") == "abc-123_x.y:z"
    assert accept_request_id("x" * 128) == "x" * 128


class _Fails:
    """Stands in for TrainingRun: fails at once, so the attempt logs a traceback."""

    def __init__(self, *_: Any, **__: Any) -> None:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")


def test_every_line_a_job_causes_carries_its_job_id_and_attempt(
    session_factory: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.addHandler(handler)
    # setLevel, not an attribute patch: loggers cache whether a level is enabled, and only
    # setLevel clears that cache (a cached "INFO is off" from an earlier test hid the lines).
    previous_level = root.level
    root.setLevel(logging.INFO)
    monkeypatch.setattr(execution, "TrainingRun", _Fails)
    monkeypatch.setattr(execution, "load_data", lambda *_: None)
    with session_factory() as session:
        job = make_job(session)
        session.commit()
    context = WorkerContext(
        # One job alone: queued jobs other tests left in this database must not join its pack.
        settings.model_copy(update={"max_pack": 1, "control_poll_seconds": 3600.0}),
        session_factory,
        Dispatcher(create_celery_app(settings), session_factory),
        "node@host#1",
    )
    try:
        assert execute_job(context, job.id) == "failed"
        assert execute_job(context, job.id) == "skipped"  # ended: a second delivery finds no claim
        logging.getLogger("after").info("not about any job")
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)

    lines = json_lines(buffer.getvalue())
    assert len(lines) >= 3, buffer.getvalue()[-4000:]
    failed, skipped, after = lines[-3], lines[-2], lines[-1]
    assert "failed" in failed["message"]
    assert "RuntimeError: mat1 and mat2" in failed["exception"]
    assert (failed["job_id"], failed["attempt"]) == (str(job.id), 1)
    assert "not claimable" in skipped["message"]
    assert skipped["job_id"] == str(job.id)  # no claim, so no attempt
    assert "attempt" not in skipped
    assert "job_id" not in after  # the context ends with the attempt
    assert all(
        line["job_id"] == str(job.id) for line in lines[:-1] if line["logger"].startswith("worker")
    )
    assert uuid.UUID(failed["job_id"])


def test_the_worker_flag_sets_the_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainsvc worker --loglevel debug` logs at DEBUG, whatever TRAINSVC_LOG_LEVEL says (it
    was passed to Celery only, which leaves the logging configured here alone)."""
    from app import cli
    from app.core.config import get_settings
    from worker import main

    configured: list[Settings] = []
    started: list[Settings] = []
    monkeypatch.setattr(cli, "configure_logging", configured.append)
    monkeypatch.setattr(cli, "_require_latest_schema", lambda _settings: None)
    monkeypatch.setattr(main, "run_worker", lambda settings, **_: started.append(settings))
    cli.main(["worker", "--loglevel", "debug"])
    assert [settings.log_level for settings in configured + started] == ["DEBUG", "DEBUG"]
    cli.main(["worker"])
    assert configured[-1].log_level == started[-1].log_level == get_settings().log_level


def test_a_worker_logging_json_prints_no_banner() -> None:
    """Celery's banner, some 18 lines on standard output at each start, is no log line: where
    the lines are JSON it is left out, so a log collector does not meet it."""
    from worker.main import celery_arguments

    json_lines_only = celery_arguments(Settings(log_format="json"), 2, "node@host")
    assert json_lines_only[:2] == ["--quiet", "worker"]
    assert "--loglevel=INFO" in json_lines_only
    for_people = celery_arguments(Settings(log_format="console", log_level="WARNING"), 2, "n@h")
    assert for_people[0] == "worker"
    assert "--loglevel=WARNING" in for_people
