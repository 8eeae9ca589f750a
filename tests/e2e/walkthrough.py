"""README's curl walk-through as code: submit, poll, read metrics, download a checkpoint."""

import hashlib
from typing import Any

import httpx
from safetensors.torch import load as load_safetensors

from tests.factories import BASE_SPEC, spec_payload
from tests.support.processes import wait_until

# The factory's spec (README's example), with layers wide enough to check shapes against.
SPEC: dict[str, Any] = spec_payload(model={**BASE_SPEC["model"], "hidden_sizes": [64, 32]})


def wait_for_status(
    client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 90
) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        return job if job["status"] in statuses else None

    result: dict[str, Any] = wait_until(reached, timeout, f"job {job_id} to reach {statuses}")
    return result


def run_walkthrough(base_url: str) -> dict[str, Any]:
    """Runs a 3-epoch job to the end and checks everything a user would look at."""
    with httpx.Client(base_url=base_url, timeout=10) as client:
        created = client.post("/v1/jobs", json=SPEC)
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]

        job = wait_for_status(client, job_id, {"succeeded", "failed", "cancelled"})
        assert job["status"] == "succeeded", job["error"]
        assert job["progress"] == {"epoch": 3, "epochs": 3}
        assert job["attempts"] == 1
        assert job["summary"]["best_val_accuracy"] > 0.5  # digits at 3 epochs is far above chance
        assert job["started_at"] <= job["finished_at"]

        epochs = client.get(f"/v1/jobs/{job_id}/metrics").json()["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2, 3]
        assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
        later = client.get(f"/v1/jobs/{job_id}/metrics", params={"since_epoch": 2}).json()["epochs"]
        assert [e["epoch"] for e in later] == [3]

        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
        assert {c["kind"] for c in checkpoints} == {"last", "best"}
        last = next(c for c in checkpoints if c["kind"] == "last")
        assert last["epoch"] == 3
        download = client.get(f"/v1/jobs/{job_id}/checkpoints/{last['id']}")
        assert download.status_code == 200
        assert hashlib.sha256(download.content).hexdigest() == last["sha256"]
        assert len(download.content) == last["size_bytes"]
        weights = load_safetensors(download.content)
        # The MLP's first Linear maps digits' 64 features to 64 units.
        assert weights["hidden.0.linear.weight"].shape == (64, 64)
        return job
