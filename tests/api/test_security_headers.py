"""Every response tells a browser what it may do: a JSON answer, an error, a 413, the dashboard
and the study report alike. (The dashboard's browser tests fail on anything the policy blocks.)"""

from fastapi.testclient import TestClient

from app.api.security_headers import SECURITY_HEADERS
from tests.factories import spec_payload


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
