"""Tenant isolation, generated from the OpenAPI document, and the data lifecycle and quotas.

Tenant "alpha" owns a job (ended, with metrics and a checkpoint) and an upload. For every
operation the service documents: without a key it is a 401; with tenant "beta"'s key, alpha's
ids are a 404 exactly like unknown ids; no list shows beta anything of alpha's.
"""

import io
import math
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.auth import get_caller
from app.core.config import Settings
from app.core.models import Checkpoint, EpochMetric, Job
from app.core.studies.presets import PRESETS
from tests.factories import make_checkpoint, make_epoch, make_job, spec_payload

KeyHeaders = Callable[..., dict[str, str]]
# /metrics needs no key by default (TRAINSVC_METRICS_REQUIRE_KEY; tests/test_metrics.py).
PUBLIC_PATHS = {"/v1/health", "/v1/ready", "/metrics"}
# Lists of the service's own catalog, the same for every tenant.
CATALOG_PATHS = {"/v1/studies/presets"}
UUID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def npz_upload(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.normal(size=(40, 3)), y=np.arange(40) % 2)
    return buffer.getvalue()


def upload(client: TestClient, headers: dict[str, str], seed: int = 0) -> Response:
    return client.post("/v1/datasets", files={"file": ("d.npz", npz_upload(seed))}, headers=headers)


def ended_job(session: Session, tenant: str) -> tuple[Job, Checkpoint]:
    job = make_job(session, status="succeeded")
    job.tenant = tenant
    session.add(make_epoch(job.id, val_loss=1.0, val_accuracy=0.5))
    checkpoint = make_checkpoint(job.id, b"w" * 100)
    session.add(checkpoint)
    session.flush()
    return job, checkpoint


@pytest.fixture
def alpha(client: TestClient, session: Session, key_headers: KeyHeaders) -> dict[str, str]:
    """Tenant alpha's key and resources: path parameter name -> alpha's id."""
    headers = key_headers("alpha")
    job, checkpoint = ended_job(session, "alpha")
    uploaded = upload(client, headers)
    assert uploaded.status_code == 201, uploaded.text
    study = client.post(
        "/v1/studies",
        json={"name": "alpha's", "base": spec_payload(), "grid": {"seed": [0]}},
        headers=headers,
    )
    assert study.status_code == 201, study.text
    return {
        "job_id": str(job.id),
        "checkpoint_id": str(checkpoint.id),
        "dataset_id": uploaded.json()["name"].removeprefix("upload:"),
        "study_id": study.json()["id"],
        "name": "learning_curves",  # a plot's name: not a resource, the same for everyone
    }


def operations(app: FastAPI, streams: bool = True) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Every operation in the OpenAPI document; without the event streams if `streams` is
    False (a stream of every job's events never ends: tests/api/test_events.py covers it)."""
    for path, item in app.openapi()["paths"].items():
        for method, operation in item.items():
            content = operation.get("responses", {}).get("200", {}).get("content", {})
            if not streams and "text/event-stream" in content and "{" not in path:
                continue
            yield path, method.upper(), operation


def fill(path: str, ids: dict[str, str]) -> str:
    names = re.findall(r"{(\w+)}", path)
    missing = [name for name in names if name not in ids]
    assert not missing, f"{path}: give alpha a resource for {missing} in the `alpha` fixture"
    return path.format(**{name: ids[name] for name in names})


def _calls(dependant: Dependant) -> set[Any]:
    calls = {dependant.call}
    for sub in dependant.dependencies:
        calls |= _calls(sub)
    return calls


def routes_without_caller(app: FastAPI) -> list[str]:
    return [
        f"{sorted(route.methods)} {route.path}"
        for route in app.routes
        if isinstance(route, APIRoute)
        and route.path.startswith("/v1")
        and route.path not in PUBLIC_PATHS
        and get_caller not in _calls(route.dependant)
    ]


def test_every_v1_route_depends_on_the_caller(client: TestClient) -> None:
    app: FastAPI = client.app  # type: ignore[assignment]
    assert routes_without_caller(app) == []
    # The check is not vacuous: a route added without the dependency is caught.
    app.get("/v1/forgot-auth")(lambda: {})
    assert routes_without_caller(app) == ["['GET'] /v1/forgot-auth"]


def test_every_operation_but_health_and_ready_is_401_without_a_key(
    client: TestClient, alpha: dict[str, str]
) -> None:
    del client.headers["Authorization"]
    checked = 0
    for path, method, operation in operations(client.app):  # type: ignore[arg-type]
        response = client.request(method, fill(path, alpha))
        if path in PUBLIC_PATHS:
            assert response.status_code == 200, (method, path)
            continue
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"] == "missing_key"
        assert response.headers["WWW-Authenticate"] == "Bearer"
        assert "401" in operation["responses"], f"{method} {path} does not document its 401"
        checked += 1
    assert checked >= 10


def _masked(response: Response) -> tuple[int, str]:
    return response.status_code, UUID_PATTERN.sub("<id>", response.text)


def test_another_tenants_ids_are_404_exactly_like_unknown_ids(
    client: TestClient, alpha: dict[str, str], key_headers: KeyHeaders
) -> None:
    beta, alpha_headers = key_headers("beta"), key_headers("alpha")
    unknown = {name: str(uuid.uuid4()) for name in alpha} | {"name": alpha["name"]}
    checked = 0
    for path, method, _ in operations(client.app):  # type: ignore[arg-type]
        if "{" not in path:
            continue
        as_beta = client.request(method, fill(path, alpha), headers=beta)
        as_unknown = client.request(method, fill(path, unknown), headers=alpha_headers)
        assert as_beta.status_code == 404, (method, path, as_beta.text)
        assert _masked(as_beta) == _masked(as_unknown), (method, path)
        checked += 1
    assert checked >= 7
    # Beta's deletes and cancels changed nothing of alpha's.
    for path, method, _ in operations(client.app):  # type: ignore[arg-type]
        if "{" in path and method == "GET":
            assert client.get(fill(path, alpha), headers=alpha_headers).status_code == 200, path


def test_no_list_shows_another_tenants_items(
    client: TestClient, alpha: dict[str, str], key_headers: KeyHeaders
) -> None:
    beta, alpha_headers = key_headers("beta"), key_headers("alpha")
    alpha_ids = {alpha["job_id"], alpha["dataset_id"], alpha["study_id"]}
    lists = 0
    for path, method, _ in operations(client.app, streams=False):  # type: ignore[arg-type]
        if method != "GET" or "{" in path or path in PUBLIC_PATHS | CATALOG_PATHS:
            continue
        if not path.startswith("/v1"):
            continue
        as_alpha = client.get(path, headers=alpha_headers)
        as_beta = client.get(path, headers=beta)
        assert as_beta.status_code == 200, path
        assert not {i for i in alpha_ids if i in as_beta.text}, f"beta sees alpha's in {path}"
        assert {i for i in alpha_ids if i in as_alpha.text}, f"{path} lists none of alpha's"
        lists += 1
    assert lists >= 2


def test_an_admin_sees_every_tenant_and_can_filter_by_one(
    client: TestClient, alpha: dict[str, str], session: Session, key_headers: KeyHeaders
) -> None:
    beta_job, _ = ended_job(session, "beta")
    admin = key_headers("ops", admin=True)
    everything = client.get("/v1/jobs", headers=admin).json()["items"]
    assert {alpha["job_id"], str(beta_job.id)} <= {job["id"] for job in everything}
    only_beta = client.get("/v1/jobs", params={"tenant": "beta"}, headers=admin).json()
    assert {job["tenant"] for job in only_beta["items"]} == {"beta"}
    assert client.get(f"/v1/jobs/{alpha['job_id']}", headers=admin).status_code == 200
    datasets = client.get("/v1/datasets", params={"tenant": "alpha"}, headers=admin).json()
    assert f"upload:{alpha['dataset_id']}" in {d["name"] for d in datasets["items"]}
    # A tenant's own filter cannot widen what it sees.
    beta_asks = client.get("/v1/jobs", params={"tenant": "alpha"}, headers=key_headers("beta"))
    assert beta_asks.json()["items"] == []


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/studies", "/v1/datasets"])
def test_a_tenant_filter_no_key_could_name_is_422_on_it(
    client: TestClient, key_headers: KeyHeaders, path: str
) -> None:
    """A NUL reached PostgreSQL as a parameter and came back as a 422 on "body"."""
    admin = key_headers("ops", admin=True)
    for tenant in ("be\x00ta", "beta gamma", "-beta", "b" * 101):
        response = client.get(path, params={"tenant": tenant}, headers=admin)
        assert response.status_code == 422, (tenant, response.text)
        [error] = response.json()["detail"]
        assert error["field"] == "tenant"


def test_idempotency_keys_are_per_tenant_and_a_409_names_no_other_tenants_job(
    client: TestClient, key_headers: KeyHeaders
) -> None:
    alpha, beta = key_headers("alpha"), key_headers("beta")
    key = {"Idempotency-Key": "nightly-run"}
    first = client.post("/v1/jobs", json=spec_payload(), headers=alpha | key)
    assert first.status_code == 201
    other_spec = spec_payload(epochs=2)
    theirs = client.post("/v1/jobs", json=other_spec, headers=beta | key)
    assert theirs.status_code == 201  # the same key, another tenant: a job of its own
    assert theirs.json()["id"] != first.json()["id"]
    reused = client.post("/v1/jobs", json=spec_payload(epochs=3), headers=beta | key)
    assert reused.status_code == 409
    assert first.json()["id"] not in reused.text
    assert theirs.json()["id"] in reused.text
    again = client.post("/v1/jobs", json=spec_payload(), headers=alpha | key)
    assert (again.status_code, again.json()["id"]) == (200, first.json()["id"])


def test_a_spec_may_name_only_the_callers_uploads(
    client: TestClient, alpha: dict[str, str], key_headers: KeyHeaders
) -> None:
    def submit(dataset_id: str, headers: dict[str, str]) -> Response:
        payload = spec_payload(dataset={"name": f"upload:{dataset_id}"}, model={})
        return client.post("/v1/jobs", json=payload, headers=headers)

    assert submit(alpha["dataset_id"], key_headers("alpha")).status_code == 201
    as_beta = submit(alpha["dataset_id"], key_headers("beta"))
    unknown = submit(str(uuid.uuid4()), key_headers("beta"))
    assert as_beta.status_code == unknown.status_code == 422
    assert _masked(as_beta) == _masked(unknown)
    assert "no uploaded dataset" in as_beta.text


# -- the data lifecycle ----------------------------------------------------------------------


def test_deleting_an_ended_job_takes_its_metrics_and_checkpoints(
    client: TestClient, session: Session
) -> None:
    job, _ = ended_job(session, "default")
    job_id = job.id
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert client.get(f"/v1/jobs/{job_id}").status_code == 404
    session.expunge_all()
    assert session.scalars(select(EpochMetric).where(EpochMetric.job_id == job_id)).all() == []
    assert session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all() == []


@pytest.mark.parametrize("status", ["queued", "running"])
def test_a_job_that_has_not_ended_cannot_be_deleted(
    client: TestClient, session: Session, status: str
) -> None:
    job = make_job(session, status=status)
    response = client.delete(f"/v1/jobs/{job.id}")
    assert response.status_code == 409
    assert response.json()["error"] == "job_not_ended"
    assert client.get(f"/v1/jobs/{job.id}").status_code == 200


def test_an_upload_is_read_and_deleted_but_not_while_a_job_needs_it(
    client: TestClient, session: Session
) -> None:
    uploaded = upload(client, dict(client.headers))
    name = uploaded.json()["name"]
    dataset_id = name.removeprefix("upload:")
    assert client.get(f"/v1/datasets/{dataset_id}").json() == uploaded.json()

    job = client.post("/v1/jobs", json=spec_payload(dataset={"name": name}, model={})).json()
    refused = client.delete(f"/v1/datasets/{dataset_id}")
    assert refused.status_code == 409
    assert refused.json()["error"] == "dataset_in_use"
    assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202  # queued: at once

    assert client.delete(f"/v1/datasets/{dataset_id}").status_code == 204
    assert client.get(f"/v1/datasets/{dataset_id}").status_code == 404
    assert name not in client.get("/v1/datasets").text


@pytest.fixture
def small_quotas(settings: Settings) -> Settings:
    settings.tenant_storage_bytes = 1500
    settings.tenant_max_active_jobs = 2
    return settings


def test_uploads_over_the_tenants_storage_quota_are_413_naming_it(
    small_quotas: Settings, client: TestClient, key_headers: KeyHeaders
) -> None:
    alpha = key_headers("alpha")
    assert upload(client, alpha, seed=1).status_code == 201  # about 1 KB, stored compressed
    refused = upload(client, alpha, seed=2)
    assert refused.status_code == 413
    assert refused.json()["error"] == "storage_quota_exceeded"
    assert "1500 bytes (TRAINSVC_TENANT_STORAGE_BYTES)" in refused.json()["detail"]
    assert upload(client, key_headers("beta"), seed=2).status_code == 201  # beta's own quota


def test_a_tenants_queued_and_running_jobs_are_limited_with_a_429(
    small_quotas: Settings, client: TestClient, session: Session, key_headers: KeyHeaders
) -> None:
    alpha = key_headers("alpha")
    running = make_job(session, status="running")
    running.tenant = "alpha"
    session.flush()
    assert client.post("/v1/jobs", json=spec_payload(), headers=alpha).status_code == 201
    refused = client.post("/v1/jobs", json=spec_payload(), headers=alpha)
    assert refused.status_code == 429
    assert refused.json()["error"] == "too_many_active_jobs"
    assert "limit is 2 (TRAINSVC_TENANT_MAX_ACTIVE_JOBS)" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) > 0
    assert (
        client.post("/v1/jobs", json=spec_payload(), headers=key_headers("beta")).status_code == 201
    )


def test_a_tenant_at_its_storage_quota_cannot_submit(
    small_quotas: Settings, client: TestClient, session: Session, key_headers: KeyHeaders
) -> None:
    small_quotas.tenant_storage_bytes = 100  # alpha's one checkpoint fills it
    ended_job(session, "alpha")
    refused = client.post("/v1/jobs", json=spec_payload(), headers=key_headers("alpha"))
    assert refused.status_code == 413
    assert refused.json()["error"] == "storage_quota_exceeded"
    assert "quota of 100 bytes (TRAINSVC_TENANT_STORAGE_BYTES)" in refused.json()["detail"]
    assert (
        client.post("/v1/jobs", json=spec_payload(), headers=key_headers("beta")).status_code == 201
    )


def test_a_study_larger_than_the_tenants_limit_is_422_not_a_429_forever(
    small_quotas: Settings, client: TestClient, session: Session
) -> None:
    """A 3-job study under a limit of 2 answered 429 with Retry-After: the client retried a
    request no wait could let in (the 108-job preset under the old default of 100)."""
    body = {"base": spec_payload(), "grid": {"seed": [0, 1, 2]}}
    refused = client.post("/v1/studies", json=body)
    assert refused.status_code == 422
    [error] = refused.json()["detail"]
    assert error["field"] == "grid"
    assert "at most 2 jobs queued or running (TRAINSVC_TENANT_MAX_ACTIVE_JOBS)" in error["message"]
    assert session.scalars(select(Job)).all() == []
    assert client.post("/v1/studies", json=body | {"grid": {"seed": [0, 1]}}).status_code == 201


def test_every_preset_fits_the_default_limits() -> None:
    defaults = Settings()
    for preset in PRESETS.values():
        size = math.prod(len(values) for values in preset.grid.values())
        assert size <= min(defaults.tenant_max_active_jobs, defaults.max_study_jobs), preset.name
