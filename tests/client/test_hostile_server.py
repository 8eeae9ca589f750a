"""What the client does when the answer is not the API's own: a proxy's page, a body that is
not JSON, a Retry-After it cannot read, a download cut short. Each is a TrainsvcError (the
CLI's one-line message), never a traceback from httpx, json or pydantic."""

import asyncio
import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from trainsvc_client import (
    AsyncClient,
    Client,
    ConnectionFailed,
    RateLimited,
    ServerError,
    UnexpectedResponse,
)

from tests.client.test_client import FAST, JOB, Script

CHECKPOINT = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
WEIGHTS = b"safetensors" * 1000
NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (
            httpx.Response(200, headers={"Content-Type": "text/html"}, text="<html>sign in</html>"),
            re.escape("200 with a text/html body, not JSON; is http://127.0.0.1:8000 a trainsvc"),
        ),
        (
            httpx.Response(200, headers={"Content-Type": "application/json"}, text="{oops"),
            "200 with a body that is not JSON",
        ),
        (httpx.Response(200, json={"hello": "world"}), "not the trainsvc API's"),
        (httpx.Response(200, json=["a", "list"]), "not the trainsvc API's"),
    ],
)
def test_a_success_that_is_not_the_apis_is_an_unexpected_response(
    answer: httpx.Response, says: str
) -> None:
    for call in (
        lambda client: client.get(JOB["id"]),
        lambda client: list(client.list()),
        lambda client: client.metrics(JOB["id"]),
        lambda client: client.checkpoints(JOB["id"]),
    ):
        with (
            Client(retry=FAST, transport=httpx.MockTransport(lambda _: answer)) as client,
            pytest.raises(UnexpectedResponse, match=says),
        ):
            call(client)


def test_a_report_may_still_be_text() -> None:
    csv = httpx.Response(200, headers={"Content-Type": "text/csv"}, text="n,mean\n2,0.5\n")
    with Client(retry=FAST, transport=httpx.MockTransport(lambda _: csv)) as client:
        assert client.study_report(CHECKPOINT, format="csv") == "n,mean\n2,0.5\n"
        with pytest.raises(UnexpectedResponse):
            client.study_report(CHECKPOINT)  # JSON was asked for


def test_a_proxys_error_page_is_named_by_its_status_not_printed() -> None:
    page = httpx.Response(502, headers={"Content-Type": "text/html"}, text=NGINX_502)
    with (
        Client(retry=FAST, transport=httpx.MockTransport(lambda _: page)) as client,
        pytest.raises(ServerError) as caught,
    ):
        client.get(JOB["id"])
    assert str(caught.value) == "502 http_error: Bad Gateway"


@pytest.mark.parametrize(
    "retry_after", ["soon", "Thu, 99 Foo 2026 25:61:00 GMT", "Wed, 21 Oct 2015 07:28:00 -0000"]
)
def test_a_retry_after_that_cannot_be_read_or_is_past_still_retries(retry_after: str) -> None:
    busy = httpx.Response(
        429, headers={"Retry-After": retry_after}, json={"error": "busy", "detail": "x"}
    )
    script = Script(busy, httpx.Response(200, json=JOB))
    with Client(retry=FAST, transport=httpx.MockTransport(script)) as client:
        assert str(client.get(JOB["id"]).id) == JOB["id"]
    script = Script(*[busy] * FAST.attempts)
    with (
        Client(retry=FAST, transport=httpx.MockTransport(script)) as client,
        pytest.raises(RateLimited) as caught,
    ):
        client.get(JOB["id"])
    assert caught.value.retry_after in (None, 0.0)


class CutShort(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A body whose connection is reset after its first half."""

    def __iter__(self) -> Iterator[bytes]:
        yield WEIGHTS[: len(WEIGHTS) // 2]
        raise httpx.ReadError("connection reset by peer")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield WEIGHTS[: len(WEIGHTS) // 2]
        raise httpx.ReadError("connection reset by peer")


def cut_short() -> httpx.Response:
    return httpx.Response(200, stream=CutShort())


def download(script: Script, target: Path, *, asynchronous: bool) -> Path:
    if not asynchronous:
        with Client(retry=FAST, transport=httpx.MockTransport(script)) as client:
            return client.download_checkpoint(JOB["id"], CHECKPOINT, target)

    async def fetch() -> Path:
        async with AsyncClient(retry=FAST, transport=httpx.MockTransport(script)) as client:
            return await client.download_checkpoint(JOB["id"], CHECKPOINT, target)

    return asyncio.run(fetch())


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_download_cut_short_is_retried_and_never_leaves_half_a_file(
    tmp_path: Path, asynchronous: bool
) -> None:
    target = tmp_path / "model.safetensors"
    script = Script(
        httpx.ConnectError("refused"),
        httpx.Response(503, headers={"Retry-After": "0"}, json={"error": "e", "detail": "d"}),
        cut_short(),
        httpx.Response(200, content=WEIGHTS),
    )
    assert download(script, target, asynchronous=asynchronous) == target
    assert target.read_bytes() == WEIGHTS

    # Cut short every time: a typed error; the file there before is untouched, nothing beside it.
    target.write_bytes(b"the previous download")
    script = Script(*(cut_short() for _ in range(FAST.attempts)))
    with pytest.raises(ConnectionFailed, match="connection reset by peer"):
        download(script, target, asynchronous=asynchronous)
    assert target.read_bytes() == b"the previous download"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.safetensors"]
