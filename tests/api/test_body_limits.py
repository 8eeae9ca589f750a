"""Body limits: a body over the limit is a 413 naming it, whether it declares its length or
arrives chunked, in the test client and through a real uvicorn server."""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.migrate import upgrade
from tests.factories import spec_payload
from tests.support.processes import Processes

BODY_LIMIT, UPLOAD_LIMIT = 4096, 64 * 1024


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=redis_url,
        max_body_bytes=BODY_LIMIT,
        max_upload_bytes=UPLOAD_LIMIT,
    )


def chunks(total: int, size: int = 1024) -> Iterator[bytes]:
    """A body of `total` bytes as a generator: httpx sends it chunked, with no Content-Length."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def multipart_chunks(total: int) -> Iterator[bytes]:
    boundary = b"limit-test"
    yield b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="a.csv"'
    yield b"\r\nContent-Type: text/csv\r\n\r\nlabel,a\r\n"
    yield from (b"0,1\r\n" * 200 for _ in range(total // 1000))
    yield b"\r\n--" + boundary + b"--\r\n"


MULTIPART = {"content-type": "multipart/form-data; boundary=limit-test"}


def assert_413_naming(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 413, response.text
    assert response.json() == {
        "error": "payload_too_large",
        "detail": f"request body over the limit of {limit} bytes",
    }


def test_chunked_json_body_over_the_limit_is_413(client: TestClient) -> None:
    request = client.build_request(
        "POST",
        "/v1/jobs",
        content=chunks(BODY_LIMIT * 4),
        headers={"content-type": "application/json"},
    )
    assert "content-length" not in request.headers
    assert_413_naming(client.send(request), BODY_LIMIT)


def test_chunked_upload_over_the_limit_is_413(client: TestClient) -> None:
    request = client.build_request(
        "POST", "/v1/datasets", content=multipart_chunks(UPLOAD_LIMIT * 2), headers=MULTIPART
    )
    assert "content-length" not in request.headers
    assert_413_naming(client.send(request), UPLOAD_LIMIT)


def test_declared_length_over_the_limit_is_413(client: TestClient) -> None:
    response = client.post("/v1/jobs", content=b"x" * (BODY_LIMIT + 1))
    assert_413_naming(response, BODY_LIMIT)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/health"), ("GET", "/v1/jobs"), ("DELETE", "/v1/jobs/{id}"), ("GET", "/metrics")],
)
def test_an_oversized_body_is_413_on_any_operation_and_documented(
    client: TestClient, method: str, path: str
) -> None:
    """The limit refuses before routing, so operations that take no body answer it too; the
    client fixture fails the test if OpenAPI does not declare that 413."""
    url = path.replace("{id}", "00000000-0000-0000-0000-000000000001")
    response = client.request(method, url, content=b"x" * (BODY_LIMIT + 1))
    assert_413_naming(response, BODY_LIMIT)


def test_a_head_over_the_limit_is_431_on_any_operation(
    client: TestClient, settings: Settings
) -> None:
    limit = settings.http_max_header_bytes
    near = {"X-Padding": "a" * (limit - 500)}
    assert client.get("/v1/health", headers=near).status_code == 200
    over = {"X-Padding": "a" * limit}
    for method, path in (("GET", "/v1/health"), ("POST", "/v1/jobs")):
        response = client.request(method, path, headers=over)
        assert response.status_code == 431, response.text
        assert response.json() == {
            "error": "headers_too_large",
            "detail": f"request line and headers over the limit of {limit} bytes",
        }


def test_chunked_body_under_the_limit_is_served(client: TestClient) -> None:
    body = json.dumps(spec_payload()).encode()
    assert len(body) < BODY_LIMIT
    request = client.build_request(
        "POST",
        "/v1/jobs",
        content=iter([body[:100], body[100:]]),
        headers={"content-type": "application/json"},
    )
    assert client.send(request).status_code == 201


@pytest.mark.e2e
def test_chunked_bodies_over_the_limit_are_413_through_uvicorn(
    processes: Processes, tmp_path: Path
) -> None:
    database_url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(database_url)
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": database_url,
            "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.db'}",
            "TRAINSVC_MAX_BODY_BYTES": str(BODY_LIMIT),
            "TRAINSVC_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        }
    )
    url = processes.api()
    with httpx.Client(base_url=url, timeout=30) as http:
        json_headers = {"content-type": "application/json"}
        # Just over the limit, and far over it: the server answers without reading it all.
        for total in (BODY_LIMIT + 1, 64 * BODY_LIMIT):
            response = http.post("/v1/jobs", content=chunks(total), headers=json_headers)
            assert_413_naming(response, BODY_LIMIT)
        response = http.post(
            "/v1/datasets", content=multipart_chunks(UPLOAD_LIMIT * 2), headers=MULTIPART
        )
        assert_413_naming(response, UPLOAD_LIMIT)
        assert http.get("/v1/health").status_code == 200
