"""Real processes: a worker killed after a job ended and before its webhook went out; the next
worker delivers it, exactly once, even with two of them sweeping."""

import json
import time
from typing import Any

import httpx
import pytest

from app.core import webhooks
from tests.faults.conftest import tiny_spec
from tests.support.processes import Processes, wait_until
from tests.webhooks.receiver import receiving

pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults"), pytest.mark.timeout(240)]

SECRET = "whsec-processes-0123456789"


def test_a_delivery_survives_its_worker_being_killed(processes: Processes) -> None:
    processes.env.update(
        TRAINSVC_HEARTBEAT_SECONDS="0.5",
        TRAINSVC_CONTROL_POLL_SECONDS="0.2",
        TRAINSVC_WEBHOOK_ALLOWED_HOSTS='["127.0.0.1"]',
    )
    assert processes.start("migrate").wait(timeout=120) == 0
    url = processes.api("serve")
    with receiving() as receiver:
        # The first worker sweeps once an hour: it trains the job and ends it (the delivery is
        # written with the end), but dies before any sweep could send it.
        first = processes.worker(env={"TRAINSVC_SWEEP_SECONDS": "3600"})
        spec = {**tiny_spec(epochs=2), "callback": {"url": receiver.url, "secret": SECRET}}
        submitted = httpx.post(f"{url}/v1/jobs", json=spec, timeout=30)
        assert submitted.status_code == 201, submitted.text
        job_id = submitted.json()["id"]

        def job() -> dict[str, Any]:
            body: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
            return body

        def deliveries() -> list[dict[str, Any]]:
            response = httpx.get(f"{url}/v1/jobs/{job_id}/deliveries", timeout=10)
            items: list[dict[str, Any]] = response.json()["items"]
            return items

        wait_until(lambda: job()["status"] == "succeeded", 120, "the job to succeed")
        [pending] = deliveries()
        assert (pending["status"], pending["attempts"]) == ("pending", 0)
        first.kill()
        assert receiver.received == []

        # Two new workers sweeping often: the delivery goes out once, not once per sweeper.
        for _ in range(2):
            processes.worker(env={"TRAINSVC_SWEEP_SECONDS": "0.2"})
        wait_until(lambda: deliveries()[0]["status"] == "delivered", 60, "the delivery")
        time.sleep(1.5)  # several more sweeps of each worker: none may send it again
        [request] = receiver.received

    assert webhooks.verify(SECRET, request.headers[webhooks.SIGNATURE_HEADER], request.body)
    sent = json.loads(request.body)["job"]
    assert (sent["id"], sent["status"]) == (job_id, "succeeded")
    assert sent["progress"] == {"epoch": 2, "epochs": 2}
    [delivered] = deliveries()
    assert (delivered["attempts"], delivered["last_status_code"]) == (1, 200)
    assert SECRET not in job()["spec"]["callback"].values()
    assert SECRET not in processes.logs()
