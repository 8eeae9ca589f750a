"""GET /v1/jobs/{id}/checkpoints: `last` first, as README shows, with created_at of the write."""

import time

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core import lifecycle
from app.core.lifecycle import CheckpointBlob
from tests.factories import METRICS, make_job


def _record(session: Session, job_id: object, epoch: int, kinds: tuple[str, ...]) -> None:
    blobs = [
        CheckpointBlob(kind, epoch, b"w", b"s" if kind == "last" else None, "0" * 64)
        for kind in kinds
    ]
    lifecycle.record_epoch(session, job_id, 1, epoch, METRICS, {}, blobs, 30)  # type: ignore[arg-type]
    session.commit()


def test_checkpoints_list_last_first_and_a_rewrite_moves_created_at(
    client: TestClient, session: Session
) -> None:
    job = make_job(session)
    assert lifecycle.claim(session, job.id, "w#1", 30) is not None
    _record(session, job.id, 1, ("best", "last"))
    before = client.get(f"/v1/jobs/{job.id}/checkpoints").json()["items"]
    assert [(c["kind"], c["epoch"]) for c in before] == [("last", 1), ("best", 1)]

    time.sleep(0.01)
    _record(session, job.id, 2, ("last",))
    after = client.get(f"/v1/jobs/{job.id}/checkpoints").json()["items"]
    assert [(c["kind"], c["epoch"]) for c in after] == [("last", 2), ("best", 1)]
    assert after[0]["id"] == before[0]["id"]
    assert after[0]["created_at"] > before[0]["created_at"]
    assert after[1] == before[1]
