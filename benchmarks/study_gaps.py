"""Does a study run its jobs back to back? A 2x2x3-seed study from one POST on the embedded default.

Starts a real `trainsvc up` (embedded SQLite database and broker in a temporary folder, a
worker of one process with one thread), lets one tiny job run first so the worker has
started (a fresh `up` answers HTTP seconds before its worker has imported torch; --cold
skips this and measures that too), then POSTs one study: normalization none/batch_norm x
dropout 0/0.5 x seeds 0, 1, 2 of a 6-epoch MLP on digits (12 jobs). Waits for it to end and
for its report, then reads every job's started_at and finished_at (GET /v1/jobs?study_id=)
and prints: the wall time from the POST to the report, the sum of the jobs' own durations
(what training them one after another takes), their ratio, and the idle gaps between one
job's finished_at and the next one's started_at (min, median, max).

    PYTHONPATH=. .venv/bin/python benchmarks/study_gaps.py [--url http://127.0.0.1:8000]
"""

import argparse
import contextlib
import itertools
import statistics
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import httpx

from benchmarks.service_process import api_headers, embedded_service

STUDY: dict[str, Any] = {
    "name": "2x2x3 gaps",
    "base": {
        "dataset": {"name": "digits"},
        "model": {"architecture": "mlp", "hidden_sizes": [64, 64]},
        "optimizer": {"type": "adam", "lr": 0.001},
        "epochs": 6,
    },
    "grid": {
        "model.normalization.type": ["none", "batch_norm"],
        "model.dropout.rate": [0.0, 0.5],
        "seed": [0, 1, 2],
    },
}


def _moment(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _study_jobs(client: httpx.Client, study_id: str) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"study_id": study_id, "limit": 200}
        if cursor:
            params["cursor"] = cursor
        page = client.get("/v1/jobs", params=params).raise_for_status().json()
        jobs += page["items"]
        cursor = page["next_cursor"]
        if not cursor:
            return jobs


def _warm_up(client: httpx.Client, timeout: float) -> None:
    """One epoch of a tiny MLP on iris, waited for: the worker is then up and idle."""
    tiny = {"dataset": {"name": "iris"}, "model": {"hidden_sizes": [8]}, "epochs": 1}
    job = client.post("/v1/jobs", json=tiny).raise_for_status().json()
    deadline = time.monotonic() + timeout
    while job["status"] in ("queued", "running"):
        if time.monotonic() > deadline:
            sys.exit("the warm-up job did not end")
        time.sleep(0.2)
        job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()


@contextlib.contextmanager
def _service(url: str | None) -> Iterator[str]:
    if url:
        yield url
    else:
        with embedded_service(concurrency=1) as started:
            yield started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running service (one worker process)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--cold", action="store_true", help="POST before the worker is up")
    args = parser.parse_args()

    with (
        _service(args.url) as url,
        httpx.Client(base_url=url, timeout=120, headers=api_headers()) as client,
    ):
        if not args.cold:
            _warm_up(client, args.timeout)
        posted = time.monotonic()
        study = client.post("/v1/studies", json=STUDY).raise_for_status().json()
        while not study["ended"]:
            if time.monotonic() - posted > args.timeout:
                sys.exit(f"the study did not end within {args.timeout:.0f} s: {study['counts']}")
            time.sleep(0.2)
            study = client.get(f"/v1/studies/{study['id']}").raise_for_status().json()
        report = client.get(f"/v1/studies/{study['id']}/report").raise_for_status().json()
        wall = time.monotonic() - posted
        jobs = _study_jobs(client, study["id"])

    if study["counts"].get("succeeded") != len(jobs):
        sys.exit(f"not every job succeeded: {study['counts']}")
    spans = sorted((_moment(j["started_at"]), _moment(j["finished_at"])) for j in jobs)
    durations = [(end - start).total_seconds() for start, end in spans]
    gaps = [
        (following[0] - current[1]).total_seconds()
        for current, following in itertools.pairwise(spans)
    ]
    first_start = (spans[0][0] - _moment(study["created_at"])).total_seconds()
    print(f"study: {len(jobs)} jobs, {len(report['configurations'])} configurations in the report")
    print(f"wall time, POST to report:        {wall:7.2f} s")
    print(f"sum of job durations (serial):    {sum(durations):7.2f} s")
    print(f"ratio wall / sum:                 {wall / sum(durations):7.3f}")
    print(f"POST to first job's start:        {first_start:7.2f} s")
    print(
        f"job durations: min {min(durations):.2f} s, median {statistics.median(durations):.2f} s, "
        f"max {max(durations):.2f} s"
    )
    print(
        f"gaps between one job's end and the next one's start ({len(gaps)}): "
        f"min {min(gaps):.3f} s, median {statistics.median(gaps):.3f} s, max {max(gaps):.3f} s, "
        f"sum {sum(gaps):.2f} s"
    )


if __name__ == "__main__":
    main()
