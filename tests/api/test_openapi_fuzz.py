"""Schema-driven fuzzing: every operation in the OpenAPI document, against a real database.

Schemathesis generates requests from the document (valid ones, and invalid ones from the
coverage phase) and checks each response: never a 5xx, and always a status, content type and
body the document declares for that operation. Bounded (a few dozen examples per operation,
derandomized) so the run takes a minute or two on two cores.
"""

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from app.api.main import create_app
from app.core.config import Settings
from app.core.db import transaction
from app.core.keys import create_key
from app.core.migrate import upgrade
from app.core.models import DEFAULT_TENANT, EpochMetric
from tests.conftest import create_postgres_database, drop_postgres_database
from tests.factories import make_checkpoint, make_job

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# Rows the fuzzer's path parameters name most of the time (else random ids: a 404), so that
# the operations under a job reach past the lookup to the service and its queries.
FINISHED_JOB = uuid.UUID(int=1)
QUEUED_JOB = uuid.UUID(int=2)
CHECKPOINT = uuid.UUID(int=3)

CONFIG = SchemathesisConfig.from_dict(
    {
        "dictionaries": {
            "jobs": {"values": [str(FINISHED_JOB), str(QUEUED_JOB)]},
            "checkpoints": {"values": [str(CHECKPOINT)]},
        },
        "parameters": {
            "path.job_id": {"dictionary": "jobs", "probability": 0.8},
            "path.checkpoint_id": {"dictionary": "checkpoints", "probability": 0.8},
        },
        "generation": {"max-examples": 30, "deterministic": True, "mode": "all"},
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
    }
)


# (database, auth): without keys, every operation reaches its service; with a key, the same,
# through the key check (the tenant of the key owns the known rows). Requests without a usable
# key (401) are what the coverage phase sends anyway, in both modes where keys are on.
MODES = [("sqlite", "off"), ("sqlite", "key"), ("postgres", "key")]


@pytest.fixture(scope="module", params=MODES, ids=[f"{db}-{auth}" for db, auth in MODES])
def fuzz_mode(request: pytest.FixtureRequest) -> tuple[str, str]:
    mode: tuple[str, str] = request.param
    return mode


@pytest.fixture(scope="module")
def fuzz_database_url(
    fuzz_mode: tuple[str, str],
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A database of the run's own: fuzzing commits rows, which other tests must not see."""
    if fuzz_mode[0] == "sqlite":
        url = f"sqlite:///{Path(tmp_path_factory.mktemp('fuzz')) / 'trainsvc.db'}"
        upgrade(url)
        yield url
        return
    admin: Engine = request.getfixturevalue("postgres_admin")
    url = create_postgres_database(admin, "fuzz")
    yield url
    drop_postgres_database(admin, url)


@pytest.fixture(scope="module")
def fuzz_app(
    fuzz_database_url: str, fuzz_mode: tuple[str, str], redis_url: str
) -> Iterator[tuple[FastAPI, dict[str, str]]]:
    """The app under fuzzing, and the headers every request carries (the key, if keys are on)."""
    auth = "off" if fuzz_mode[1] == "off" else "on"
    settings = Settings(
        database_url=fuzz_database_url,
        broker_url=redis_url,
        auth=auth,
        # The fuzzer's own pace is not abuse: the per-key rate limit stays out of its way.
        key_requests_per_second=10_000,
        key_request_burst=10_000,
        # A queued job's stream waits for events that never come: end it soon.
        event_stream_max_seconds=0.5,
    )
    app = create_app(settings)
    with TestClient(app):  # runs the lifespan: the engine, the sessions, the dispatcher
        with transaction(app.state.session_factory) as session:
            _store_known_rows(session)
            headers = {}
            if auth == "on":
                _, key = create_key(session, DEFAULT_TENANT)
                headers = {"Authorization": f"Bearer {key}"}
        yield app, headers


def _store_known_rows(session: Session) -> None:
    finished = make_job(session, status="succeeded")
    finished.id = FINISHED_JOB
    finished.progress_epoch = 2
    finished.summary = {"best_val_accuracy": 0.9, "best_epoch": 2}
    queued = make_job(session, status="queued")
    queued.id = QUEUED_JOB
    session.flush()
    for epoch in (1, 2):
        session.add(
            EpochMetric(
                job_id=FINISHED_JOB,
                epoch=epoch,
                attempt=1,
                train_loss=1.0 / epoch,
                train_accuracy=0.5,
                val_loss=1.1 / epoch,
                val_accuracy=0.5,
                lr=0.1,
                epoch_seconds=0.01,
                diagnostics={"grad_norm_mean": 1.0, "layers": {"0": {"weight_norm": 2.0}}},
            )
        )
    weights = b"weights" * 1000
    session.add(make_checkpoint(FINISHED_JOB, weights, id=CHECKPOINT, epoch=2))


# The document does not depend on the database: read it from an app that is never started.
# The stream of every job's events never ends by design, so a call cannot be read to its end:
# tests/api/test_events.py drives it instead. One job's stream ends with the job and is fuzzed.
schema = schemathesis.openapi.from_asgi(
    "/openapi.json", create_app(Settings()), config=CONFIG
).exclude(path="/v1/events")


@schema.parametrize()
def test_every_operation_answers_as_documented(
    case: schemathesis.Case, fuzz_app: tuple[FastAPI, dict[str, str]]
) -> None:
    app, headers = fuzz_app
    case.call_and_validate(app=app, headers=headers, checks=CHECKS)
