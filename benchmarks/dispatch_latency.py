"""How fast a submitted job starts: submit-to-running latency and job starts per minute.

Real processes (`trainsvc serve` and one `trainsvc worker --concurrency 1`, as `trainsvc up`
runs them) on a fresh SQLite database, with three brokers, in one run:

- the embedded SQL broker polled once a second (kombu's default: the setting before the fix),
- the embedded SQL broker at the new default (TRAINSVC_BROKER_POLLING_SECONDS=0.1),
- Redis (which pushes messages; nothing to poll).

Three measurements each, with tiny jobs (1 epoch of a small MLP on iris): (1) jobs submitted
one at a time to an idle worker: the time from each job's `created_at` (its 201) to its
`started_at`, p50 and p95; (2) N jobs submitted back to back: job starts per minute; (3) a
backlog of K jobs cancelled while still queued, then one more job: how long that job waits
while the worker skips the cancelled jobs' messages. Prints a markdown table and the
before/after ratios of the polling interval.

    PYTHONPATH=. .venv/bin/python benchmarks/dispatch_latency.py [--latency-jobs 10] [--jobs 30]
        [--cancelled 30]
        [--redis-url redis://127.0.0.1:6379/15]   (that Redis database is flushed)
"""

import argparse
import statistics
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis

from tests.support.processes import Processes, wait_until

TINY_JOB: dict[str, Any] = {
    "dataset": {"name": "iris"},
    "model": {"architecture": "mlp", "hidden_sizes": [8]},
    "epochs": 1,
}
# A job that keeps the worker busy while the backlog is built (cancelled afterwards).
BLOCKER: dict[str, Any] = {
    "dataset": {"name": "digits", "batch_size": 4},
    "model": {"architecture": "mlp", "hidden_sizes": [64]},
    "epochs": 500,
}
ENDED = {"succeeded", "failed", "cancelled"}


def _started_at(job: dict[str, Any]) -> float:
    return datetime.fromisoformat(job["started_at"]).timestamp()


def _wait_ended(client: httpx.Client, job_ids: list[str], timeout: float) -> list[dict[str, Any]]:
    def ended() -> list[dict[str, Any]] | None:
        jobs = [client.get(f"/v1/jobs/{job_id}").json() for job_id in job_ids]
        return jobs if all(job["status"] in ENDED for job in jobs) else None

    result: list[dict[str, Any]] = wait_until(ended, timeout, "the jobs to end", interval=0.5)
    return result


def _submit(client: httpx.Client, spec: dict[str, Any]) -> tuple[str, float]:
    """The job's id and its `created_at` (the database's clock, like `started_at`)."""
    response = client.post("/v1/jobs", json=spec)
    response.raise_for_status()
    job = response.json()
    return job["id"], datetime.fromisoformat(job["created_at"]).timestamp()


def measure(
    name: str, env: dict[str, str], latency_jobs: int, jobs: int, cancelled: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir:
        processes = Processes(
            Path(workdir),
            {
                "TRAINSVC_DATABASE_URL": f"sqlite:///{workdir}/trainsvc.db",
                "TRAINSVC_CONTROL_POLL_SECONDS": "0.2",
                "OMP_NUM_THREADS": "1",
                **env,
            },
        )
        try:
            migrated = processes.start("migrate")
            assert migrated.wait(timeout=60) == 0, processes.logs()
            url = processes.api("serve")
            processes.worker()
            with httpx.Client(base_url=url, timeout=30) as client:
                warm_up, _ = _submit(client, TINY_JOB)  # the pool imports torch, loads iris
                _wait_ended(client, [warm_up], 120)

                latencies = []
                for _ in range(latency_jobs):  # one at a time, to an idle worker
                    job_id, at = _submit(client, TINY_JOB)
                    [job] = _wait_ended(client, [job_id], 120)
                    latencies.append(_started_at(job) - at)
                latencies.sort()

                burst = [_submit(client, TINY_JOB)[0] for _ in range(jobs)]
                starts = sorted(_started_at(job) for job in _wait_ended(client, burst, 600))
                per_minute = 60 * (len(starts) - 1) / (starts[-1] - starts[0])

                blocker, _ = _submit(client, BLOCKER)
                wait_until(
                    lambda: client.get(f"/v1/jobs/{blocker}").json()["status"] == "running",
                    60,
                    "the blocker to start",
                )
                backlog = [_submit(client, TINY_JOB)[0] for _ in range(cancelled)]
                for job_id in [*backlog, blocker]:
                    client.post(f"/v1/jobs/{job_id}/cancel").raise_for_status()
                probe, probe_at = _submit(client, TINY_JOB)
                [probe_job] = _wait_ended(client, [probe], 600)
        finally:
            processes.stop_all()
    return {
        "name": name,
        "p50": statistics.median(latencies),
        "p95": latencies[max(0, round(0.95 * len(latencies)) - 1)],
        "per_minute": per_minute,
        "after_backlog": _started_at(probe_job) - probe_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-jobs", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=30)
    parser.add_argument("--cancelled", type=int, default=30)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as brokers:
        sql_broker = f"sqla+sqlite:///{brokers}/broker-%s.db"
        cases = [
            ("SQL broker, polled every 1 s (before)", sql_broker % "before", "1.0"),
            ("SQL broker, polled every 0.1 s (now)", sql_broker % "now", "0.1"),
        ]
        results = [
            measure(
                name,
                {"TRAINSVC_BROKER_URL": url, "TRAINSVC_BROKER_POLLING_SECONDS": interval},
                args.latency_jobs,
                args.jobs,
                args.cancelled,
            )
            for name, url, interval in cases
        ]
    redis.Redis.from_url(args.redis_url).flushdb()
    results.append(
        measure(
            "Redis",
            {"TRAINSVC_BROKER_URL": args.redis_url},
            args.latency_jobs,
            args.jobs,
            args.cancelled,
        )
    )

    print(
        f"latency: {args.latency_jobs} tiny jobs submitted one at a time to an idle worker; "
        f"starts/minute: {args.jobs} submitted back to back; then one job behind "
        f"{args.cancelled} cancelled ones\n"
    )
    print("| broker | submit→running p50 | p95 | starts/minute | wait behind the backlog |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r['name']} | {r['p50']:.2f} s | {r['p95']:.2f} s | {r['per_minute']:.0f} "
            f"| {r['after_backlog']:.2f} s |"
        )
    before, now = results[0], results[1]
    print(
        f"\npolling 0.1 s vs 1 s: p50 latency {before['p50'] / now['p50']:.1f}x lower, "
        f"starts/minute {now['per_minute'] / before['per_minute']:.1f}x higher, "
        f"wait behind the backlog {before['after_backlog'] / now['after_backlog']:.1f}x shorter"
    )


if __name__ == "__main__":
    main()
