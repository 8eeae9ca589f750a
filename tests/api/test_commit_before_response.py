"""A 2xx means the write is stored: the commit happens before the response is sent.

FastAPI runs the exit code of a request-scoped `yield` dependency after the response has gone
out, so a session committed there could answer 2xx for a write that never landed. These tests
make the commit fail, and read the database at the very moment the response starts.
"""

import io
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import DataError, DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.main import create_app
from app.core.config import Settings
from app.core.db import create_db_engine
from app.core.migrate import upgrade
from app.core.models import Dataset, Job
from tests.factories import spec_payload


def _npz_bytes() -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(0)
    np.savez(buffer, x=rng.normal(size=(20, 3)), y=np.arange(20) % 2)
    return buffer.getvalue()


def _fail_commits(factory: sessionmaker[Session], error: Exception) -> Callable[[Session], None]:
    def fail(_session: Session) -> None:
        raise error

    event.listen(factory, "before_commit", fail)
    return fail


DATABASE_AWAY = [
    OperationalError("COMMIT", {}, Exception("server closed the connection")),
    InterfaceError("COMMIT", {}, Exception("connection already closed")),
    DBAPIError("COMMIT", {}, Exception("connection reset"), connection_invalidated=True),
]


@pytest.mark.parametrize("error", DATABASE_AWAY, ids=lambda e: type(e).__name__)
def test_failed_commit_of_a_cancel_is_503_and_the_job_stays_queued(
    client: TestClient, session_factory: sessionmaker[Session], session: Session, error: Exception
) -> None:
    job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
    fail = _fail_commits(session_factory, error)
    try:
        response = client.post(f"/v1/jobs/{job_id}/cancel")
    finally:
        event.remove(session_factory, "before_commit", fail)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "database_unavailable"
    assert response.headers["Retry-After"]
    session.expire_all()
    job = session.get(Job, uuid.UUID(job_id))
    assert job is not None
    assert job.status == "queued"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"


def test_failed_commit_of_a_submit_or_an_upload_is_never_a_2xx(
    client: TestClient, session_factory: sessionmaker[Session], session: Session
) -> None:
    fail = _fail_commits(session_factory, DATABASE_AWAY[0])
    try:
        submitted = client.post("/v1/jobs", json=spec_payload())
        uploaded = client.post(
            "/v1/datasets", files={"file": ("data.npz", _npz_bytes(), "application/octet-stream")}
        )
    finally:
        event.remove(session_factory, "before_commit", fail)
    assert submitted.status_code == 503, submitted.text
    assert uploaded.status_code == 503, uploaded.text
    session.expire_all()
    assert session.scalars(select(Job)).all() == []
    assert session.scalars(select(Dataset)).all() == []


# -- read your write: at the moment a 2xx starts, the row is committed -------------------------


class _ReadAtResponseStart:
    """ASGI wrapper: when the response starts, run `check` (a read from another connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.check: Callable[[], Any] | None = None
        self.seen: list[Any] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def checking_send(message: Message) -> None:
            if message["type"] == "http.response.start" and self.check is not None:
                self.seen.append(self.check())
            await send(message)

        await self.app(scope, receive, checking_send)


@pytest.fixture(params=["sqlite", "postgres"])
def committed_database(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    """A database of the test's own: another connection sees only what was committed."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
        upgrade(url)
        yield url
    else:
        yield request.getfixturevalue("fresh_postgres_url")


def test_a_2xx_write_is_committed_before_the_response_starts(
    committed_database: str, redis_url: str
) -> None:
    app = create_app(Settings(database_url=committed_database, broker_url=redis_url, auth="off"))
    wrapped = _ReadAtResponseStart(app)
    reader: Engine = create_db_engine(committed_database)

    def stored_status(job_id: str) -> Callable[[], Any]:
        def read() -> Any:
            with Session(reader) as session:
                return session.scalar(select(Job.status).where(Job.id == uuid.UUID(job_id)))

        return read

    def dataset_count() -> int:
        with Session(reader) as session:
            return len(session.scalars(select(Dataset.id)).all())

    try:
        with TestClient(wrapped) as client:
            job_id = client.post("/v1/jobs", json=spec_payload()).json()["id"]
            wrapped.check = stored_status(job_id)
            response = client.post(f"/v1/jobs/{job_id}/cancel")
            assert response.status_code == 202
            assert wrapped.seen == ["cancelled"]

            wrapped.check = dataset_count
            response = client.post(
                "/v1/datasets",
                files={"file": ("data.npz", _npz_bytes(), "application/octet-stream")},
            )
            assert response.status_code == 201, response.text
            assert wrapped.seen[-1] == 1
            names = [item["name"] for item in client.get("/v1/datasets").json()["items"]]
            assert response.json()["name"] in names
    finally:
        reader.dispose()


def test_a_value_the_database_refuses_is_a_422_not_a_500(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    # Validation should stop such values first; one that slips through is still not a 500.
    fail = _fail_commits(session_factory, DataError("INSERT", {}, Exception("invalid input")))
    try:
        response = client.post("/v1/jobs", json=spec_payload())
    finally:
        event.remove(session_factory, "before_commit", fail)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "validation_error"
