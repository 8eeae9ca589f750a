"""GET /metrics: requests by route template, job counters from the worker and the database."""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.orm import Session, sessionmaker

from app.core import lifecycle
from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.outbox import Dispatcher
from tests.e2e.walkthrough import wait_for_status
from tests.factories import make_job, spec_payload
from tests.support.processes import Processes, free_port, wait_until
from worker.execution import WorkerContext, execute_job

# A worker on the test's one connection polls no controls: its lease keeper's transactions
# would interleave with the test's savepoints on that connection.
QUIET = {"control_poll_seconds": 3600.0}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def test_a_job_run_by_a_worker_shows_in_the_job_counters_and_request_histograms(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    before = scrape(client)
    job_id = client.post("/v1/jobs", json=spec_payload(epochs=2)).json()["id"]
    context = WorkerContext(
        settings.model_copy(update=QUIET),
        session_factory,
        Dispatcher(create_celery_app(settings), session_factory),
        "node@host#1",
    )
    assert execute_job(context, uuid.UUID(job_id)) == "succeeded"
    assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # Requests, by route template (never the raw path with its id) and status.
    assert grew("trainsvc_http_requests_total", method="POST", route="/v1/jobs", status="201") == 1
    assert (
        grew("trainsvc_http_requests_total", method="GET", route="/v1/jobs/{job_id}", status="200")
        == 1
    )
    read = {"method": "GET", "route": "/v1/jobs/{job_id}"}
    assert grew("trainsvc_http_request_duration_seconds_count", **read) == 1
    assert grew("trainsvc_http_request_duration_seconds_bucket", **read, le="+Inf") == 1
    assert not any(job_id in str(labels) for _, labels in after)
    # The database's view, counted at scrape time (this test's transaction holds one job).
    assert value(after, "trainsvc_jobs", status="succeeded") == 1
    assert value(after, "trainsvc_jobs", status="queued") == 0
    assert value(after, "trainsvc_queue_depth") == 0
    assert value(after, "trainsvc_attempts_total", outcome="succeeded") == 1
    # What the worker observed.
    assert grew("trainsvc_jobs_ended_total", status="succeeded") == 1
    assert grew("trainsvc_job_duration_seconds_count", status="succeeded") == 1
    assert grew("trainsvc_job_submit_to_start_seconds_count") == 1
    samples_per_epoch = 1438  # digits: 1797 samples less the 359 (20 %) held out
    assert grew("trainsvc_training_samples_total", device="cpu") == 2 * samples_per_epoch
    assert value(after, "trainsvc_training_samples_per_second", device="cpu") > 0


def test_queue_depth_outbox_backlog_and_lost_attempts_come_from_the_database(
    client: TestClient, session_factory: sessionmaker[Session]
) -> None:
    with session_factory() as session:
        lost = make_job(session)
        unpublished = make_job(session)
        session.commit()
        lifecycle.claim(session, lost.id, "gone@host#1", lease_seconds=-1)  # already expired
        session.commit()
        assert lifecycle.reap_expired_leases(session, max_attempts=3) == [lost.id]
        session.commit()
        lifecycle.claim(session, lost.id, "other@host#2", lease_seconds=60)  # recovered
        session.commit()
    samples = scrape(client)
    assert value(samples, "trainsvc_jobs", status="queued") == 1
    assert value(samples, "trainsvc_jobs", status="running") == 1
    assert value(samples, "trainsvc_queue_depth") == 1
    assert value(samples, "trainsvc_outbox_backlog") == 1  # `unpublished` was never sent
    assert value(samples, "trainsvc_attempts_total", outcome="lost") == 1
    assert value(samples, "trainsvc_attempts_recovered_total") == 1
    assert unpublished.id != lost.id


def test_unknown_paths_share_one_label(client: TestClient) -> None:
    before = scrape(client)
    for _ in range(3):
        assert client.get(f"/no/such/{uuid.uuid4()}").status_code == 404
    after = scrape(client)
    labels = {"method": "GET", "route": "<unmatched>", "status": "404"}
    assert (
        value(after, "trainsvc_http_requests_total", **labels)
        - value(before, "trainsvc_http_requests_total", **labels)
        == 3
    )


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_trainsvc_up_adds_up_the_worker_processes_metrics(processes: Processes) -> None:
    """`trainsvc up` shares a multiprocess directory: the API's /metrics shows the worker's."""
    url = processes.api("up")
    with httpx.Client(base_url=url, timeout=30) as http:
        job = http.post("/v1/jobs", json=spec_payload(epochs=1)).json()
        wait_for_status(http, job["id"], {"succeeded"})

        def ended() -> float:
            samples = parse(http.get("/metrics").text)
            return value(samples, "trainsvc_jobs_ended_total", status="succeeded")

        assert wait_until(ended, 30, "the worker's job counter in the API's /metrics") == 1
        samples = parse(http.get("/metrics").text)
    assert value(samples, "trainsvc_job_submit_to_start_seconds_count") == 1
    assert value(samples, "trainsvc_jobs", status="succeeded") == 1
    assert (
        value(
            samples, "trainsvc_http_requests_total", method="POST", route="/v1/jobs", status="201"
        )
        == 1
    )


def test_the_run_size_histogram_counts_a_pack_once_with_its_jobs(
    client: TestClient, session_factory: sessionmaker[Session], settings: Settings
) -> None:
    """How much packing packs: a job alone is a run of 1, a pack a run of its size."""
    before = scrape(client)
    sweep = {"dataset": {"name": "digits", "train_subset": 128, "batch_size": 32}, "epochs": 1}
    ids = [
        client.post("/v1/jobs", json=spec_payload(**sweep, seed=seed)).json()["id"]
        for seed in (1, 2, 3)
    ]
    context = WorkerContext(
        settings.model_copy(update={"max_pack": 8, **QUIET}),
        session_factory,
        Dispatcher(create_celery_app(settings), session_factory),
        "node@host#1",
    )
    assert execute_job(context, uuid.UUID(ids[0])) == "succeeded"
    packed = scrape(client)
    # The throughput of the pack's epoch is the device's: all three jobs' samples in its time.
    epoch = client.get(f"/v1/jobs/{ids[0]}/metrics").json()["epochs"][0]
    assert all(client.get(f"/v1/jobs/{i}").json()["pack"] for i in ids)
    samples = 128  # train_subset: the training samples each job trains on
    trained = value(packed, "trainsvc_training_samples_total", device="cpu") - value(
        before, "trainsvc_training_samples_total", device="cpu"
    )
    assert trained == 3 * samples
    assert value(packed, "trainsvc_training_samples_per_second", device="cpu") == pytest.approx(
        3 * samples / epoch["epoch_seconds"]
    )
    alone = client.post("/v1/jobs", json=spec_payload(**sweep, seed=4)).json()["id"]  # none queued
    assert execute_job(context, uuid.UUID(alone)) == "succeeded"
    after = scrape(client)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("trainsvc_run_jobs_count") == 2  # one pack, one job alone
    assert grew("trainsvc_run_jobs_sum") == 4
    assert grew("trainsvc_run_jobs_bucket", le="1.0") == 1
    assert grew("trainsvc_run_jobs_bucket", le="2.0") == 1  # the pack of 3 is above 2
    assert grew("trainsvc_run_jobs_bucket", le="4.0") == 2


@pytest.mark.parametrize("command", [["serve"], ["worker"], ["up"]])
def test_a_metrics_directory_that_cannot_be_written_is_one_line(
    command: list[str], tmp_path: Path, redis_url: str
) -> None:
    """Before: prometheus-client's FileNotFoundError traceback, from the first metric made."""
    missing = tmp_path / "metrics"
    args = [*command, "--port", str(free_port())] if command != ["worker"] else command
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=tmp_path,
        env={
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": str(missing),
            "TRAINSVC_DATABASE_URL": f"sqlite:///{tmp_path / 'trainsvc.db'}",
            "TRAINSVC_BROKER_URL": redis_url,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        f"PROMETHEUS_MULTIPROC_DIR={missing} is not a directory this user can write: "
        "create it (empty) before the processes start, or unset it"
    )
