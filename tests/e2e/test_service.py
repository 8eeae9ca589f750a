"""End to end, real processes: the embedded default, and PostgreSQL + Redis as in production."""

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.e2e.walkthrough import SPEC, run_walkthrough, wait_for_status
from tests.factories import spec_payload
from tests.support.processes import Processes, wait_until
from tests.webhooks.receiver import receiving

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FAST_CONTROL = {
    "TRAINSVC_HEARTBEAT_SECONDS": "0.5",
    "TRAINSVC_CONTROL_POLL_SECONDS": "0.2",
    "TRAINSVC_SWEEP_SECONDS": "0.5",
}


def test_embedded_default_runs_a_job_with_nothing_else(processes: Processes) -> None:
    """README's run command (`trainsvc up`) on a bare folder: SQLite and the SQLite broker."""
    url = processes.api("up")  # no settings: files in the working folder, migrated by `up`
    run_walkthrough(url)
    assert (processes.workdir / "trainsvc.db").exists()
    assert (processes.workdir / "trainsvc-broker.db").exists()

    # The CLI's own client: submit, follow the progress bar, print the summary.
    spec_file = processes.workdir / "spec.json"
    spec_file.write_text(json.dumps({**SPEC, "epochs": 2}))
    submitted = subprocess.run(
        [sys.executable, "-m", "app.cli", "submit", str(spec_file), "--wait", "--url", url],
        capture_output=True,
        text=True,
        timeout=120,
        env=processes.env,
    )
    assert submitted.returncode == 0, submitted.stderr
    summary = json.loads(submitted.stdout[submitted.stdout.index("{") :])
    assert summary["status"] == "succeeded"
    assert summary["summary"]["epochs_completed"] == 2
    assert "epoch" in submitted.stderr  # tqdm's bar, on stderr

    # One person's machine: a webhook may reach a receiver on it (by default, without a host
    # list, a callback reaches public addresses only), through the API and the worker alike.
    with receiving() as receiver:
        hooked = {**SPEC, "epochs": 1, "callback": {"url": receiver.url, "secret": "s" * 16}}
        created = httpx.post(f"{url}/v1/jobs", json=hooked, timeout=10)
        assert created.status_code == 201, created.text
        wait_until(lambda: receiver.received, 60, "the webhook from `up`'s worker")
    assert json.loads(receiver.received[0].body)["job"]["id"] == created.json()["id"]

    # Ctrl-C (SIGINT to the terminal's process group) stops the API and its worker cleanly.
    up = processes.started[0][0]
    os.killpg(up.pid, signal.SIGINT)
    assert up.wait(timeout=30) == 0
    wait_until(lambda: not _group_alive(up.pid), 30, "the worker to exit after Ctrl-C")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def test_postgres_and_redis_with_separate_processes(
    processes: Processes, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": fresh_postgres_url,
            "TRAINSVC_BROKER_URL": fresh_redis_url,
            **FAST_CONTROL,
        }
    )
    url = processes.api("serve")
    processes.worker()
    ready = httpx.get(f"{url}/v1/ready").json()
    assert ready["checks"] == {"database": "up", "broker": "up"}
    job = run_walkthrough(url)
    assert job["attempt_history"][0]["outcome"] == "succeeded"

    # Cancel a running job: it stops within a batch or so and keeps its checkpoints.
    with httpx.Client(base_url=url, timeout=10) as client:
        long_job = {**SPEC, "name": "long", "epochs": 400}
        job_id = client.post("/v1/jobs", json=long_job).json()["id"]
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["epoch"] >= 2,
            60,
            "the long job to finish two epochs",
        )
        assert client.post(f"/v1/jobs/{job_id}/cancel").status_code == 202
        cancelled = wait_for_status(
            client, job_id, {"cancelled", "succeeded", "failed"}, timeout=10
        )
        assert cancelled["status"] == "cancelled"
        assert cancelled["progress"]["epoch"] < 400
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
        last_epochs = {c["epoch"] for c in checkpoints if c["kind"] == "last"}
        assert last_epochs == {cancelled["progress"]["epoch"]}


def test_a_nan_loss_ends_the_job_failed_diverged(processes: Processes) -> None:
    """README: a NaN loss ends a job `failed` with `diverged` and the epoch and step."""
    url = processes.api("up")
    # Plain SGD at lr=100 on an MLP without normalization: the loss is NaN within a few steps
    # of the first epoch (epoch 1, step 5 on CPU with this seed).
    diverging = spec_payload(
        name="diverges",
        model={"hidden_sizes": [64, 64], "normalization": {"type": "none"}},
        optimizer={"type": "sgd", "lr": 100.0},
        epochs=2,
        device="cpu",
    )
    with httpx.Client(base_url=url, timeout=10) as client:
        created = client.post("/v1/jobs", json=diverging)
        assert created.status_code == 201, created.text
        job = wait_for_status(client, created.json()["id"], {"succeeded", "failed", "cancelled"})
        assert job["status"] == "failed"
        assert job["error"]["type"] == "diverged"
        assert "epoch 1, step" in job["error"]["message"]
        assert job["attempt_history"][-1]["outcome"] == "failed"
        # The diverged epoch is not stored as if it had numbers.
        metrics = client.get(f"/v1/jobs/{job['id']}/metrics")
        assert metrics.status_code == 200
        assert metrics.json()["epochs"] == []
