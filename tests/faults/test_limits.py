"""Cancel from another API process, the wall-time limit, and a worker running out of memory."""

import resource
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.core.config import Settings
from tests.faults.conftest import slow_spec, tiny_spec
from tests.support.processes import Processes, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults"), pytest.mark.timeout(180)]


def test_cancel_through_another_api_process_stops_the_job_within_a_second(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    submitting_api, cancelling_api = processes.api(), processes.api()
    processes.worker()
    created = httpx.post(f"{submitting_api}/v1/jobs", json=slow_spec(epochs=20), timeout=10)
    job_id = created.json()["id"]
    wait_until(
        lambda: httpx.get(f"{submitting_api}/v1/jobs/{job_id}").json()["progress"]["epoch"] >= 1,
        60,
        "epoch 1",
    )

    asked_at = time.monotonic()
    answer = httpx.post(f"{cancelling_api}/v1/jobs/{job_id}/cancel", timeout=10)
    assert answer.status_code == 202
    wait_until(lambda: jobs.status(job_id) == "cancelled", 5, "the job to be cancelled")
    cancel_seconds = time.monotonic() - asked_at
    assert cancel_seconds < 1.5

    job = httpx.get(f"{cancelling_api}/v1/jobs/{job_id}").json()
    assert job["progress"]["epoch"] < 20
    assert [a["outcome"] for a in job["attempt_history"]] == ["cancelled"]
    checkpoints = httpx.get(f"{cancelling_api}/v1/jobs/{job_id}/checkpoints").json()["items"]
    assert {c["kind"] for c in checkpoints} >= {"last"}  # kept
    print(f"\ncancel: the running job ended cancelled {cancel_seconds:.2f}s after the request")


def test_a_job_past_its_wall_time_limit_fails_with_timeout(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    processes.worker()
    # A first job warms the pool process (its first dataset load imports scikit-learn, seconds
    # on a busy machine), so the figure below measures the limit, not the imports.
    warm_up = jobs.submit(tiny_spec(epochs=1))
    wait_until(lambda: jobs.status(warm_up) == "succeeded", 60, "the warm-up job")
    job_id = jobs.submit({**slow_spec(epochs=20), "max_wall_seconds": 2})
    wait_until(lambda: jobs.status(job_id) not in ("queued", "running"), 30, "the job to end")
    job = jobs.get(job_id)
    assert (job.status, job.error_type) == ("failed", "timeout")
    assert job.started_at is not None
    assert job.finished_at is not None
    ran = (job.finished_at - job.started_at).total_seconds()
    assert 2 <= ran < 4.5  # the limit, one control poll, one batch, one write
    assert job.progress_epoch < 20
    print(f"\ntimeout: max_wall_seconds=2, the job failed `timeout` after {ran:.2f}s")


def _vm_size(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmSize for {pid}")


def test_out_of_memory_fails_the_job_and_the_worker_lives_on(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    worker = processes.worker()
    child = worker.pool_child()
    assert child is not None
    # A real allocation failure: the pool process may map only 512 MiB more than it has now,
    # and the job's first layer alone needs 1 GiB.
    limit = _vm_size(child) + 512 * 2**20
    resource.prlimit(child, resource.RLIMIT_AS, (limit, limit))
    jobs.settings = Settings(
        database_url=fresh_postgres_url,
        max_parameters=10**9,
        max_layer_width=2**15,
        max_job_memory_bytes=2**40,
    )
    too_big = jobs.submit(tiny_spec(model={"architecture": "mlp", "hidden_sizes": [16384, 16384]}))
    wait_until(lambda: jobs.status(too_big) not in ("queued", "running"), 60, "the big job")
    job = jobs.get(too_big)
    assert (job.status, job.error_type) == ("failed", "out_of_memory"), job.error_message

    small = jobs.submit(tiny_spec())
    wait_until(lambda: jobs.status(small) == "succeeded", 60, "a small job after the OOM")
    assert worker.pool_child() == child  # the same process, alive
    assert jobs.attempts(small)[0].worker_id.endswith(f"#{child}")
