"""A worker killed (SIGKILL) or told to stop (SIGTERM) mid-job: the job finishes elsewhere, once.

The same holds for every job of a pack (worker/packing.py): each is its own job, with its own
lease, reaped and resumed on its own.
"""

import os
import signal
import time
import uuid
from dataclasses import replace
from typing import Any

import pytest
import torch
from safetensors.torch import load
from sqlalchemy import select
from sqlalchemy.orm import undefer

from app.core.catalog import BUILTIN_DATASETS
from app.core.models import Checkpoint
from app.core.spec import JobSpec
from tests.factories import spec_payload
from tests.faults.conftest import LEASE_SECONDS, slow_spec, tiny_spec
from tests.support.processes import Processes, Worker, wait_until
from worker.training.data import load_builtin, prepare
from worker.training.loop import TrainingRun

pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults"), pytest.mark.timeout(180)]


def _reference_weights(
    spec: dict[str, Any], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The same spec trained alone in this process without interruption."""
    parsed = JobSpec.model_validate(spec)
    info = BUILTIN_DATASETS[parsed.dataset.name]
    data = prepare(parsed.dataset, info, load_builtin(parsed.dataset))
    # As the worker's load_data: the features in the training dtype.
    data = replace(data, x_train=data.x_train.to(dtype), x_val=data.x_val.to(dtype))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        run = TrainingRun(parsed, data)
        for _ in run.epochs():
            pass
    finally:
        torch.set_default_dtype(previous)
    return load(run.weights())


def _last_checkpoint(jobs: Any, job_id: uuid.UUID) -> Checkpoint:
    with jobs.session_factory() as session:
        last: Checkpoint = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id, Checkpoint.kind == "last")
            .options(undefer(Checkpoint.weights))
        ).one()
        session.expunge(last)
        return last


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
    assert jobs.metric_attempts(job_id) == [1] * stored_when_killed + [2] * (5 - stored_when_killed)
    history = jobs.attempts(job_id)
    assert [a.outcome for a in history] == ["lost", "succeeded"]
    assert history[0].worker_id != history[1].worker_id
    assert job.attempts == 2

    last = _last_checkpoint(jobs, job_id)
    assert (last.epoch, last.attempt) == (5, 2)
    resumed = load(last.weights)
    reference = _reference_weights(slow_spec(epochs=5))
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), f"{name} differs from an uninterrupted run"
    print(
        f"\nSIGKILL: job succeeded {recovered_seconds:.1f}s after the kill (lease {LEASE_SECONDS}s)"
    )


EPOCHS = 8


def _pack_spec(i: int) -> dict[str, Any]:
    """Trial i of a sweep that packs: one computation (batch norm, dropout, SGD with
    momentum), its own learning rate, dropout rate and seed; about 0.4 s an epoch packed.

    Not much smaller batches: batch norm over a handful of samples amplifies rounding step by
    step (batches of 4: 1e-16 after a step, 5e-7 after an epoch of 360, even for a pack of
    one), so a packed trial would drift from its job alone for a reason other than the pack."""
    return spec_payload(
        dataset={"name": "digits", "batch_size": 16},
        model={
            "architecture": "mlp",
            "hidden_sizes": [128, 128],
            "normalization": {"type": "batch_norm"},
            "dropout": {"rate": (0.1, 0.2, 0.3)[i]},
        },
        optimizer={"type": "sgd", "lr": (0.01, 0.02, 0.05)[i], "momentum": 0.9},
        epochs=EPOCHS,
        seed=30 + i,
    )


def test_sigkill_mid_pack_every_job_resumes_as_if_trained_alone(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    """Issue 11: worker loss puts every job of a pack back, and each resumes exactly.

    In float64 (TRAINSVC_TRAINING_DTYPE) a packed trial is its job alone to rounding, so each
    job, packed, killed and resumed (packed again or alone), must end with the weights of the
    same spec trained alone without a stop."""
    jobs = jobs_on(
        fresh_postgres_url,
        fresh_redis_url,
        checkpoint_every_seconds="0",
        training_dtype="float64",
        max_pack="8",
    )
    specs = [_pack_spec(i) for i in range(3)]
    # Only the first is published: its worker claims the other two as its pack's companions.
    ids = [jobs.submit(spec, publish=index == 0) for index, spec in enumerate(specs)]
    first = processes.worker()
    wait_until(
        lambda: all(jobs.get(job_id).progress_epoch >= 2 for job_id in ids),
        60,
        "epoch 2 of every job to be stored",
    )
    first.kill()
    killed = [jobs.get(job_id) for job_id in ids]
    assert [job.status for job in killed] == ["running"] * 3  # only the leases can tell
    assert killed[0].pack is not None
    assert {job.pack for job in killed} == {killed[0].pack}, "one pack of three"
    stored_when_killed = [len(jobs.metric_epochs(job_id)) for job_id in ids]
    assert all(2 <= stored < EPOCHS for stored in stored_when_killed), stored_when_killed

    processes.worker()
    wait_until(lambda: jobs.all_ended(ids), 120, "every job of the pack to end")
    for job_id, spec, stored in zip(ids, specs, stored_when_killed, strict=True):
        job = jobs.get(job_id)
        assert job.status == "succeeded", (job.error_type, job.error_message)
        assert [a.outcome for a in jobs.attempts(job_id)] == ["lost", "succeeded"]
        assert jobs.metric_epochs(job_id) == list(range(1, EPOCHS + 1))  # each stored once
        assert jobs.metric_attempts(job_id) == [1] * stored + [2] * (EPOCHS - stored)
        last = _last_checkpoint(jobs, job_id)
        assert (last.epoch, last.attempt) == (EPOCHS, 2)
        resumed = load(last.weights)
        reference = _reference_weights(spec, torch.float64)
        assert resumed.keys() == reference.keys()
        for name, tensor in reference.items():
            difference = float((resumed[name] - tensor).abs().max())
            assert difference < 1e-10, f"job {job_id}: {name} differs by {difference}"


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


def test_sigterm_after_a_pool_process_was_killed_still_hands_the_job_back(
    processes: Processes, jobs_on: Any, fresh_postgres_url: str, fresh_redis_url: str
) -> None:
    """A pool process lost (OOM-killer) while it waited for the node to stop must not hang the
    node's shutdown: a multiprocessing.Event's set() waited for ever for that dead waiter to
    wake, before the running jobs were asked to hand back (`up` killed the worker after 60 s)."""
    jobs = jobs_on(fresh_postgres_url, fresh_redis_url)
    worker = processes.worker()
    warm_up = jobs.submit(tiny_spec())  # the pool process is initialized once it has trained
    wait_until(lambda: jobs.status(warm_up) == "succeeded", 60, "the first job to succeed")
    lost = worker.pool_child()
    assert lost is not None
    os.kill(lost, signal.SIGKILL)
    wait_until(lambda: worker.pool_child() not in (None, lost), 30, "a new pool process")
    job_id = jobs.submit(slow_spec(epochs=50))  # far longer than the test waits
    wait_until(lambda: jobs.get(job_id).progress_epoch >= 1, 60, "epoch 1 to be stored")

    worker.terminate()
    wait_until(lambda: jobs.status(job_id) == "queued", LEASE_SECONDS, "the job to be handed back")
    assert worker.process.wait(timeout=30) == 0
    assert [a.outcome for a in jobs.attempts(job_id)] == ["handed_back"]
