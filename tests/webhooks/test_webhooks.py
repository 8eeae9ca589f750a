"""Webhooks in one process: the callback at submit, signed deliveries, retries, the secret kept."""

import dataclasses
import json
import logging
import socket
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.core import webhooks
from app.core.config import Settings
from app.core.errors import InvalidInput
from app.core.models import Job, JobCallback, WebhookDelivery, utcnow
from tests.factories import spec_payload
from tests.support.processes import free_port, wait_until
from tests.webhooks.receiver import receiving

SECRET = "whsec-0123456789-abcdef"


@pytest.fixture
def settings(database_url: str, redis_url: str) -> Settings:
    return Settings(
        database_url=database_url,
        broker_url=redis_url,
        webhook_allowed_hosts=["127.0.0.1", "*.example.org"],
        webhook_timeout_seconds=5,
    )


def with_callback(url: str, secret: str = SECRET, **overrides: Any) -> dict[str, Any]:
    return spec_payload(callback={"url": url, "secret": secret}, **overrides)


def submit(client: TestClient, spec: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    headers = {"Idempotency-Key": key} if key else {}
    response = client.post("/v1/jobs", json=spec, headers=headers)
    assert response.status_code in (200, 201), response.text
    body: dict[str, Any] = response.json()
    return body


def deliveries(client: TestClient, job_id: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/jobs/{job_id}/deliveries")
    assert response.status_code == 200, response.text
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def test_the_secret_is_kept_beside_the_job_never_in_its_spec(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    url = "https://hooks.example.org/trainsvc"
    submitted = client.post("/v1/jobs", json=with_callback(url), headers={"Idempotency-Key": "k1"})
    assert submitted.status_code == 201, submitted.text
    job = submitted.json()
    assert job["spec"]["callback"] == {"url": url}
    assert SECRET not in submitted.text
    shown = client.get(f"/v1/jobs/{job['id']}")
    assert shown.json()["spec"]["callback"] == {"url": url}
    assert SECRET not in shown.text
    assert SECRET not in client.get("/v1/jobs").text
    with session_factory() as session:
        stored = session.get(Job, uuid.UUID(job["id"]))
        assert stored is not None
        assert SECRET not in json.dumps(stored.spec)
        callback = session.get(JobCallback, stored.id)
        assert callback is not None
        assert (callback.url, callback.secret) == (url, SECRET)

    # The key's hash covers the URL but not the secret: a retry with another secret is the
    # same submit (and keeps the first secret); another URL is another spec.
    again = client.post(
        "/v1/jobs",
        json=with_callback(url, secret="another-secret-of-20"),
        headers={"Idempotency-Key": "k1"},
    )
    assert (again.status_code, again.json()["id"]) == (200, job["id"])
    other = client.post(
        "/v1/jobs",
        json=with_callback("https://other.example.org/x"),
        headers={"Idempotency-Key": "k1"},
    )
    assert other.status_code == 409
    with session_factory() as session:
        assert session.get(JobCallback, uuid.UUID(job["id"])).secret == SECRET  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("callback", "field"),
    [
        ({"url": "http://10.0.0.5/hook", "secret": SECRET}, "callback.url"),
        ({"url": "https://example.org.evil.com/x", "secret": SECRET}, "callback.url"),
        ({"url": "ftp://127.0.0.1/hook", "secret": SECRET}, "callback.url"),
        ({"url": "http://127.0.0.1/" + "a" * 2000, "secret": SECRET}, "callback.url"),
        ({"url": "http://127.0.0.1/hook"}, "callback.secret"),
        ({"url": "http://127.0.0.1/hook", "secret": "too-short"}, "callback.secret"),
        ({"url": "http://127.0.0.1/hook", "secret": SECRET, "extra": 1}, "callback.extra"),
    ],
)
def test_a_callback_must_be_http_to_an_allowed_host_with_a_secret(
    client: TestClient, callback: dict[str, Any], field: str
) -> None:
    response = client.post("/v1/jobs", json=spec_payload(callback=callback))
    assert response.status_code == 422, response.text
    assert field in [item["field"] for item in response.json()["detail"]]
    assert SECRET not in response.text
    assert "items" not in response.text  # a secret's length is in characters


def test_the_secret_is_write_only_in_openapi(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    secret = schemas["CallbackSpec"]["properties"]["secret"]
    assert (secret["format"], secret["writeOnly"]) == ("password", True)


def test_an_ended_job_is_delivered_once_signed(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    policy = webhooks.policy_from(settings)
    with receiving() as receiver:
        job = submit(client, with_callback(receiver.url))
        plain = submit(client, spec_payload())  # no callback: never delivered
        assert deliveries(client, job["id"]) == []  # nothing until the job ends
        assert webhooks.send_due(session_factory, policy) == 0

        for ended in (job, plain):
            assert client.post(f"/v1/jobs/{ended['id']}/cancel").status_code == 202
        [pending] = deliveries(client, job["id"])
        assert (pending["status"], pending["attempts"]) == ("pending", 0)
        assert deliveries(client, plain["id"]) == []

        assert webhooks.send_due(session_factory, policy) == 1
        assert webhooks.send_due(session_factory, policy) == 0  # delivered: never again
        [request] = receiver.received

    assert request.path == "/hooks/trainsvc"
    signature = request.headers[webhooks.SIGNATURE_HEADER]
    assert webhooks.verify(SECRET, signature, request.body)
    body = json.loads(request.body)
    assert body["event"] == "job.ended"
    assert (body["job"]["id"], body["job"]["status"]) == (job["id"], "cancelled")
    assert request.headers[webhooks.DELIVERY_HEADER] == pending["id"]
    assert SECRET not in request.body.decode()

    # What a receiver rejects: another secret, a changed body, and a replay (an old timestamp).
    assert not webhooks.verify("not-the-secret-at-all", signature, request.body)
    assert not webhooks.verify(SECRET, signature, request.body.replace(b"cancelled", b"succeeded"))
    stale = webhooks.sign(SECRET, int(time.time()) - 3600, request.body)
    assert not webhooks.verify(SECRET, stale, request.body)

    [delivered] = deliveries(client, job["id"])
    assert delivered["status"] == "delivered"
    assert (delivered["attempts"], delivered["last_status_code"]) == (1, 200)
    assert delivered["last_error"] is None
    assert delivered["delivered_at"] is not None


def test_a_failed_delivery_is_retried_with_backoff(
    client: TestClient,
    session_factory: sessionmaker[Session],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    policy = webhooks.policy_from(settings)
    caplog.set_level(logging.DEBUG)
    with receiving(statuses=(500, 200)) as receiver:
        job = submit(client, with_callback(receiver.url))
        client.post(f"/v1/jobs/{job['id']}/cancel")
        assert webhooks.send_due(session_factory, policy) == 1
        [failed] = deliveries(client, job["id"])
        assert (failed["status"], failed["attempts"], failed["last_status_code"]) == (
            "pending",
            1,
            500,
        )
        assert "500" in failed["last_error"]
        retry_in = datetime.fromisoformat(failed["next_attempt_at"]) - datetime.now(UTC)
        assert 0.5 < retry_in.total_seconds() <= 2.5  # the first backoff: 2 s
        assert webhooks.send_due(session_factory, policy) == 0  # not due yet: backing off

        wait_until(lambda: webhooks.send_due(session_factory, policy), 10, "the retry")
        assert len(receiver.received) == 2
    assert all(
        webhooks.verify(SECRET, r.headers[webhooks.SIGNATURE_HEADER], r.body)
        for r in receiver.received
    )
    [delivered] = deliveries(client, job["id"])
    assert (delivered["status"], delivered["attempts"]) == ("delivered", 2)
    assert "webhook delivery" in caplog.text  # the failure was logged...
    assert SECRET not in caplog.text  # ...and the secret never is


def test_a_delivery_httpx_cannot_send_is_its_own_failed_attempt_and_the_rest_go(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """httpx.InvalidURL is not an httpx.HTTPError: raised, it left its delivery pending with
    no attempt counted, for ever, and stopped each sweep before the deliveries after it."""
    policy = webhooks.policy_from(settings)
    with receiving(statuses=(200,)) as receiver:
        broken, sound = (submit(client, with_callback(receiver.url)) for _ in range(2))
        for job in (broken, sound):
            client.post(f"/v1/jobs/{job['id']}/cancel")
        with session_factory() as session:
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.job_id == uuid.UUID(broken["id"]))
                .values(url=receiver.url + "\x01")  # httpx refuses it
            )
            session.commit()
        assert webhooks.send_due(session_factory, policy) == 2
        assert len(receiver.received) == 1
    [failed] = deliveries(client, broken["id"])
    assert (failed["status"], failed["attempts"]) == ("pending", 1)
    assert "non-printable ASCII character" in failed["last_error"]
    assert failed["next_attempt_at"] is not None
    [delivered] = deliveries(client, sound["id"])
    assert delivered["status"] == "delivered"


def test_a_delivery_is_given_up_after_the_retry_window(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    policy = webhooks.policy_from(settings.model_copy(update={"webhook_retry_for_seconds": 1.0}))
    unreachable = f"http://127.0.0.1:{free_port()}/hook"
    job = submit(client, with_callback(unreachable))
    client.post(f"/v1/jobs/{job['id']}/cancel")
    assert webhooks.send_due(session_factory, policy) == 1
    [failed] = deliveries(client, job["id"])
    assert (failed["status"], failed["attempts"]) == ("failed", 1)
    assert failed["last_status_code"] is None
    assert "ConnectError" in failed["last_error"]
    assert failed["next_attempt_at"] is None
    assert webhooks.send_due(session_factory, policy) == 0


def test_a_study_gives_each_job_the_callback_and_keeps_no_secret(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    url = "http://127.0.0.1:9/hook"
    base = with_callback(url, epochs=1)
    response = client.post("/v1/studies", json={"base": base, "grid": {"seed": [0, 1]}})
    assert response.status_code == 201, response.text
    study = response.json()
    assert SECRET not in response.text
    shown = client.get(f"/v1/studies/{study['id']}")
    assert shown.json()["base"]["callback"] == {"url": url}
    assert SECRET not in shown.text
    with session_factory() as session:
        ids = [uuid.UUID(job["id"]) for job in study["jobs"]]
        secrets = session.scalars(select(JobCallback.secret).where(JobCallback.job_id.in_(ids)))
        assert list(secrets) == [SECRET, SECRET]

    grid_callback = client.post(
        "/v1/studies",
        json={"base": spec_payload(), "grid": {"callback.url": [url, url + "2"]}},
    )
    assert grid_callback.status_code == 422
    refused = client.post(
        "/v1/studies",
        json={"base": with_callback("http://10.1.2.3/x"), "grid": {"seed": [0, 1]}},
    )
    assert refused.status_code == 422
    # The study's field, not a job's: a study request has no top-level callback.
    assert [item["field"] for item in refused.json()["detail"]] == ["base.callback.url"]
    no_secret = client.post(
        "/v1/studies",
        json={"base": spec_payload(callback={"url": url}), "grid": {"seed": [0, 1]}},
    )
    assert no_secret.status_code == 422
    assert [item["field"] for item in no_secret.json()["detail"]] == ["base.callback.secret"]


PUBLIC_ONLY = webhooks.WebhookPolicy((), retry_for_seconds=3600, timeout_seconds=5)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:5432/",  # the database, on the worker's own machine
        "http://10.0.0.5/hook",
        "http://192.168.1.20/hook",
        "http://169.254.169.254/latest/meta-data/",  # a cloud's metadata service
        "http://100.64.0.1/hook",  # carrier-grade NAT: not the internet either
        "http://[::1]:6379/",
        "http://[fd00::5]/hook",
        "http://localhost:8080/hook",
        "http://hooks.localhost/hook",
        "http://localhost./hook",  # the same name, fully qualified
        # IPv4 in the forms the resolver also reads (inet_aton): all loopback, or "this host".
        "http://127.1/hook",
        "http://2130706433/hook",
        "http://0x7f000001/hook",
        "http://0/hook",
    ],
)
def test_without_a_host_list_a_callback_may_not_name_a_private_address(url: str) -> None:
    """A tenant's callback is a request from inside the network: without the operator's list
    it may reach only what anyone on the internet could, or a tenant could reach the database,
    the broker or the metadata service, and probe the network through its deliveries' errors."""
    with pytest.raises(InvalidInput) as refused:
        webhooks.check_url(url, PUBLIC_ONLY)
    assert refused.value.field == "callback.url"
    assert "not a public address" in refused.value.message
    assert "TRAINSVC_WEBHOOK_ALLOW_PRIVATE_NETWORKS" in refused.value.message
    # An operator who means it: private networks allowed, or the host listed.
    webhooks.check_url(url, dataclasses.replace(PUBLIC_ONLY, private_networks=True))
    host = urlsplit(url).hostname
    assert host is not None
    webhooks.check_url(url, dataclasses.replace(PUBLIC_ONLY, allowed_hosts=(host,)))


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://exa mple.com/hook", "is not a host name or address"),
        ("http://ex%41mple.com/hook", "is not a host name or address"),
        ("http://example.com:99999/hook", "the port must be a number from 1 to 65535"),
        ("http://example.com:http/hook", "the port must be a number from 1 to 65535"),
        ("http://example.com:0/hook", "the port must be a number from 1 to 65535"),
        ("http://[::1/hook", "is not a well-formed URL"),  # urlsplit raised: a 500
        ("http://\uff11\uff12\uff17.0.0.1/hook", "cannot be sent to"),  # full-width digits
        ("http://user:pass@example.com/hook", "must not hold a user name or password"),
        ("http://evil.example\\@example.com/hook", "must not hold a user name or password"),
    ],
)
def test_a_malformed_callback_url_is_refused_at_submit(url: str, reason: str) -> None:
    """They were accepted, and every delivery then failed ("cannot resolve exa%20mple.com",
    "Invalid IDNA hostname", a connection to port 0); credentials in a URL were shown with
    the job and its deliveries."""
    with pytest.raises(InvalidInput) as refused:
        webhooks.check_url(url, PUBLIC_ONLY)
    assert reason in refused.value.message


def test_a_public_address_or_a_name_passes_the_submit_check() -> None:
    for url in (
        "https://hooks.example.org/x",
        "http://8.8.8.8/hook",
        "http://[2001:4860::8888]/",
        "https://bücher.example/hook",  # httpx encodes the name as IDNA
        "http://hooks_1.example.org:8443/x",
    ):
        webhooks.check_url(url, PUBLIC_ONLY)  # a name is checked where it is connected to


def test_a_submit_naming_a_private_address_is_422_by_default(
    client: TestClient, database_url: str, redis_url: str
) -> None:
    default = Settings(database_url=database_url, broker_url=redis_url)
    assert webhooks.policy_from(default).public_only
    client.app.state.settings = default  # type: ignore[attr-defined]
    response = client.post("/v1/jobs", json=with_callback("http://127.0.0.1:6379/"))
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "callback.url"
    assert error["message"].startswith("127.0.0.1 is not a public address")


def test_a_name_that_resolves_to_a_private_address_is_refused_when_it_is_connected_to(
    client: TestClient, session_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name passed at submit (it might have resolved anywhere then); when the delivery
    connects it resolves to loopback, as a rebinding DNS answer would, and is refused. DNS is
    the one part simulated (there is none here): the receiver and the connection are real."""
    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "hooks.example.org" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    with receiving() as receiver:
        url = receiver.url.replace("127.0.0.1", "hooks.example.org")
        job = submit(client, with_callback(url))
        client.post(f"/v1/jobs/{job['id']}/cancel")
        assert webhooks.send_due(session_factory, PUBLIC_ONLY) == 1
        [refused] = deliveries(client, job["id"])
        assert receiver.received == []
        assert refused["status"] == "pending"  # retried: the name may point elsewhere later
        assert refused["last_status_code"] is None
        assert (
            "hooks.example.org resolves to an address that is not a public address"
            in (refused["last_error"])
        )
        # Where the operator allows private networks, the same delivery arrives, sent to the
        # address the name resolved to with the name as its Host.
        with session_factory() as session:
            session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))
            session.commit()
        allowed = dataclasses.replace(PUBLIC_ONLY, private_networks=True)
        assert webhooks.send_due(session_factory, allowed) == 1
        [request] = receiver.received
        assert request.headers["Host"] == f"hooks.example.org:{receiver.port}"
    assert deliveries(client, job["id"])[0]["status"] == "delivered"


def test_tenants_take_turns_in_a_sweep(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """A sweep took the longest-due deliveries first, whoever's: one tenant's backlog to a
    receiver that never answers (each up to the timeout) kept every other tenant's waiting."""
    policy = webhooks.policy_from(settings)
    with receiving() as noisy, receiving() as quiet:
        noisy_jobs = [submit(client, with_callback(noisy.url, seed=seed)) for seed in range(5)]
        quiet_job = submit(client, with_callback(quiet.url))
        for job in [*noisy_jobs, quiet_job]:
            client.post(f"/v1/jobs/{job['id']}/cancel")
        with session_factory() as session:
            noisy_ids = [uuid.UUID(job["id"]) for job in noisy_jobs]
            session.execute(update(Job).where(Job.id.in_(noisy_ids)).values(tenant="noisy"))
            # The noisy tenant's deliveries have waited longest.
            long_ago = datetime(2026, 1, 1, tzinfo=UTC)
            session.execute(
                update(WebhookDelivery)
                .where(WebhookDelivery.job_id.in_(noisy_ids))
                .values(next_attempt_at=long_ago)
            )
            session.commit()
        assert webhooks.send_due(session_factory, policy, limit=2) == 2
        assert (len(noisy.received), len(quiet.received)) == (1, 1)
        assert webhooks.send_due(session_factory, policy, limit=2) == 2
        assert (len(noisy.received), len(quiet.received)) == (3, 1)


def test_a_receiver_answering_a_byte_at_a_time_is_cut_off_at_the_timeout(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """httpx's timeout bounds each read alone: a receiver sending its answer's head a byte
    every 0.3 s (46 bytes: 14 s) held the sweep, and every delivery behind it, all along."""
    policy = webhooks.policy_from(settings.model_copy(update={"webhook_timeout_seconds": 1.0}))
    with receiving(trickle_seconds=0.3) as receiver:
        job = submit(client, with_callback(receiver.url))
        client.post(f"/v1/jobs/{job['id']}/cancel")
        started = time.monotonic()
        assert webhooks.send_due(session_factory, policy) == 1
        took = time.monotonic() - started
    assert took < 5, took
    [delivery] = deliveries(client, job["id"])
    assert delivery["status"] == "pending"
    assert "ReadTimeout" in delivery["last_error"]
    assert "TRAINSVC_WEBHOOK_TIMEOUT_SECONDS" in delivery["last_error"]


def test_a_delivery_reads_the_status_and_never_the_receivers_body(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """The whole answer was read into the worker's memory (200 MiB measured for a 200 MiB
    answer) before the status counted; a body that never ended held the sweep until a read
    timed out, and the delivered POST counted as failed."""
    policy = webhooks.policy_from(settings.model_copy(update={"webhook_timeout_seconds": 1.0}))
    with receiving(stall_seconds=3) as receiver:
        job = submit(client, with_callback(receiver.url))
        client.post(f"/v1/jobs/{job['id']}/cancel")
        assert webhooks.send_due(session_factory, policy) == 1
        assert len(receiver.received) == 1
    [delivered] = deliveries(client, job["id"])
    assert (delivered["status"], delivered["last_status_code"]) == ("delivered", 200)
    assert delivered["last_error"] is None
