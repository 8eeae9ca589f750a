"""The Python client: retries, typed errors, idempotent submits, then a real service."""

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from safetensors import safe_open
from trainsvc_client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    InvalidRequest,
    NotFound,
    RateLimited,
    RetryPolicy,
    WaitTimedOut,
)

from tests.e2e.walkthrough import SPEC
from tests.support.processes import Processes

FAST = RetryPolicy(attempts=4, backoff_seconds=0.01, max_backoff_seconds=0.05)
JOB = {
    "id": "6b3f2a52-8d7e-4a53-9a51-6c1c1e7f5d10",
    "status": "queued",
    "spec": {},
    "created_at": "2026-11-25T00:00:00Z",
    "progress": {"epoch": 0, "epochs": 3},
}


class Script:
    """A transport that answers a fixed sequence of responses and records each request."""

    def __init__(self, *responses: httpx.Response | Exception) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.responses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_429_and_503_are_retried_honouring_retry_after_with_one_idempotency_key() -> None:
    script = Script(
        httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "x", "detail": "busy"}),
        httpx.Response(503, json={"error": "database_unavailable", "detail": "away"}),
        httpx.Response(201, json=JOB),
    )
    with Client(retry=FAST, transport=httpx.MockTransport(script)) as client:
        job = client.submit({"dataset": {"name": "digits"}, "epochs": 3})
    assert str(job.id) == JOB["id"]
    keys = {request.headers["Idempotency-Key"] for request in script.requests}
    assert len(script.requests) == 3
    assert len(keys) == 1


def test_connection_errors_are_retried_then_raised_as_connection_failed() -> None:
    refused = httpx.ConnectError("refused")
    script = Script(refused, httpx.Response(200, json=JOB))
    with Client(retry=FAST, transport=httpx.MockTransport(script)) as client:
        assert client.get(JOB["id"]).status == "queued"
        script.responses = [refused] * FAST.attempts
        with pytest.raises(ConnectionFailed):
            client.get(JOB["id"])


def test_a_limit_that_outlasts_the_retries_is_a_typed_error_with_the_api_code() -> None:
    busy = httpx.Response(
        429, headers={"Retry-After": "0"}, json={"error": "too_many", "detail": "x"}
    )
    script = Script(*[busy] * FAST.attempts)
    with (
        Client(retry=FAST, transport=httpx.MockTransport(script)) as client,
        pytest.raises(RateLimited) as caught,
    ):
        client.get(JOB["id"])
    assert caught.value.code == "too_many"
    assert caught.value.status_code == 429


def test_async_client_retries_the_same_way() -> None:
    script = Script(
        httpx.Response(503, json={"error": "e", "detail": "d"}), httpx.Response(201, json=JOB)
    )

    async def submit() -> Any:
        async with AsyncClient(retry=FAST, transport=httpx.MockTransport(script)) as client:
            return await client.submit({"dataset": {"name": "digits"}, "epochs": 3})

    assert str(asyncio.run(submit()).id) == JOB["id"]
    assert len({r.headers["Idempotency-Key"] for r in script.requests}) == 1


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_a_service_submits_waits_and_reads_results_through_the_client(
    processes: Processes, tmp_path: Path
) -> None:
    url = processes.api("up")
    with Client(url) as client:
        with pytest.raises(InvalidRequest) as invalid:
            client.submit({**SPEC, "epochs": 0})
        assert invalid.value.code == "validation_error"
        assert invalid.value.detail[0]["field"] == "epochs"
        with pytest.raises(NotFound):
            client.get("00000000-0000-0000-0000-000000000000")

        job = client.submit({**SPEC, "epochs": 3}, idempotency_key="client-e2e")
        assert client.submit({**SPEC, "epochs": 3}, idempotency_key="client-e2e").id == job.id
        with pytest.raises(WaitTimedOut):
            client.wait(job.id, timeout=0.01)
        seen: list[Any] = []
        done = client.wait(job.id, timeout=180, on_event=seen.append, poll_interval=0.2)
        assert done.status == "succeeded", done.error
        assert (done.study_id, done.pack) == (None, None)  # submitted alone, trained alone
        assert [epoch.epoch for epoch in client.metrics(job.id)] == [1, 2, 3]
        assert job.id in {listed.id for listed in client.list(page_size=1)}

        last = next(c for c in client.checkpoints(job.id) if c.kind == "last")
        path = client.download_checkpoint(job.id, last.id, tmp_path / "model.safetensors")
        with safe_open(str(path), framework="numpy") as weights:
            assert len(list(weights.keys())) > 0
        # Every epoch event the stream delivered (if it delivered any) arrived once.
        epochs = [json.loads(e.data)["epoch"] for e in seen if e.event == "epoch"]
        assert len(epochs) == len(set(epochs))

        # A study's jobs, as the client types them: their study, grid point and pack (two
        # seeds of one computation train as one pack).
        study = client.create_study(
            {"name": "seeds", "base": {**SPEC, "epochs": 2}, "grid": {"seed": [0, 1]}}
        )
        jobs = [client.wait(job["id"], timeout=180) for job in study["jobs"]]
        assert [job.status for job in jobs] == ["succeeded", "succeeded"]
        assert {job.study_id for job in jobs} == {uuid.UUID(study["id"])}
        assert sorted(job.grid_point["seed"] for job in jobs if job.grid_point) == [0, 1]
        assert isinstance(jobs[0].pack, uuid.UUID)
        assert jobs[1].pack == jobs[0].pack
