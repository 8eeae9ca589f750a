"""A worker killed (SIGKILL) or told to stop (SIGTERM) mid-job: the job finishes elsewhere, once."""

import os
import signal
import time
import uuid
from typing import Any

import pytest
import torch
from safetensors.torch import load
from sqlalchemy import select
from sqlalchemy.orm import undefer

from app.core.catalog import BUILTIN_DATASETS
from app.core.models import Checkpoint, EpochMetric
from app.core.spec import JobSpec
from tests.faults.conftest import LEASE_SECONDS, slow_spec
from tests.support.processes import Processes, Worker, wait_until
from worker.training.data import load_builtin, prepare
from worker.training.loop import TrainingRun

pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults"), pytest.mark.timeout(180)]


def _reference_weights(spec: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The same spec trained in this process without interruption."""
    parsed = JobSpec.model_validate(spec)
    info = BUILTIN_DATASETS[parsed.dataset.name]
    run = TrainingRun(parsed, prepare(parsed.dataset, info, load_builtin(parsed.dataset)))
    for _ in run.epochs():
        pass
    return load(run.weights())


def _worker_in_the_middle_of_a_job(
    processes: Processes, jobs: Any, epochs_stored: int
) -> tuple[Worker, uuid.UUID]:
    """A worker training a 5-epoch slow job, returned once `epochs_stored` epochs are stored."""
    worker = processes.worker()
    job_id = jobs.submit(slow_spec(epochs=5))
    wait_until(
        lambda: jobs.get(job_id).progress_epoch >= epochs_stored,
        60,
        f"epoch {epochs_stored} to be stored",
    )
    return worker, job_id


def test_sigkill_mid_epoch_resumes_on_another_worker_with_identical_weights(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    # A checkpoint after every epoch, so the resume starts mid-run (with the default 30 s
    # cadence a short job would restart from scratch and prove less).
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url, checkpoint_every_seconds="0")
    first, job_id = _worker_in_the_middle_of_a_job(processes, jobs, epochs_stored=2)
    time.sleep(0.3)  # about half way through epoch 3
    first.kill()
    killed_at = time.monotonic()
    assert jobs.status(job_id) == "running"  # nobody told the database: only the lease can
    stored_when_killed = len(jobs.metric_epochs(job_id))  # 2, or 3 on a fast machine
    assert 2 <= stored_when_killed < 5

    processes.worker()
    wait_until(lambda: jobs.status(job_id) not in ("queued", "running"), 90, "the job to end")
    job = jobs.get(job_id)
    assert job.status == "succeeded", (job.error_type, job.error_message)
    recovered_seconds = time.monotonic() - killed_at

    # Every epoch stored exactly once: those stored before the kill by attempt 1, the rest by
    # the attempt that resumed from the last of them.
    assert jobs.metric_epochs(job_id) == [1, 2, 3, 4, 5]
    with jobs.session_factory() as session:
        stored_by = session.scalars(
            select(EpochMetric.attempt)
            .where(EpochMetric.job_id == job_id)
            .order_by(EpochMetric.epoch)
        ).all()
    assert list(stored_by) == [1] * stored_when_killed + [2] * (5 - stored_when_killed)
    history = jobs.attempts(job_id)
    assert [a.outcome for a in history] == ["lost", "succeeded"]
    assert history[0].worker_id != history[1].worker_id
    assert job.attempts == 2

    with jobs.session_factory() as session:
        last = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.kind == "last")
            .options(undefer(Checkpoint.weights))
        ).one()
        assert (last.epoch, last.attempt) == (5, 2)
        resumed = load(last.weights)
    reference = _reference_weights(slow_spec(epochs=5))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from an uninterrupted run"
    print(
        f"\nSIGKILL: job succeeded {recovered_seconds:.1f}s after the kill (lease {LEASE_SECONDS}s)"
    )


def test_sigterm_hands_the_job_back_at_once_and_it_finishes_on_another_worker(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    first, job_id = _worker_in_the_middle_of_a_job(processes, jobs, epochs_stored=1)

    first.terminate()  # to the main process only, as `docker stop` does
    terminated_at = time.monotonic()
    wait_until(lambda: jobs.status(job_id) == "queued", 10, "the job to be handed back")
    handed_back_seconds = time.monotonic() - terminated_at
    # Handed back, not lost: well inside one lease, and the worker exits by itself.
    assert handed_back_seconds < LEASE_SECONDS
    assert first.process.wait(timeout=30) == 0

    processes.worker()
    wait_until(lambda: jobs.status(job_id) not in ("queued", "running"), 90, "the job to end")
    job = jobs.get(job_id)
    assert job.status == "succeeded", (job.error_type, job.error_message)
    history = jobs.attempts(job_id)
    assert [a.outcome for a in history] == ["handed_back", "succeeded"]
    assert history[0].worker_id != history[1].worker_id
    assert jobs.metric_epochs(job_id) == [1, 2, 3, 4, 5]
    print(f"\nSIGTERM: job back in the queue {handed_back_seconds:.2f}s after the signal")


def test_sigterm_to_the_whole_process_group_also_hands_the_job_back(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    """systemd's default and `kill -- -PGID`: the pool process gets SIGTERM too."""
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    first, job_id = _worker_in_the_middle_of_a_job(processes, jobs, epochs_stored=1)
    os.killpg(first.process.pid, signal.SIGTERM)
    wait_until(lambda: jobs.status(job_id) == "queued", LEASE_SECONDS, "the job to be handed back")
    assert first.process.wait(timeout=30) == 0
    assert [a.outcome for a in jobs.attempts(job_id)] == ["handed_back"]
