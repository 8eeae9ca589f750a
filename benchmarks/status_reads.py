"""Status reads against the framework's floor: requests/s of the read paths beside /v1/health.

Real processes: `trainsvc serve` (uvicorn, one process) with auth on and a key, and a second
one with auth off, on a fresh SQLite file and on a throw-away PostgreSQL database (created and
dropped here). The database holds 50 succeeded jobs of the default tenant, each with two
attempts (a lost one and the one that succeeded) and a summary; the newest has 100 epochs of
metrics with the per-layer diagnostics the trainer writes (an MLP [128, 64] with batch norm).

Each endpoint is loaded with a fixed number of keep-alive connections for a few seconds by
`wrk` (Debian's `wrk` package; a Python load generator in a separate process otherwise), the
endpoints interleaved in rounds so drift on a shared machine hits each alike:

    GET /v1/health                      the floor: no key, no database, a constant body
    GET /v1/jobs/{id}                   one job with its attempts
    GET /v1/jobs/{id}  If-None-Match    the 304 path (when the server sends an ETag)
    GET /v1/jobs?limit=50               a page of 50 jobs
    GET /v1/jobs/{id}/metrics           100 epochs with per-layer diagnostics
    GET /v1/jobs/{id}/metrics  If-None-Match

It prints the median requests/s of each over the rounds and the ratio to health's median in
the same run (the figure to read: absolute rates vary with the machine's other load).

    PYTHONPATH=. .venv/bin/python benchmarks/status_reads.py [--databases sqlite,postgresql]
        [--connections 8] [--seconds 3] [--rounds 3]
        [--url postgresql+psycopg://postgres@127.0.0.1:5432/test]
"""

import argparse
import http.client
import multiprocessing
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import sqlalchemy as sa

from app.api.jobs.service import new_job
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.keys import create_key
from app.core.migrate import upgrade
from app.core.models import EpochMetric, JobAttempt, utcnow
from app.core.spec import JobSpec
from tests.support.processes import Processes

JOBS = 50
EPOCHS = 100
SPEC = {
    "name": "bench",
    "dataset": {"name": "digits"},
    "model": {
        "architecture": "mlp",
        "hidden_sizes": [128, 64],
        "normalization": {"type": "batch_norm"},
        "dropout": {"rate": 0.2},
    },
    "epochs": EPOCHS,
}


def _layers(epoch: int) -> list[dict[str, Any]]:
    """What worker/training/diagnostics.py epoch_report() writes for an MLP [128, 64] + BN."""
    scale = 1.0 + epoch / EPOCHS
    layers: list[dict[str, Any]] = [
        {"name": name, "kind": kind, "weight_norm": 3.1 * scale, "grad_norm": 0.0123 / scale}
        for name, kind in [
            ("net.0", "Linear"),
            ("net.1", "BatchNorm1d"),
            ("net.4", "Linear"),
            ("net.5", "BatchNorm1d"),
            ("net.8", "Linear"),
        ]
    ]
    layers += [
        {
            "name": name,
            "kind": "activation",
            "pre_activation_mean": 0.0123 * scale,
            "pre_activation_std": 0.987 * scale,
        }
        for name in ("net.0", "net.4")
    ]
    return layers


def seed(url: str) -> tuple[str, str]:
    """Migrate and fill the database; returns (the newest job's id, a default-tenant key)."""
    upgrade(url)
    engine = create_db_engine(url)
    factory = create_session_factory(engine)
    spec = JobSpec.model_validate(SPEC)
    started = utcnow() - timedelta(hours=2)
    with transaction(factory) as session:
        _, key = create_key(session, "default", description="benchmark")
        newest = None
        for index in range(JOBS):
            job = new_job(spec, tenant="default")
            job.created_at = started + timedelta(seconds=index)
            job.started_at = job.created_at + timedelta(seconds=1)
            job.finished_at = job.created_at + timedelta(minutes=5)
            job.status = "succeeded"
            job.attempts = 2
            job.progress_epoch = EPOCHS
            job.summary = {
                "best_val_accuracy": 0.97,
                "best_epoch": 88,
                "final_train_loss": 0.05,
                "final_val_loss": 0.11,
                "final_val_accuracy": 0.965,
                "final_generalization_gap": 0.06,
                "epochs_completed": EPOCHS,
                "stopped_early": False,
                "parameters": 17_000,
                "device": "cpu",
                "precision": "fp32",
            }
            session.add(job)
            session.flush()
            session.add_all(
                [
                    JobAttempt(
                        job_id=job.id,
                        attempt=1,
                        worker_id="bench-host:1:0",
                        started_at=job.started_at,
                        ended_at=job.started_at + timedelta(minutes=1),
                        outcome="lost",
                    ),
                    JobAttempt(
                        job_id=job.id,
                        attempt=2,
                        worker_id="bench-host:1:1",
                        started_at=job.started_at + timedelta(minutes=2),
                        ended_at=job.finished_at,
                        outcome="succeeded",
                    ),
                ]
            )
            newest = job
        assert newest is not None
        session.add_all(
            EpochMetric(
                job_id=newest.id,
                epoch=epoch,
                attempt=1 if epoch <= 20 else 2,
                train_loss=1.0 / epoch,
                train_accuracy=1.0 - 0.5 / epoch,
                val_loss=1.1 / epoch,
                val_accuracy=0.99 - 0.5 / epoch,
                lr=0.1,
                epoch_seconds=0.0456,
                diagnostics={
                    "train_eval_loss": 0.9 / epoch,
                    "train_eval_accuracy": 1.0 - 0.4 / epoch,
                    "generalization_gap": 0.2 / epoch,
                    "accuracy_gap": 0.1 / epoch,
                    "grad_norm_mean": 0.5,
                    "grad_norm_max": 1.5,
                    "step_loss_std": 0.05,
                    "layers": _layers(epoch),
                },
            )
            for epoch in range(1, EPOCHS + 1)
        )
        job_id = str(newest.id)
    engine.dispose()
    return job_id, key


@contextmanager
def database(kind: str, admin_url: str, workdir: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{workdir}/bench.db"
        return
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"trainsvc_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as connection:
        connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# --- load generation -------------------------------------------------------------------------


def load(url: str, headers: dict[str, str], connections: int, seconds: float) -> float:
    """Requests/s over `connections` keep-alive connections for `seconds`."""
    if shutil.which("wrk"):
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
        for name, value in headers.items():
            command += ["-H", f"{name}: {value}"]
        output = subprocess.run([*command, url], capture_output=True, text=True, check=True).stdout
        errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
        if errors:
            raise RuntimeError(f"{url}: {errors.group(1)} error responses\n{output}")
        match = re.search(r"Requests/sec:\s+([\d.]+)", output)
        assert match, output
        return float(match.group(1))
    # No wrk: Python threads with http.client, in a process of their own.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        rate: float = pool.apply(_python_load, (url, headers, connections, seconds))
    return rate


def _python_load(url: str, headers: dict[str, str], connections: int, seconds: float) -> float:
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    deadline = time.perf_counter() + seconds
    counts = [0] * connections

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port)
        while time.perf_counter() < deadline:
            connection.request("GET", target, headers=headers)
            response = connection.getresponse()
            response.read()
            if response.status >= 400:
                raise RuntimeError(f"{url}: {response.status}")
            counts[index] += 1
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(connections)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


# --- one database ----------------------------------------------------------------------------


def _targets(
    base: str, job_id: str, headers: dict[str, str]
) -> list[tuple[str, str, dict[str, str]]]:
    """(label, url, headers) per measurement; the 304 rows only where the server sends ETags."""
    targets = [
        ("GET /v1/health", f"{base}/v1/health", {}),
        ("GET /v1/jobs/{id}", f"{base}/v1/jobs/{job_id}", headers),
        ("GET /v1/jobs/{id} -> 304", f"{base}/v1/jobs/{job_id}", headers),
        ("GET /v1/jobs?limit=50", f"{base}/v1/jobs?limit=50", headers),
        ("GET /v1/jobs/{id}/metrics", f"{base}/v1/jobs/{job_id}/metrics", headers),
        ("GET .../metrics -> 304", f"{base}/v1/jobs/{job_id}/metrics", headers),
    ]
    checked = []
    with httpx.Client(timeout=30) as client:
        for label, url, sent in targets:
            response = client.get(url, headers=sent)
            assert response.status_code == 200, (label, response.status_code, response.text)
            if label.endswith("-> 304"):
                etag = response.headers.get("etag")
                if etag is None:
                    continue
                sent = {**sent, "If-None-Match": etag}
                conditional = client.get(url, headers=sent)
                assert conditional.status_code == 304, (label, conditional.status_code)
            elif label == "GET /v1/jobs?limit=50":
                assert len(response.json()["items"]) == JOBS
            elif label == "GET /v1/jobs/{id}/metrics":
                assert len(response.json()["epochs"]) == EPOCHS
            checked.append((label, url, sent))
    return checked


def measure(kind: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as folder, database(kind, args.url, Path(folder)) as url:
        job_id, key = seed(url)
        processes = Processes(
            Path(folder),
            {
                "TRAINSVC_DATABASE_URL": url,
                "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{folder}/broker.db",
                # The benchmark is one key polling as fast as it can: no rate limit.
                "TRAINSVC_KEY_REQUESTS_PER_SECOND": "1e9",
                "TRAINSVC_KEY_REQUEST_BURST": str(10**9),
                "OMP_NUM_THREADS": "1",
            },
        )
        try:
            variants = {}
            for auth in ("on", "off"):
                processes.env["TRAINSVC_AUTH"] = auth
                base = processes.api("serve")
                headers = {"Authorization": f"Bearer {key}"} if auth == "on" else {}
                variants[f"auth {auth}"] = _targets(base, job_id, headers)
            rates: dict[tuple[str, str], list[float]] = {}
            for _ in range(args.rounds):
                for variant, targets in variants.items():
                    for label, target, sent in targets:
                        rate = load(target, sent, args.connections, args.seconds)
                        rates.setdefault((variant, label), []).append(rate)
        finally:
            processes.stop_all()
    print(
        f"\n{kind}: {args.connections} keep-alive connections, {args.seconds:g} s each, "
        f"median of {args.rounds} interleaved rounds"
    )
    print("| auth | endpoint | requests/s | ratio to health |\n| --- | --- | ---: | ---: |")
    for variant in variants:
        health = statistics.median(rates[(variant, "GET /v1/health")])
        for (name, label), values in rates.items():
            if name == variant:
                median = statistics.median(values)
                print(f"| {variant} | {label} | {median:.0f} | {median / health:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_generator = "wrk -t1" if shutil.which("wrk") else "Python threads (no wrk found)"
    print(f"load generator: {load_generator}")
    for kind in args.databases.split(","):
        measure(kind, args)


if __name__ == "__main__":
    main()
