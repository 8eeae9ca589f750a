"""Client.wait across an outage longer than a call's retries, and a job that ends meanwhile."""

import asyncio
import json
from typing import Any

import httpx
import pytest
from trainsvc_client import AsyncClient, Client, RetryPolicy, ServerSentEvent, WaitTimedOut

from tests.client.test_client import JOB, Script

# Two tries a call: an outage of three failed connections outlasts one call's retries.
SHORT = RetryPolicy(attempts=2, backoff_seconds=0.01, max_backoff_seconds=0.01)
DOWN = httpx.ConnectError("connection refused")


def job(status: str, epoch: int) -> httpx.Response:
    return httpx.Response(
        200, json={**JOB, "status": status, "progress": {"epoch": epoch, "epochs": 2}}
    )


def stream(*events: tuple[int, str, dict[str, Any]]) -> httpx.Response:
    text = "".join(
        f"id: {i}\nevent: {kind}\ndata: {json.dumps(data)}\n\n" for i, kind, data in events
    )
    return httpx.Response(200, headers={"Content-Type": "text/event-stream"}, text=text)


def script() -> Script:
    """Running; the stream gives epoch 1 and drops; the API is away for three connections;
    back, the job has ended: the events it missed come from the stream after the last id."""
    return Script(
        job("running", 0),
        stream((1, "epoch", {"epoch": 1})),
        DOWN,
        DOWN,
        DOWN,
        job("succeeded", 2),
        stream((2, "epoch", {"epoch": 2}), (3, "status", {"status": "succeeded"})),
    )


def _check(seen: list[ServerSentEvent], answered: Script, status: str) -> None:
    assert status == "succeeded"
    assert [event.id for event in seen] == ["1", "2", "3"]
    assert answered.requests[-1].headers["Last-Event-ID"] == "1"
    assert answered.responses == []


def test_wait_outlasts_an_outage_and_hands_on_what_it_missed() -> None:
    answered = script()
    seen: list[ServerSentEvent] = []
    with Client(retry=SHORT, transport=httpx.MockTransport(answered)) as client:
        ended = client.wait(JOB["id"], timeout=30, on_event=seen.append, poll_interval=0.01)
    _check(seen, answered, ended.status)


def test_async_wait_does_the_same() -> None:
    answered = script()
    seen: list[ServerSentEvent] = []

    async def follow() -> str:
        transport = httpx.MockTransport(answered)
        async with AsyncClient(retry=SHORT, transport=transport) as client:
            ended = await client.wait(
                JOB["id"], timeout=30, on_event=seen.append, poll_interval=0.01
            )
            return ended.status

    _check(seen, answered, asyncio.run(follow()))


def refused(status: int) -> httpx.Response:
    return httpx.Response(status, headers={"Retry-After": "0"}, json={"error": "e", "detail": "d"})


def refusals() -> Script:
    """The API over a limit or away for longer than a call's retries (get, then the stream);
    then a stream that is empty (a stopping API, a proxy); then the job ends."""
    return Script(
        refused(503),
        refused(503),
        job("running", 0),
        refused(429),  # the stream, once: not retried by itself
        job("running", 0),
        stream(),
        job("running", 1),
        stream((2, "status", {"status": "succeeded"})),
        job("succeeded", 2),
    )


def test_wait_rides_out_refusals_of_the_job_and_of_its_stream() -> None:
    answered = refusals()
    with Client(retry=SHORT, transport=httpx.MockTransport(answered)) as client:
        ended = client.wait(JOB["id"], timeout=30, poll_interval=0.01)
    assert ended.status == "succeeded"
    assert answered.responses == []


def test_async_wait_rides_them_out_too() -> None:
    answered = refusals()

    async def follow() -> str:
        async with AsyncClient(retry=SHORT, transport=httpx.MockTransport(answered)) as client:
            return (await client.wait(JOB["id"], timeout=30, poll_interval=0.01)).status

    assert asyncio.run(follow()) == "succeeded"
    assert answered.responses == []


def test_a_stream_that_is_always_empty_is_polled_not_reconnected_at_once() -> None:
    requests: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        return stream() if request.url.path.endswith("/events") else job("running", 0)

    with (
        Client(retry=SHORT, transport=httpx.MockTransport(answer)) as client,
        pytest.raises(WaitTimedOut),
    ):
        client.wait(JOB["id"], timeout=0.5, poll_interval=0.1)
    assert len(requests) < 20  # a reconnect at once made thousands in half a second
