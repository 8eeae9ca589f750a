"""Ids go into URL paths, so the client sends only UUIDs: any other id is an InvalidId before a
request leaves (`get("../studies")` was a GET of /v1/studies, `cancel("../studies/<id>")`
a study's cancel, and `get("a\\tb")` an httpx.InvalidURL)."""

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from trainsvc_client import AsyncClient, Client, InvalidId, TrainsvcError

from tests.client.test_client import FAST, JOB

GOOD = uuid.UUID(str(JOB["id"]))
STUDY = uuid.UUID("0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0")
BAD_IDS = ["../studies", f"../studies/{STUDY}", "a\tb", "", f"{GOOD}/cancel", f"{GOOD}?x=1", 7]


class Recorder:
    """A transport that answers every request with a job and records its path."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return httpx.Response(200, json={**JOB, "status": "succeeded"})


def sync_calls(client: Client, bad: Any, path: Path) -> dict[str, Callable[[], Any]]:
    return {
        "get": lambda: client.get(bad),
        "cancel": lambda: client.cancel(bad),
        "metrics": lambda: client.metrics(bad),
        "checkpoints": lambda: client.checkpoints(bad),
        "download_checkpoint job": lambda: client.download_checkpoint(bad, GOOD, path),
        "download_checkpoint checkpoint": lambda: client.download_checkpoint(GOOD, bad, path),
        "events": lambda: list(client.events(bad)),
        "wait": lambda: client.wait(bad),
        "list": lambda: list(client.list(study_id=bad)),
        "get_study": lambda: client.get_study(bad),
        "study_report": lambda: client.study_report(bad),
        "cancel_study": lambda: client.cancel_study(bad),
    }


def async_calls(
    client: AsyncClient, bad: Any, path: Path
) -> dict[str, Callable[[], Awaitable[Any]]]:
    async def events() -> Any:
        return [event async for event in client.events(bad)]

    async def listed() -> Any:
        return [job async for job in client.list(study_id=bad)]

    return {
        "get": lambda: client.get(bad),
        "cancel": lambda: client.cancel(bad),
        "metrics": lambda: client.metrics(bad),
        "checkpoints": lambda: client.checkpoints(bad),
        "download_checkpoint job": lambda: client.download_checkpoint(bad, GOOD, path),
        "download_checkpoint checkpoint": lambda: client.download_checkpoint(GOOD, bad, path),
        "events": events,
        "wait": lambda: client.wait(bad),
        "list": listed,
        "get_study": lambda: client.get_study(bad),
        "study_report": lambda: client.study_report(bad),
        "cancel_study": lambda: client.cancel_study(bad),
    }


@pytest.mark.parametrize("bad", BAD_IDS)
def test_every_sync_method_refuses_an_id_that_is_not_a_uuid_before_sending(
    bad: Any, tmp_path: Path
) -> None:
    recorder = Recorder()
    with Client(retry=FAST, transport=httpx.MockTransport(recorder)) as client:
        for name, call in sync_calls(client, bad, tmp_path / "model.safetensors").items():
            with pytest.raises(InvalidId) as refused:
                call()
            assert repr(bad) in refused.value.message, name
    assert recorder.paths == []
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("bad", BAD_IDS)
def test_every_async_method_refuses_an_id_that_is_not_a_uuid_before_sending(
    bad: Any, tmp_path: Path
) -> None:
    recorder = Recorder()

    async def refuse_each() -> None:
        async with AsyncClient(retry=FAST, transport=httpx.MockTransport(recorder)) as client:
            for name, call in async_calls(client, bad, tmp_path / "model.safetensors").items():
                with pytest.raises(InvalidId) as refused:
                    await call()
                assert repr(bad) in refused.value.message, name

    asyncio.run(refuse_each())
    assert recorder.paths == []


def test_invalid_id_is_a_value_error_and_a_trainsvc_error_naming_the_kind_of_id() -> None:
    with Client(transport=httpx.MockTransport(Recorder())) as client:
        with pytest.raises(InvalidId) as job:
            client.get("../studies")
        with pytest.raises(InvalidId) as study:
            client.cancel_study("x")
        with pytest.raises(InvalidId) as checkpoint:
            client.download_checkpoint(GOOD, "x", "unused")
    assert job.value.message == "job id must be a UUID, not '../studies'"
    assert study.value.message == "study id must be a UUID, not 'x'"
    assert checkpoint.value.message == "checkpoint id must be a UUID, not 'x'"
    assert isinstance(job.value, ValueError)
    assert isinstance(job.value, TrainsvcError)


def test_a_uuid_in_any_of_its_spellings_goes_out_in_canonical_form() -> None:
    recorder = Recorder()
    with Client(transport=httpx.MockTransport(recorder)) as client:
        for spelling in (GOOD, str(GOOD), str(GOOD).upper(), GOOD.hex, f"{{{GOOD}}}"):
            assert client.get(spelling).id == GOOD
        client.cancel(GOOD)
        client.cancel_study(str(STUDY).upper())
    assert recorder.paths == [
        *[f"/v1/jobs/{GOOD}"] * 5,
        f"/v1/jobs/{GOOD}/cancel",
        f"/v1/studies/{STUDY}/cancel",
    ]


def test_list_sends_a_study_id_in_canonical_form() -> None:
    requests: list[httpx.Request] = []

    def page(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return httpx.Response(200, json={"items": [JOB], "next_cursor": None})

    with Client(transport=httpx.MockTransport(page)) as client:
        assert [job.id for job in client.list(study_id=STUDY.hex)] == [GOOD]
    assert requests[0].url.params["study_id"] == str(STUDY)
