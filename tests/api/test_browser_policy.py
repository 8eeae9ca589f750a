"""What a browser may do. Every response carries the security headers: a JSON answer, an error,
a 413, the dashboard and the study report alike (the dashboard's browser tests fail on anything
the policy blocks). Pages of other origins may call the API only where TRAINSVC_CORS_ORIGINS
lists them (a real browser: tests/dashboard/test_cross_origin.py)."""

from collections.abc import Callable

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from app.api.browser_policy import (
    CORS_REQUEST_HEADERS,
    DOCS_CONTENT_SECURITY_POLICY,
    SECURITY_HEADERS,
)
from app.api.main import create_app
from app.core.config import Settings
from tests.conftest import use_test_sessions
from tests.factories import spec_payload
from tests.support.documented import documented_client


def test_every_kind_of_response_carries_the_security_headers(client: TestClient) -> None:
    study = client.post(
        "/v1/studies", json={"base": spec_payload(), "grid": {"seed": [0, 1]}}
    ).json()
    responses = {
        "json": client.get("/v1/jobs"),
        "created": client.post("/v1/jobs", json=spec_payload()),
        "not found": client.get("/v1/nowhere"),
        "unauthorized": client.get("/v1/jobs", headers={"Authorization": "Bearer nonsense"}),
        "invalid": client.post("/v1/jobs", json={"epochs": "many"}),
        "too large": client.post("/v1/jobs", content=b"x" * 10**6),
        "report": client.get(f"/v1/studies/{study['id']}/report", params={"format": "html"}),
        "dashboard": client.get("/"),
        "dashboard script": client.get("/app.js"),
    }
    expected = {
        "json": 200,
        "created": 201,
        "not found": 404,
        "unauthorized": 401,
        "invalid": 422,
        "too large": 413,
        "report": 200,
        "dashboard": 200,
        "dashboard script": 200,
    }
    assert {name: r.status_code for name, r in responses.items()} == expected
    for name, response in responses.items():
        for header, value in SECURITY_HEADERS.items():
            assert response.headers.get(header) == value, (name, header)
    policy = responses["dashboard"].headers["Content-Security-Policy"]
    assert "script-src 'self';" in policy  # no inline script, no eval
    assert "frame-ancestors 'none'" in policy
    # FastAPI's docs pages load Swagger UI and ReDoc from a CDN: they, and only they, may.
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        docs = client.get(path)
        assert docs.headers["Content-Security-Policy"] == DOCS_CONTENT_SECURITY_POLICY, path
    assert "cdn.jsdelivr.net" not in policy


DASHBOARD = "https://dash.example.com"


def test_without_listed_origins_no_other_page_may_read_an_answer(client: TestClient) -> None:
    response = client.get("/v1/jobs", headers={"Origin": DASHBOARD})
    assert response.status_code == 200
    assert "Access-Control-Allow-Origin" not in response.headers
    preflight = client.options(
        "/v1/jobs", headers={"Origin": DASHBOARD, "Access-Control-Request-Method": "POST"}
    )
    assert "Access-Control-Allow-Origin" not in preflight.headers


def test_a_listed_origin_may_call_with_a_key_and_read_what_the_api_sets(
    settings: Settings,
    session_factory: sessionmaker[Session],
    key_headers: Callable[..., dict[str, str]],
) -> None:
    app = create_app(settings.model_copy(update={"cors_origins": [DASHBOARD]}))
    with documented_client(app, raise_server_exceptions=False) as browser:
        use_test_sessions(app, session_factory)
        browser.headers.update(key_headers())
        # What fetch() asks before a POST with a key, a JSON body and an Idempotency-Key.
        preflight = browser.options(
            "/v1/jobs",
            headers={
                "Origin": DASHBOARD,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["Access-Control-Allow-Origin"] == DASHBOARD
        assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
        allowed = {
            h.strip().lower() for h in preflight.headers["Access-Control-Allow-Headers"].split(",")
        }
        assert {h.lower() for h in CORS_REQUEST_HEADERS} <= allowed
        assert "Access-Control-Allow-Credentials" not in preflight.headers  # keys, not cookies

        created = browser.post("/v1/jobs", json=spec_payload(), headers={"Origin": DASHBOARD})
        assert created.status_code == 201
        job = browser.get(f"/v1/jobs/{created.json()['id']}", headers={"Origin": DASHBOARD})
        assert job.headers["Access-Control-Allow-Origin"] == DASHBOARD
        exposed = {h.strip() for h in job.headers["Access-Control-Expose-Headers"].split(",")}
        assert {"ETag", "Retry-After", "X-Request-ID"} <= exposed
        # An error is readable too: a page can show why.
        missing = browser.get("/v1/nowhere", headers={"Origin": DASHBOARD})
        assert missing.status_code == 404
        assert missing.headers["Access-Control-Allow-Origin"] == DASHBOARD

        # Another origin gets nothing that would let its page read the answer.
        other = browser.get("/v1/jobs", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in other.headers
        refused = browser.options(
            "/v1/jobs",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert refused.status_code == 400
        assert "Access-Control-Allow-Origin" not in refused.headers
