"""Packed attempts (worker/packing.py): a worker that claims a job trains its tenant's queued
jobs that pack with it as one PackedRun, and every job stays a job.

The comparison with the same jobs trained one at a time (TRAINSVC_MAX_PACK=1) runs in float64,
where a packed trial equals its job alone to rounding (below 1e-10; tests/training/
test_packed.py); in float32 the pack's kernels round differently and the stored numbers agree
to FLOAT32_TOLERANCE (measured: see docs/benchmarks.md, "Packed trials through the service").
"""

import itertools
import os
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY
from safetensors.torch import load as load_tensors
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker, undefer

from app.core import lifecycle
from app.core.broker import create_celery_app
from app.core.catalog import BUILTIN_DATASETS
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.migrate import upgrade
from app.core.models import Checkpoint, EpochMetric, Job, utcnow
from app.core.outbox import Dispatcher
from app.core.spec import JobSpec
from tests.factories import make_job
from worker import execution
from worker.execution import WorkerContext, execute_job
from worker.packing import pack_capacity
from worker.training.loop import TrainingRun
from worker.training.packed import PackedRun, free_memory_bytes, trial_memory_bytes

FLOAT64_TOLERANCE = 1e-10
FLOAT32_TOLERANCE = 1e-5  # metrics and weights after 3 epochs; measured: at most 5.1e-7
NUMBERS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr")


def _spec(i: int, **changes: Any) -> dict[str, Any]:
    """Trial i of a small sweep: one computation, different numbers (lr, rates, seed)."""
    spec: dict[str, Any] = {
        "dataset": {"name": "digits", "train_subset": 128, "batch_size": 32},
        "model": {
            "hidden_sizes": [16, 8],
            "normalization": {"type": "batch_norm", "momentum": 0.1 + 0.05 * i},
            "dropout": {"rate": (0.2, 0.1, 0.3)[i % 3]},
        },
        "optimizer": {"type": "sgd", "lr": (0.05, 0.1, 0.02)[i % 3], "momentum": 0.9},
        "epochs": 3,
        "seed": 11 + i,
    }
    spec.update(changes)
    return spec


def _context(settings: Settings, factory: sessionmaker[Session], **changes: Any) -> WorkerContext:
    tuned = settings.model_copy(update=changes)
    return WorkerContext(
        tuned, factory, Dispatcher(create_celery_app(tuned), factory), "node@host#1"
    )


@pytest.fixture
def quiet(
    session_factory: sessionmaker[Session], settings: Settings
) -> Iterator[Callable[..., WorkerContext]]:
    """Contexts on the test's rolled-back transaction, with no control polling (its threads
    would share the test's one connection) and a checkpoint after every epoch."""

    def make(**changes: Any) -> WorkerContext:
        defaults = {"control_poll_seconds": 3600.0, "checkpoint_every_seconds": 0.0}
        return _context(settings, session_factory, **{**defaults, **changes})

    yield make
    execution.shutdown_requested.clear()


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request: pytest.FixtureRequest) -> Iterator[torch.dtype]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


def _jobs(
    factory: sessionmaker[Session], specs: list[dict[str, Any]], tenant: str = ""
) -> list[Any]:
    with factory() as session:
        jobs = [make_job(session, **spec) for spec in specs]
        for job in jobs:
            if tenant:
                job.tenant = tenant
        session.commit()
        return [job.id for job in jobs]


def _job(factory: sessionmaker[Session], job_id: Any) -> Job:
    with factory() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.attempt_history  # noqa: B018 (loaded while the session is open)
        return job


def _metrics(factory: sessionmaker[Session], job_id: Any) -> list[EpochMetric]:
    with factory() as session:
        return list(
            session.scalars(
                select(EpochMetric).where(EpochMetric.job_id == job_id).order_by(EpochMetric.epoch)
            )
        )


def _checkpoints(factory: sessionmaker[Session], job_id: Any) -> dict[str, Checkpoint]:
    with factory() as session:
        rows = session.scalars(
            select(Checkpoint)
            .where(Checkpoint.job_id == job_id)
            .options(undefer(Checkpoint.weights), undefer(Checkpoint.trainer_state))
        )
        return {row.kind: row for row in rows}


def _difference(factory: sessionmaker[Session], packed: Any, alone: Any) -> float:
    """The largest difference between two jobs' stored epochs and final weights."""
    worst = 0.0
    pairs = zip(_metrics(factory, packed), _metrics(factory, alone), strict=True)
    for a, b in pairs:
        assert a.epoch == b.epoch
        worst = max(worst, *(abs(getattr(a, name) - getattr(b, name)) for name in NUMBERS))
    weights = [load_tensors(_checkpoints(factory, job)["last"].weights) for job in (packed, alone)]
    assert weights[0].keys() == weights[1].keys()
    for name, tensor in weights[0].items():
        worst = max(worst, float((tensor.double() - weights[1][name].double()).abs().max()))
    return worst


@pytest.mark.parametrize("architecture", ["mlp", "resnet"])
def test_compatible_jobs_train_as_one_pack_and_equal_the_jobs_trained_alone(
    quiet: Callable[..., WorkerContext],
    session_factory: sessionmaker[Session],
    dtype: torch.dtype,
    architecture: str,
) -> None:
    specs = [_spec(i) for i in range(3)]
    if architecture == "resnet":  # the digits as 8x8 images, residual blocks with a projection
        for spec in specs:
            spec["model"] = {**spec["model"], "architecture": "resnet", "hidden_sizes": [4, 8]}
    packed = _jobs(session_factory, specs)
    assert execute_job(quiet(), packed[0]) == "succeeded"
    for job_id in packed[1:]:  # their own messages find them ended: nothing to do
        assert execute_job(quiet(), job_id) == "skipped"
    jobs = [_job(session_factory, job_id) for job_id in packed]
    assert jobs[0].pack is not None
    assert {job.pack for job in jobs} == {jobs[0].pack}
    for job in jobs:
        assert (job.status, job.attempts, job.progress_epoch) == ("succeeded", 1, 3)
        assert [a.outcome for a in job.attempt_history] == ["succeeded"]
        assert [(m.epoch, m.attempt) for m in _metrics(session_factory, job.id)] == [
            (1, 1),
            (2, 1),
            (3, 1),
        ]
        assert _checkpoints(session_factory, job.id)["last"].epoch == 3
        assert job.summary is not None
        assert job.summary["epochs_completed"] == 3

    alone = _jobs(session_factory, specs)
    for job_id in alone:
        assert execute_job(quiet(max_pack=1), job_id) == "succeeded"
        assert _job(session_factory, job_id).pack is None
    tolerance = FLOAT64_TOLERANCE if dtype == torch.float64 else FLOAT32_TOLERANCE
    for packed_id, alone_id in zip(packed, alone, strict=True):
        assert _difference(session_factory, packed_id, alone_id) < tolerance
        best = [_job(session_factory, job).summary["best_epoch"] for job in (packed_id, alone_id)]  # type: ignore[index]
        assert best[0] == best[1]


def test_other_tenants_and_other_computations_are_not_packed(
    quiet: Callable[..., WorkerContext], session_factory: sessionmaker[Session]
) -> None:
    leader, companion = _jobs(session_factory, [_spec(0, epochs=1), _spec(1, epochs=1)])
    (other_tenant,) = _jobs(session_factory, [_spec(2, epochs=1)], tenant="other")
    layer_norm = _spec(2, epochs=1)
    layer_norm["model"] = {**layer_norm["model"], "normalization": {"type": "layer_norm"}}
    wider = _spec(2, epochs=1)
    wider["model"] = {**wider["model"], "hidden_sizes": [32, 8]}
    longer = _spec(2, epochs=2)
    other_data = _spec(2, epochs=1, dataset={"name": "iris", "batch_size": 32})
    apart = _jobs(session_factory, [layer_norm, wider, longer, other_data])
    assert execute_job(quiet(), leader) == "succeeded"
    pack = _job(session_factory, leader).pack
    assert pack is not None
    assert _job(session_factory, companion).pack == pack
    for job_id in (other_tenant, *apart):
        job = _job(session_factory, job_id)
        assert (job.status, job.attempts, job.pack) == ("queued", 0, None)


def test_a_job_that_packs_with_nothing_trains_alone_and_shows_no_pack(
    quiet: Callable[..., WorkerContext], session_factory: sessionmaker[Session]
) -> None:
    (job_id,) = _jobs(session_factory, [_spec(0, epochs=1)])
    assert execute_job(quiet(), job_id) == "succeeded"
    assert _job(session_factory, job_id).pack is None


def test_the_pack_holds_at_most_max_pack_jobs_oldest_first(
    quiet: Callable[..., WorkerContext], session_factory: sessionmaker[Session]
) -> None:
    ids = _jobs(session_factory, [_spec(i, epochs=1) for i in range(4)])
    assert execute_job(quiet(max_pack=3), ids[0]) == "succeeded"
    statuses = [_job(session_factory, job_id).status for job_id in ids]
    assert statuses == ["succeeded", "succeeded", "succeeded", "queued"]


def test_the_pack_holds_no_more_jobs_than_fit_in_its_memory_budget(
    quiet: Callable[..., WorkerContext], session_factory: sessionmaker[Session]
) -> None:
    specs = [_spec(i, epochs=1) for i in range(4)]
    ids = _jobs(session_factory, specs)
    per_trial = trial_memory_bytes(JobSpec.model_validate(specs[0]), BUILTIN_DATASETS["digits"])
    context = quiet(max_pack=8, pack_memory_bytes=int(2.5 * per_trial))
    assert execute_job(context, ids[0]) == "succeeded"
    jobs = [_job(session_factory, job_id) for job_id in ids]
    assert [job.status for job in jobs] == ["succeeded", "succeeded", "queued", "queued"]
    assert jobs[0].pack is not None
    assert jobs[0].pack == jobs[1].pack


def test_by_default_the_budget_is_half_the_free_memory_of_the_device(
    quiet: Callable[..., WorkerContext],
) -> None:
    spec = JobSpec.model_validate(_spec(0))
    free = free_memory_bytes(torch.device("cpu"))
    assert free is not None
    assert 0 < free <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    per_trial = trial_memory_bytes(spec, BUILTIN_DATASETS["digits"])
    expected = min(1000, free // 2 // per_trial)
    assert pack_capacity(quiet(max_pack=1000), spec) == expected
    assert pack_capacity(quiet(max_pack=3), spec) == 3  # small trials: the setting decides


def test_a_diverging_trial_fails_alone_and_the_others_go_on(
    quiet: Callable[..., WorkerContext], session_factory: sessionmaker[Session]
) -> None:
    plain = {"hidden_sizes": [16, 8], "normalization": {"type": "none"}, "dropout": {"rate": 0.1}}
    specs = [_spec(i, model=plain) for i in range(3)]
    # lr * weight_decay = 1000: each step multiplies the weights by about -1000, and the loss
    # is infinite within the first epoch (before any epoch of it is stored).
    specs[1]["optimizer"] = {"type": "sgd", "lr": 100.0, "momentum": 0.9, "weight_decay": 10.0}
    ids = _jobs(session_factory, specs)
    assert execute_job(quiet(), ids[0]) == "succeeded"
    jobs = [_job(session_factory, job_id) for job_id in ids]
    assert [job.status for job in jobs] == ["succeeded", "failed", "succeeded"]
    assert jobs[1].error_type == "diverged"
    assert (jobs[1].error_message or "").startswith("loss became NaN or infinite at epoch 1")
    assert _metrics(session_factory, ids[1]) == []
    assert [a.outcome for a in jobs[1].attempt_history] == ["failed"]
    assert [m.epoch for m in _metrics(session_factory, ids[0])] == [1, 2, 3]
    assert [m.epoch for m in _metrics(session_factory, ids[2])] == [1, 2, 3]


def test_a_hand_back_stops_every_trial_and_each_resumes_exactly(
    quiet: Callable[..., WorkerContext],
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGTERM mid-pack: every job goes back to the queue at its last completed epoch; the
    next worker packs them again, and each ends as the same job trained without a stop."""
    torch.set_default_dtype(torch.float64)
    try:
        specs = [_spec(i) for i in range(3)]
        ids = _jobs(session_factory, specs)
        record = execution.record

        def record_then_stop_after_epoch_2(*args: Any) -> None:
            record(*args)
            if args[3].epoch == 2 and args[1].job_id == ids[2]:
                execution.shutdown_requested.set()  # as a SIGTERM does

        monkeypatch.setattr(execution, "record", record_then_stop_after_epoch_2)
        assert execute_job(quiet(), ids[0]) == "handed_back"
        for job_id in ids:
            job = _job(session_factory, job_id)
            assert (job.status, job.attempts) == ("queued", 1)
            assert [a.outcome for a in job.attempt_history] == ["handed_back"]
            assert _checkpoints(session_factory, job_id)["last"].epoch == 2
        execution.shutdown_requested.clear()
        monkeypatch.setattr(execution, "record", record)
        assert execute_job(quiet(), ids[1]) == "succeeded"  # another leader: order is no matter
        uninterrupted = _jobs(session_factory, specs)
        assert execute_job(quiet(), uninterrupted[0]) == "succeeded"
        for job_id, twin in zip(ids, uninterrupted, strict=True):
            job = _job(session_factory, job_id)
            assert (job.status, job.attempts) == ("succeeded", 2)
            assert [(m.epoch, m.attempt) for m in _metrics(session_factory, job_id)] == [
                (1, 1),
                (2, 1),
                (3, 2),
            ]
            assert _difference(session_factory, job_id, twin) < FLOAT64_TOLERANCE
    finally:
        torch.set_default_dtype(torch.float32)


class _DeviceFits:
    """A device that fits no more than `trials` trials at once from a run's epoch `from_epoch`
    on: a PackedRun step over more (or a job alone's epoch, where `trials` is 0) raises
    CUDA's out-of-memory error (a GPU is what runs out here; this machine has none). Records
    the size of every PackedRun built, and how many of the runs built before it were still
    alive, holding their memory."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, trials: int, from_epoch: int) -> None:
        self.sizes: list[int] = []
        self.alive: list[int] = []
        runs: list[weakref.ref[PackedRun]] = []
        build, step, epoch = PackedRun.__init__, PackedRun._train_step, TrainingRun._train_epoch

        def out_of_memory() -> torch.OutOfMemoryError:
            return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def built(run: PackedRun, specs: list[JobSpec], *args: Any, **kwargs: Any) -> None:
            self.sizes.append(len(specs))
            self.alive.append(sum(earlier() is not None for earlier in runs))
            runs.append(weakref.ref(run))
            build(run, specs, *args, **kwargs)

        def stepped(run: PackedRun, *args: Any) -> Any:
            if len(run.active) > trials and run.active[0].progress.epoch + 1 >= from_epoch:
                raise out_of_memory()
            return step(run, *args)

        def alone(run: TrainingRun, number: int, *args: Any) -> Any:
            if trials < 1 and number >= from_epoch:
                raise out_of_memory()
            return epoch(run, number, *args)

        monkeypatch.setattr(PackedRun, "__init__", built)
        monkeypatch.setattr(PackedRun, "_train_step", stepped)
        monkeypatch.setattr(TrainingRun, "_train_epoch", alone)


def _splits() -> float:
    return REGISTRY.get_sample_value("trainsvc_pack_splits_total") or 0.0


def test_a_pack_out_of_memory_trains_on_as_smaller_packs_each_job_exactly_once(
    quiet: Callable[..., WorkerContext],
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pack of 4 outgrows its device in its second epoch: two of its jobs train on as a
    pack of 2 from their first epoch, in the same attempt, and the other two go back to the
    queue, to be packed again from theirs. No epoch is stored twice, and each job ends as the
    same job trained alone. This process then packs no more than 2 of them."""
    torch.set_default_dtype(torch.float64)
    try:
        specs = [_spec(i) for i in range(4)]
        ids = _jobs(session_factory, specs)
        device = _DeviceFits(monkeypatch, trials=2, from_epoch=2)
        recorded = _calls(monkeypatch, "record_epoch")
        stored = _calls(monkeypatch, "store_checkpoints")
        splits = _splits()
        # Checkpoints only at the end: the split itself must store each job's first epoch
        # (and its best) for the smaller packs to resume from.
        context = quiet(checkpoint_every_seconds=3600.0)
        assert execute_job(context, ids[0]) == "succeeded"

        assert device.sizes == [4, 2]
        assert _splits() - splits == 1
        for job_id in ids[2:]:  # back in the queue, not waiting here as `running`
            job = _job(session_factory, job_id)
            assert (job.status, job.attempts, job.lease_owner) == ("queued", 1, None)
            assert job.published_at is not None  # sent to the broker now, not by the outbox
            assert [a.outcome for a in job.attempt_history] == ["handed_back"]
            assert _checkpoints(session_factory, job_id)["last"].epoch == 1
        spec = JobSpec.model_validate(specs[0])
        assert pack_capacity(context, spec) == 2
        assert pack_capacity(quiet(), spec) == 8  # another process has not learned it
        assert execute_job(context, ids[2]) == "succeeded"  # packed again, with its fellow

        assert device.sizes == [4, 2, 2]
        assert device.alive == [0, 0, 0]  # the pack that ran out was freed before its half
        assert sorted(map(str, stored)) == sorted(map(str, ids))  # each once, at the split
        assert sorted(map(str, recorded)) == sorted(map(str, ids * 3))  # 3 epochs, once each
        jobs = [_job(session_factory, job_id) for job_id in ids]
        assert None not in {jobs[0].pack, jobs[2].pack}
        assert jobs[0].pack != jobs[2].pack
        alone = _jobs(session_factory, specs)
        for job_id in alone:
            assert execute_job(quiet(max_pack=1), job_id) == "succeeded"
        for job, twin in zip(jobs, alone, strict=True):
            kept = job.id in ids[:2]
            assert job.status == "succeeded"
            assert job.pack == (jobs[0].pack if kept else jobs[2].pack)
            assert [a.outcome for a in job.attempt_history] == (
                ["succeeded"] if kept else ["handed_back", "succeeded"]
            )
            assert [(m.epoch, m.attempt) for m in _metrics(session_factory, job.id)] == (
                [(1, 1), (2, 1), (3, 1)] if kept else [(1, 1), (2, 2), (3, 2)]
            )
            assert _difference(session_factory, job.id, twin) < FLOAT64_TOLERANCE
            best = [_job(session_factory, i).summary["best_epoch"] for i in (job.id, twin)]  # type: ignore[index]
            assert best[0] == best[1]
            assert _checkpoints(session_factory, job.id)["best"].epoch == best[0]
    finally:
        torch.set_default_dtype(torch.float32)


def test_a_pack_that_fits_nowhere_fails_each_job_out_of_memory_as_alone(
    quiet: Callable[..., WorkerContext],
    session_factory: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ids = _jobs(session_factory, [_spec(i, epochs=1) for i in range(3)])
    device = _DeviceFits(monkeypatch, trials=0, from_epoch=1)
    context = quiet()
    assert execute_job(context, ids[0]) == "failed"
    assert device.sizes == [3, 2, 1]  # halved down to the leader alone
    assert device.alive == [0, 0, 0]
    assert [_job(session_factory, job_id).status for job_id in ids] == [
        "failed",
        "queued",
        "queued",
    ]
    assert pack_capacity(context, JobSpec.model_validate(_spec(0, epochs=1))) == 1
    # The others, handed back, are each claimed alone in this process, and fail as they would
    # unpacked.
    assert [execute_job(context, job_id) for job_id in ids[1:]] == ["failed", "failed"]
    assert device.sizes == [3, 2, 1]
    for job_id in ids:
        job = _job(session_factory, job_id)
        assert (job.status, job.error_type) == ("failed", "out_of_memory")
        assert "CUDA out of memory" in (job.error_message or "")
        assert _metrics(session_factory, job_id) == []


def _calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[Any]:
    """From now on, each call of lifecycle.<name>: its argument after the session."""
    calls: list[Any] = []
    real = getattr(lifecycle, name)

    def spy(session: Session, first: Any, *rest: Any) -> Any:
        calls.append(first)
        return real(session, first, *rest)

    monkeypatch.setattr(lifecycle, name, spy)
    return calls


# -- with committed rows: real lease keepers polling for a cancel ------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def committed_factory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[sessionmaker[Session]]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'packing.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("fresh_postgres_url")
    engine = create_db_engine(url)
    yield create_session_factory(engine)
    engine.dispose()


def test_a_cancel_of_one_trial_mid_run_leaves_the_others_training(
    committed_factory: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    factory = committed_factory
    ids = _jobs(factory, [_spec(i) for i in range(3)])
    controls: dict[uuid.UUID, execution.AttemptControl] = {}

    class Registered(execution.AttemptControl):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            controls[self.claim.job_id] = self

    record = execution.record

    def record_then_cancel_the_second(*args: Any) -> None:
        record(*args)
        if args[3].epoch == 2 and args[1].job_id == ids[1]:
            with transaction(factory) as session:
                assert lifecycle.request_cancel(session, ids[1]) == "running"
            # Wait for its lease keeper to see it, so the cancel lands mid-run (epoch 3).
            deadline = time.monotonic() + 10
            while controls[ids[1]].stop_reason is None and time.monotonic() < deadline:
                time.sleep(0.01)
            # And for a poll after that: the pack's other jobs are still training.
            while ids[1] in polled(-1) and time.monotonic() < deadline:
                time.sleep(0.01)

    def polled(poll: int) -> list[uuid.UUID]:
        return [job_id for job_id, _ in polls[poll]]

    monkeypatch.setattr(execution, "AttemptControl", Registered)
    monkeypatch.setattr(execution, "record", record_then_cancel_the_second)
    polls = _calls(monkeypatch, "read_controls")
    ctx = _context(
        settings,
        factory,
        control_poll_seconds=0.02,
        checkpoint_every_seconds=0.0,
    )
    assert execute_job(ctx, ids[0]) == "succeeded"
    jobs = [_job(factory, job_id) for job_id in ids]
    assert [job.status for job in jobs] == ["succeeded", "cancelled", "succeeded"]
    assert [a.outcome for a in jobs[1].attempt_history] == ["cancelled"]
    assert [m.epoch for m in _metrics(factory, ids[1])] == [1, 2]
    assert _checkpoints(factory, ids[1])["last"].epoch == 2
    for job_id in (ids[0], ids[2]):
        assert [m.epoch for m in _metrics(factory, job_id)] == [1, 2, 3]
    # One lease keeper for the pack: each poll reads every job it still trains, at once.
    reads = [polled(poll) for poll in range(len(polls))]
    assert reads[0] == ids
    assert [ids[0], ids[2]] in reads  # the cancelled job is no longer read
    # Each later poll reads the jobs still training, in pack order: a job stopped (cancelled,
    # or ended and so no longer held) is never read again. Which poll sees which end depends
    # on timing; that order does not.
    for earlier, later in itertools.pairwise(reads):
        assert later == [job_id for job_id in earlier if job_id in later], (earlier, later)


def test_a_failing_lease_keeper_stops_every_job_of_the_pack(
    committed_factory: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pack's one keeper keeps every job's lease: when it fails, no job trains on."""
    factory = committed_factory
    ids = _jobs(factory, [_spec(i, epochs=200) for i in range(3)])

    def broken(*_: Any) -> None:
        raise RuntimeError("unexpected: the keeper broke")

    monkeypatch.setattr(lifecycle, "read_controls", broken)
    ctx = _context(settings, factory, control_poll_seconds=0.02)
    assert execute_job(ctx, ids[0]) == "heartbeat_failed"
    for job_id in ids:
        job = _job(factory, job_id)
        assert (job.status, job.error_type) == ("failed", "heartbeat_failed")
        assert "RuntimeError: unexpected: the keeper broke" in (job.error_message or "")
        assert job.pack is not None
        assert job.progress_epoch < 200
        assert [a.outcome for a in job.attempt_history] == ["failed"]


def test_a_job_whose_lease_is_lost_leaves_the_pack_and_writes_nothing_more(
    committed_factory: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A job of the pack reaped (its lease ran out, say a stall) and claimed by another worker
    belongs to that worker's attempt now: the pack's attempt leaves it alone, and the others
    train on."""
    factory = committed_factory
    ids = _jobs(factory, [_spec(i) for i in range(3)])
    record = execution.record

    def record_then_lose_the_second(*args: Any) -> None:
        record(*args)
        if args[3].epoch == 1 and args[1].job_id == ids[1]:
            # One transaction: the pack's keeper, renewing every few milliseconds, must not
            # renew the lease between its expiry and the reaper.
            with transaction(factory) as session:
                lapsed = utcnow() - timedelta(minutes=1)
                session.execute(update(Job).where(Job.id == ids[1]).values(lease_expires_at=lapsed))
                assert ids[1] in lifecycle.reap_expired_leases(session, max_attempts=3)
                assert lifecycle.claim(session, ids[1], "other@host#9", 30) is not None

    monkeypatch.setattr(execution, "record", record_then_lose_the_second)
    renewals = _calls(monkeypatch, "renew_lease")
    ctx = _context(
        settings,
        factory,
        control_poll_seconds=0.02,
        heartbeat_seconds=0.02,
        checkpoint_every_seconds=0.0,
    )
    assert execute_job(ctx, ids[0]) == "succeeded"
    jobs = [_job(factory, job_id) for job_id in ids]
    assert [job.status for job in jobs] == ["succeeded", "running", "succeeded"]
    assert (jobs[1].attempts, jobs[1].lease_owner) == (2, "other@host#9")
    assert [a.outcome for a in jobs[1].attempt_history] == ["lost", None]
    # Its epoch 1 as attempt 1 stored it, and nothing of the pack's after that.
    assert [(m.epoch, m.attempt) for m in _metrics(factory, ids[1])] == [(1, 1)]
    assert _checkpoints(factory, ids[1])["last"].epoch == 1
    for job_id in (ids[0], ids[2]):
        assert [m.epoch for m in _metrics(factory, job_id)] == [1, 2, 3]
    # One keeper kept every job's lease, the leader's and its companions' alike.
    assert set(renewals) == set(ids)
