"""Checkpoints stored in place and at a cadence, and resumes that stay exact (issue 7, item 5).

The `last` checkpoint is rewritten at most every checkpoint_every_seconds (and after the final
epoch, and when an attempt is stopped), as an UPDATE of its one row; epochs that a resume
trains again replace their stored metrics instead of being stored twice.
"""

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load as load_tensors
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker, undefer

from app.core import lifecycle
from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.lifecycle import CheckpointBlob
from app.core.models import Checkpoint, EpochMetric, Job, utcnow
from app.core.outbox import Dispatcher
from app.core.spec import JobSpec
from tests.factories import METRICS, make_job
from tests.training.helpers import data_for
from worker import execution
from worker.execution import WorkerContext, execute_job
from worker.training.loop import EpochResult, TrainingRun

SMALL = {
    "dataset": {"name": "digits", "train_subset": 128, "batch_size": 32},
    "model": {
        "hidden_sizes": [16, 8],
        "normalization": {"type": "batch_norm"},
        "dropout": {"rate": 0.2},
    },
    "epochs": 4,
}


def _blob(kind: str, epoch: int) -> CheckpointBlob:
    return CheckpointBlob(kind, epoch, f"weights {epoch}".encode(), b"state", "0" * 64)


def _checkpoints(session: Session, job: Job) -> dict[str, Checkpoint]:
    session.expire_all()
    rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)).all()
    return {row.kind: row for row in rows}


def test_a_rewritten_checkpoint_keeps_its_row_and_moves_created_at(session: Session) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    lifecycle.record_epoch(
        session, job.id, 1, 1, METRICS, {}, [_blob("last", 1), _blob("best", 1)], 30
    )
    first = {kind: (row.id, row.created_at) for kind, row in _checkpoints(session, job).items()}
    time.sleep(0.01)
    lifecycle.record_epoch(session, job.id, 1, 2, METRICS, {}, [_blob("last", 2)], 30)
    rows = _checkpoints(session, job)
    assert rows["last"].id == first["last"][0]  # the same row, rewritten in place
    assert rows["last"].epoch == 2
    assert rows["last"].created_at > first["last"][1]
    assert (rows["best"].id, rows["best"].epoch) == (first["best"][0], 1)  # untouched
    weights = session.scalar(select(Checkpoint.weights).where(Checkpoint.id == rows["last"].id))
    assert weights == b"weights 2"


def test_an_epoch_trained_again_after_a_resume_replaces_its_metrics(session: Session) -> None:
    job = make_job(session)
    assert lifecycle.claim(session, job.id, "w1#1", 30) is not None
    for epoch in (1, 2, 3):
        lifecycle.record_epoch(session, job.id, 1, epoch, METRICS, {}, [], 30)
    # The worker is lost; its `last` checkpoint (none here) is older than its metrics.
    session.execute(
        update(Job).where(Job.id == job.id).values(lease_expires_at=utcnow() - timedelta(1))
    )
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == [job.id]
    assert lifecycle.claim(session, job.id, "w2#1", 30) is not None
    lifecycle.record_epoch(session, job.id, 2, 1, {**METRICS, "val_loss": 0.9}, {}, [], 30)
    session.expire_all()
    rows = session.scalars(
        select(EpochMetric).where(EpochMetric.job_id == job.id).order_by(EpochMetric.epoch)
    ).all()
    assert [(r.epoch, r.attempt, r.val_loss) for r in rows] == [
        (1, 2, 0.9),
        (2, 1, 1.1),
        (3, 1, 1.1),
    ]
    # The progress a client sees does not go back while the rerun catches up.
    assert session.get(Job, job.id).progress_epoch == 3  # type: ignore[union-attr]


# -- through the worker's execution, with real (small) training ----------------------------------


@pytest.fixture
def context(session_factory: sessionmaker[Session], settings: Settings) -> Iterator[WorkerContext]:
    # No control polling during the test: its thread would share the test's one connection.
    quiet = settings.model_copy(update={"control_poll_seconds": 3600.0})
    yield WorkerContext(
        quiet, session_factory, Dispatcher(create_celery_app(quiet), session_factory), "n@h#1"
    )
    execution.shutdown_requested.clear()


def _with_cadence(ctx: WorkerContext, seconds: float) -> WorkerContext:
    settings = ctx.settings.model_copy(update={"checkpoint_every_seconds": seconds})
    return WorkerContext(settings, ctx.session_factory, ctx.dispatcher, ctx.worker_id)


def _spy_checkpoint_writes(monkeypatch: pytest.MonkeyPatch) -> list[list[tuple[str, int]]]:
    """Per epoch recorded, the checkpoints written with it."""
    writes: list[list[tuple[str, int]]] = []
    record_epoch = lifecycle.record_epoch

    def spy(*args: Any, **kwargs: Any) -> None:
        writes.append([(blob.kind, blob.epoch) for blob in args[6]])
        record_epoch(*args, **kwargs)

    monkeypatch.setattr(lifecycle, "record_epoch", spy)
    return writes


def _uninterrupted(spec: JobSpec) -> tuple[TrainingRun, list[EpochResult]]:
    run = TrainingRun(spec, data_for(spec))
    return run, list(run.epochs())


def _stored(ctx: WorkerContext, job_id: Any) -> tuple[list[EpochMetric], dict[str, Checkpoint]]:
    with ctx.session_factory() as session:
        metrics = session.scalars(
            select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
        ).all()
        checkpoints = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .options(undefer(Checkpoint.weights), undefer(Checkpoint.trainer_state))
        ).all()
        return list(metrics), {c.kind: c for c in checkpoints}


def _same_numbers(stored: EpochMetric, result: EpochResult) -> bool:
    fields = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")
    numbers_equal = all(getattr(stored, f) == result.metrics[f] for f in fields)
    return numbers_equal and stored.diagnostics == result.diagnostics


def _new_job(ctx: WorkerContext) -> Job:
    with ctx.session_factory() as session:
        job = make_job(session, **SMALL)
        session.commit()
    return job


def test_the_last_checkpoint_waits_for_its_cadence_but_not_for_the_final_epoch(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes = _spy_checkpoint_writes(monkeypatch)
    ctx = _with_cadence(context, 3600)
    job = _new_job(ctx)
    assert execute_job(ctx, job.id) == "succeeded"
    assert writes[:3] == [[], [], []]
    # The final epoch writes `last`, and `best` if a best epoch is newer than the stored one.
    assert writes[3][0] == ("last", 4)

    every_epoch = _with_cadence(context, 0)
    writes.clear()
    assert execute_job(every_epoch, _new_job(ctx).id) == "succeeded"
    assert [w[0] for w in writes] == [("last", e) for e in (1, 2, 3, 4)]


def test_a_hand_back_mid_epoch_stores_the_last_completed_epoch_and_resumes_exactly(
    context: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = _with_cadence(context, 3600)  # nothing stored on the way: only the stop writes
    job = _new_job(ctx)
    record = execution.record

    def record_then_stop_after_epoch_2(*args: Any) -> None:
        record(*args)
        if args[3].epoch == 2:
            execution.shutdown_requested.set()  # as a SIGTERM does: stop at the next batch

    monkeypatch.setattr(execution, "record", record_then_stop_after_epoch_2)
    assert execute_job(ctx, job.id) == "handed_back"
    metrics, checkpoints = _stored(ctx, job.id)
    assert [m.epoch for m in metrics] == [1, 2]
    assert (checkpoints["last"].epoch, checkpoints["last"].attempt) == (2, 1)
    last_id = checkpoints["last"].id

    execution.shutdown_requested.clear()
    monkeypatch.setattr(execution, "record", record)
    assert execute_job(ctx, job.id) == "succeeded"

    full, full_results = _uninterrupted(JobSpec.model_validate(job.spec))
    metrics, checkpoints = _stored(ctx, job.id)
    assert [(m.epoch, m.attempt) for m in metrics] == [(1, 1), (2, 1), (3, 2), (4, 2)]
    assert all(_same_numbers(m, r) for m, r in zip(metrics, full_results, strict=True))
    assert (checkpoints["last"].id, checkpoints["last"].epoch) == (last_id, 4)
    resumed = load_tensors(checkpoints["last"].weights)
    expected = full.model.state_dict()
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)


def test_a_resume_from_an_older_checkpoint_is_exact_and_stores_no_epoch_twice(
    context: WorkerContext,
) -> None:
    """A lost worker stored metrics up to epoch 3 but its `last` checkpoint only at epoch 1."""
    ctx = _with_cadence(context, 3600)
    job = _new_job(ctx)
    spec = JobSpec.model_validate(job.spec)
    early = TrainingRun(spec, data_for(spec))
    next(early.epochs())
    with ctx.session_factory() as session:
        assert lifecycle.claim(session, job.id, "lost@h#1", 30) is not None
        epoch_1 = CheckpointBlob("last", 1, early.weights(), early.trainer_state(), "0" * 64)
        for epoch in (1, 2, 3):
            lifecycle.record_epoch(
                session,
                job.id,
                1,
                epoch,
                {**METRICS, "val_loss": -1.0},  # numbers the rerun must replace
                {},
                [epoch_1] if epoch == 1 else [],
                30,
            )
        session.execute(
            update(Job).where(Job.id == job.id).values(lease_expires_at=utcnow() - timedelta(1))
        )
        lifecycle.reap_expired_leases(session, max_attempts=3)
        session.commit()

    assert execute_job(ctx, job.id) == "succeeded"
    full, full_results = _uninterrupted(spec)
    metrics, checkpoints = _stored(ctx, job.id)
    # Epochs 2 and 3 were trained again and replaced the lost attempt's rows; none twice.
    assert [(m.epoch, m.attempt) for m in metrics] == [(1, 1), (2, 2), (3, 2), (4, 2)]
    assert all(_same_numbers(m, r) for m, r in zip(metrics[1:], full_results[1:], strict=True))
    resumed = load_tensors(checkpoints["last"].weights)
    expected = full.model.state_dict()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    with ctx.session_factory() as session:
        summary = session.get(Job, job.id).summary  # type: ignore[union-attr]
    assert summary["best_epoch"] == full.summary()["best_epoch"]


def test_stored_weights_say_which_job_epoch_and_spec_they_are(
    context: WorkerContext, tmp_path: Any
) -> None:
    ctx = _with_cadence(context, 0)
    job = _new_job(ctx)
    assert execute_job(ctx, job.id) == "succeeded"
    _, checkpoints = _stored(ctx, job.id)
    for kind, checkpoint in checkpoints.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(checkpoint.weights)
        with safe_open(str(path), framework="pt") as opened:
            metadata = opened.metadata()
        assert metadata["job_id"] == str(job.id)
        assert metadata["epoch"] == str(checkpoint.epoch)
        assert json.loads(metadata["spec"]) == job.spec
