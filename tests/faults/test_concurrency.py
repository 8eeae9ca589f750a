"""Many submits and many deliveries at once: each job exists once and is trained once."""

import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.faults.conftest import Jobs, tiny_spec
from tests.support.processes import Processes, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults"), pytest.mark.timeout(240)]


def _trained_once(jobs: Jobs, job_ids: list[uuid.UUID], epochs: int) -> None:
    for job_id in job_ids:
        job = jobs.get(job_id)
        assert job.status == "succeeded", (job.error_type, job.error_message)
        assert job.attempts == 1
        assert [a.outcome for a in jobs.attempts(job_id)] == ["succeeded"]
        assert jobs.metric_epochs(job_id) == list(range(1, epochs + 1))


def test_200_concurrent_submits_half_repeated_make_100_jobs_each_trained_once(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    url = processes.api()
    processes.worker()
    keys = [f"key-{n}" for n in range(100)] * 2  # every key sent twice, concurrently

    def submit(key: str) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/jobs",
            json=tiny_spec(epochs=1, seed=int(key.removeprefix("key-"))),
            headers={"Idempotency-Key": key},
            timeout=60,
        )

    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(submit, keys))
    submit_seconds = time.monotonic() - started
    codes = sorted(r.status_code for r in responses)
    assert codes == [200] * 100 + [201] * 100
    by_key: dict[str, set[str]] = {}
    for key, response in zip(keys, responses, strict=True):
        by_key.setdefault(key, set()).add(response.json()["id"])
    assert all(len(ids) == 1 for ids in by_key.values())  # a repeat got the original job
    job_ids = [uuid.UUID(next(iter(ids))) for ids in by_key.values()]
    assert len(set(job_ids)) == 100
    listed = httpx.get(f"{url}/v1/jobs", params={"limit": 200}).json()["items"]
    assert len(listed) == 100

    wait_until(lambda: jobs.all_ended(job_ids), 180, "all 100 jobs to end")
    _trained_once(jobs, job_ids, epochs=1)
    print(
        f"\nidempotency: 200 submits in {submit_seconds:.1f}s -> 100 jobs, all trained once "
        f"{time.monotonic() - started:.1f}s after the first submit"
    )


def test_concurrent_submits_of_one_tenant_never_pass_its_active_job_limit(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    """Each submit counted the tenant's jobs before any had inserted: 20 at once with a limit
    of 5 stored all 20. (No worker: the jobs stay queued, each counting against the limit.)"""
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url, tenant_max_active_jobs="5")
    url = processes.api()

    def submit(seed: int) -> httpx.Response:
        return httpx.post(f"{url}/v1/jobs", json=tiny_spec(seed=seed), timeout=60)

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(submit, range(20)))
    codes = sorted(r.status_code for r in responses)
    assert codes == [201] * 5 + [429] * 15
    listed = httpx.get(f"{url}/v1/jobs", params={"limit": 50}).json()["items"]
    assert len(listed) == 5
    assert all(jobs.get(uuid.UUID(job["id"])).status == "queued" for job in listed)


def test_two_workers_racing_for_the_same_20_jobs_train_each_once(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    job_ids = [jobs.submit(tiny_spec(epochs=2, seed=n), publish=False) for n in range(20)]
    # Every job published twice before any worker runs: both workers see every job's message.
    assert jobs.dispatcher.publish(job_ids) == job_ids
    assert jobs.dispatcher.publish(job_ids) == job_ids
    processes.worker()
    processes.worker()

    wait_until(lambda: jobs.all_ended(job_ids), 120, "all 20 jobs to end")
    _trained_once(jobs, job_ids, epochs=2)
    workers = {jobs.attempts(job_id)[0].worker_id.split("#")[0] for job_id in job_ids}
    print(f"\nrace: 20 jobs x 2 messages, trained once each, by {len(workers)} worker node(s)")
