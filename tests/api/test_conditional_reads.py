"""Conditional status reads: ETag and If-None-Match -> 304 on a job and its metrics."""

import json
import math
import uuid
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.jobs.schemas import EpochRead, MetricsRead, metrics_json
from app.core import lifecycle
from app.core.models import EpochMetric
from tests.factories import spec_payload

METRICS = {
    "train_loss": 0.5,
    "train_accuracy": 0.8,
    "val_loss": 0.6,
    "val_accuracy": 0.75,
    "lr": 0.1,
    "epoch_seconds": 0.01,
}
DIAGNOSTICS = {
    "generalization_gap": 0.1,
    "layers": [{"name": "net.0", "kind": "Linear", "weight_norm": 1.5, "grad_norm": 1e-05}],
}


def _submit(client: TestClient) -> str:
    response = client.post("/v1/jobs", json=spec_payload())
    assert response.status_code == 201
    job_id: str = response.json()["id"]
    return job_id


def _epoch(session: Session, job_id: str, attempt: int, epoch: int, **metrics: float) -> None:
    lifecycle.record_epoch(
        session, uuid.UUID(job_id), attempt, epoch, {**METRICS, **metrics}, DIAGNOSTICS, [], 30
    )
    session.commit()


def test_a_job_read_is_304_until_the_job_changes(client: TestClient) -> None:
    job_id = _submit(client)
    first = client.get(f"/v1/jobs/{job_id}")
    etag = first.headers["etag"]
    assert first.status_code == 200
    assert etag.startswith('"')

    again = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    # Weak comparison, as RFC 9110 asks of If-None-Match: a list, a W/ tag, or *.
    for header in (f'"nope", {etag}', f"W/{etag}", "*"):
        assert (
            client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": header}).status_code == 304
        )
    assert client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": '"nope"'}).status_code == 200

    assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
    changed = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etag})
    assert changed.status_code == 200
    assert changed.json()["status"] == "cancelled"
    assert changed.headers["etag"] != etag
    assert (
        client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": changed.headers["etag"]})
    ).status_code == 304


def test_a_claim_and_an_epoch_change_the_jobs_etag(client: TestClient, session: Session) -> None:
    job_id = _submit(client)
    etags = [client.get(f"/v1/jobs/{job_id}").headers["etag"]]
    claim = lifecycle.claim(session, uuid.UUID(job_id), "w1#1", 30)
    assert claim is not None
    session.commit()
    claimed = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etags[0]})
    assert claimed.status_code == 200
    assert claimed.json()["attempt_history"][0]["worker_id"] == "w1#1"
    etags.append(claimed.headers["etag"])
    _epoch(session, job_id, claim.attempt, 1)
    progressed = client.get(f"/v1/jobs/{job_id}", headers={"If-None-Match": etags[1]})
    assert progressed.status_code == 200
    assert progressed.json()["progress"]["epoch"] == 1
    etags.append(progressed.headers["etag"])
    assert len(set(etags)) == 3


def test_metrics_are_304_until_an_epoch_is_stored_or_rerun(
    client: TestClient, session: Session
) -> None:
    job_id = _submit(client)
    url = f"/v1/jobs/{job_id}/metrics"
    empty = client.get(url)
    assert empty.json()["epochs"] == []
    claim = lifecycle.claim(session, uuid.UUID(job_id), "w1#1", 30)
    assert claim is not None
    _epoch(session, job_id, claim.attempt, 1)
    one = client.get(url, headers={"If-None-Match": empty.headers["etag"]})
    assert one.status_code == 200
    assert len(one.json()["epochs"]) == 1
    assert client.get(url, headers={"If-None-Match": one.headers["etag"]}).status_code == 304

    _epoch(session, job_id, claim.attempt, 2)
    two = client.get(url, headers={"If-None-Match": one.headers["etag"]})
    assert two.status_code == 200
    assert len(two.json()["epochs"]) == 2
    # since_epoch is another representation, with its own tag.
    since = client.get(url, params={"since_epoch": 1})
    assert [e["epoch"] for e in since.json()["epochs"]] == [2]
    assert since.headers["etag"] != two.headers["etag"]
    conditional = {"If-None-Match": since.headers["etag"]}
    assert client.get(url, params={"since_epoch": 1}, headers=conditional).status_code == 304

    # A resumed attempt trains epoch 2 again: the overwrite is a change.
    lifecycle.hand_back(session, uuid.UUID(job_id), claim.attempt)
    session.commit()
    again = lifecycle.claim(session, uuid.UUID(job_id), "w2#1", 30)
    assert again is not None
    assert again.attempt == 2
    _epoch(session, job_id, again.attempt, 2, val_accuracy=0.9)
    rerun = client.get(url, headers={"If-None-Match": two.headers["etag"]})
    assert rerun.status_code == 200
    assert [(e["attempt"], e["val_accuracy"]) for e in rerun.json()["epochs"]] == [
        (1, 0.75),
        (2, 0.9),
    ]
    assert client.get(url, params={"since_epoch": 1}, headers=conditional).status_code == 200


def test_metrics_read_is_what_the_model_would_write(client: TestClient, session: Session) -> None:
    job_id = _submit(client)
    claim = lifecycle.claim(session, uuid.UUID(job_id), "w1#1", 30)
    assert claim is not None
    for epoch in (1, 2, 3):
        _epoch(session, job_id, claim.attempt, epoch, train_loss=1 / epoch)
    rows = session.scalars(
        select(EpochMetric).where(EpochMetric.job_id == uuid.UUID(job_id)).order_by("epoch")
    ).all()
    expected = MetricsRead(job_id=uuid.UUID(job_id), epochs=[EpochRead.from_row(r) for r in rows])
    response = client.get(f"/v1/jobs/{job_id}/metrics")
    assert response.headers["content-type"] == "application/json"
    assert response.json() == expected.model_dump(mode="json")


def test_stored_nan_comes_out_as_null_like_pydantic_writes_it() -> None:
    job_id = uuid.uuid4()
    stored = json.dumps({"grad_norm_max": math.nan, "layers": [{"grad_norm": math.inf}]})
    row: list[Any] = [1, 1, math.nan, 0.5, 0.5, 0.5, 0.1, 0.01, stored]
    document = json.loads(metrics_json(job_id, [row, [*row[:-1], "{}"]]))
    assert document["epochs"][0]["train_loss"] is None
    assert document["epochs"][0]["grad_norm_max"] is None
    assert document["epochs"][0]["layers"] == [{"grad_norm": None}]
    assert list(document["epochs"][1]) == list(EpochRead.model_fields)  # no diagnostics


def test_another_tenants_if_none_match_is_still_404(
    client: TestClient, key_headers: Callable[..., dict[str, str]]
) -> None:
    job_id = _submit(client)
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/metrics"):
        etag = client.get(path).headers["etag"]
        other = {**key_headers("beta"), "If-None-Match": etag}
        response = client.get(path, headers=other)
        assert response.status_code == 404
        assert response.json()["error"] == "job_not_found"
        assert "etag" not in response.headers
        for header in ("*", etag):
            answer = client.get(path, headers={**other, "If-None-Match": header})
            assert answer.status_code == 404
