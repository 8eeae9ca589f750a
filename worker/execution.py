"""Runs one attempt at a job: claim it, train it, record every epoch, end or hand it back.

The trainer knows nothing of the database; this module is the bridge. Beside the training
thread, a LeaseKeeper thread renews the lease, watches for cancel and hand-back requests and
the wall-time limit, and tells the trainer (through the attempt's AttemptControl) to stop at
the next batch. If that thread fails, the attempt stops too: training never goes on without a
lease.
"""

import hashlib
import json
import logging
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, Protocol, TypeVar

import torch
from pydantic import ValidationError
from sqlalchemy.exc import InterfaceError as SQLInterfaceError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_before_delay,
    wait_exponential,
)

from app.core import lifecycle
from app.core.catalog import UPLOAD_PREFIX
from app.core.config import Settings
from app.core.datasets import load_upload_arrays, resolve_dataset
from app.core.db import transaction
from app.core.lifecycle import CheckpointBlob, Claim, LeaseLost
from app.core.models import JobStatus
from app.core.observability import logs, metrics
from app.core.outbox import Dispatcher
from app.core.spec import JobSpec
from worker.training.data import PreparedData, load_builtin, prepare
from worker.training.loop import Diverged, EpochResult, Interrupted, TrainingRun

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Recorded(Protocol):
    """What record() and the checkpoint cadence read of a run: a TrainingRun, or one trial of
    a PackedRun (worker/packing.py), which answers the same."""

    @property
    def completed_epoch(self) -> int: ...
    @property
    def best_epoch(self) -> int: ...
    @property
    def finished(self) -> bool: ...
    @property
    def device(self) -> torch.device: ...
    @property
    def x_train(self) -> torch.Tensor: ...
    def weights(self, metadata: dict[str, str] | None = None, *, best: bool = False) -> bytes: ...
    def trainer_state(self) -> bytes: ...
    def summary(self) -> dict[str, Any]: ...


# Set in a pool process when SIGTERM reaches it directly (systemd's default, `kill` of the
# process group): its running job hands itself back instead of dying with it.
shutdown_requested = threading.Event()


@contextmanager
def sigterm_hands_back() -> Iterator[None]:
    """While a job trains, a SIGTERM to this pool process asks it to hand the job back.

    billiard installs its own SIGTERM handler in pool processes after Celery's
    worker_process_init (it exits at once, mid-epoch), so the handler is put in place for the
    duration of a task instead. A second SIGTERM falls through to billiard's: stop now.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    # Counted here, not read from shutdown_requested: the node's shutdown may have set that
    # flag a moment before the same stop's SIGTERM reaches this process (a process group's
    # SIGTERM), and that first signal must still hand the job back, not kill the process.
    received = threading.Event()

    def handle(signum: int, frame: FrameType | None) -> None:
        if received.is_set():
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
        received.set()
        shutdown_requested.set()

    signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class WorkerContext:
    """What one worker process needs, built once per process (after the fork)."""

    settings: Settings
    session_factory: sessionmaker[Session]
    dispatcher: Dispatcher
    worker_id: str  # "<celery node name>#<pid>": the lease owner
    # pack_key -> the most trials of it this process packs from now on: learned when a pack of
    # them ran out of device memory (worker/packing.py), which the memory estimate missed.
    pack_limits: dict[Hashable, int] = field(default_factory=dict)


def with_db_retry(ctx: WorkerContext, work: Callable[[Session], T], *, write: bool = True) -> T:
    """Run `work` in its own transaction, retrying with backoff while the database is away.

    A restart of the database (up to settings.db_retry_seconds) neither fails the attempt nor
    duplicates a write: each retry is a fresh transaction, and a half-done one was rolled back.
    A try whose commit landed but whose acknowledgement was lost is retried too, so `work`
    must recognise its own earlier write (the lifecycle's writes do). write=False for work
    that only reads: on SQLite it then neither waits for nor holds up the API's writes.
    Backoff 0.2 s doubling to at most 5 s; no sleep that would end past the deadline.
    """

    def attempt() -> T:
        with transaction(ctx.session_factory, write=write) as session:
            return work(session)

    retrying = Retrying(
        retry=retry_if_exception_type((OperationalError, SQLInterfaceError)),
        stop=stop_before_delay(ctx.settings.db_retry_seconds),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        before_sleep=_log_db_retry,
        reraise=True,  # the database's own error, not tenacity's RetryError
    )
    return retrying(attempt)


def _log_db_retry(state: RetryCallState) -> None:
    error = state.outcome.exception() if state.outcome else None
    logger.warning(
        "database unavailable, retrying in %.1fs: %s",
        state.upcoming_sleep,
        getattr(error, "orig", error),
    )


class AttemptControl:
    """Decides when one attempt's training must stop, and why; its LeaseKeeper tells it what
    the database asks."""

    def __init__(self, claim: Claim, wall_seconds: float) -> None:
        self.claim = claim
        # On this host's monotonic clock: the time already used was measured by the database's.
        self.deadline = time.monotonic() + wall_seconds - claim.wall_seconds_used
        # cancelled | handed_back | timeout | lease_lost | heartbeat_failed
        self.stop_reason: str | None = None
        self.failure: str | None = None  # why, when its lease keeper failed

    def should_stop(self) -> bool:
        if self.stop_reason is None and shutdown_requested.is_set():
            self.stop_reason = "handed_back"  # no database round trip needed to stop
        return self.stop_reason is not None

    def observe(self, control: lifecycle.Control | None) -> None:
        """The job's row as just read (None: this attempt no longer holds the job)."""
        if control is None:
            self.stop_reason = "lease_lost"
        elif control.cancel_requested:
            self.stop_reason = "cancelled"
        elif control.handback_requested or shutdown_requested.is_set():
            self.stop_reason = "handed_back"
        elif time.monotonic() > self.deadline:
            self.stop_reason = "timeout"


class LeaseKeeper(threading.Thread):
    """Keeps the leases of the attempts one training thread runs (a job, or every job of a
    pack) and stops each when its job asks (cancel, hand-back) or its time is up.

    One thread and one read a poll for all of them: a pack of 128 jobs on a GPU would
    otherwise poll the database 256 times a second from 128 threads. Each lease is renewed in
    a transaction of its own, as one job's is: one transaction would lock the pack's rows
    together, in an order a study-wide cancel need not share. If this thread fails, every
    attempt it keeps stops: training never goes on without a lease.
    """

    def __init__(self, ctx: WorkerContext, controls: Sequence[AttemptControl]) -> None:
        super().__init__(name=f"lease-keeper-{controls[0].claim.job_id}", daemon=True)
        self.ctx = ctx
        self.controls = list(controls)
        self._jobs = ", ".join(str(control.claim.job_id) for control in self.controls)
        self._done = threading.Event()

    def finish(self) -> None:
        self._done.set()
        self.join()

    def run(self) -> None:
        # Threads start bare: this one's lines carry the job (a pack's: its first job), and
        # name all the jobs they concern.
        claim = self.controls[0].claim
        try:
            with logs.job_context(claim.job_id, claim.attempt):
                self._keep_leases()
        except Exception as exc:
            # Anything unforeseen: a thread that died here would leave training running while
            # its leases lapse, and the reaper would take healthy jobs. Stop the attempts.
            logger.exception("keeping the leases failed; stopping the attempts of %s", self._jobs)
            for control in self.controls:
                if control.stop_reason is None:
                    control.failure = f"{type(exc).__name__}: {exc}"[:1000]
                    control.stop_reason = "heartbeat_failed"

    def _keep_leases(self) -> None:
        settings = self.ctx.settings
        next_renewal = time.monotonic() + settings.heartbeat_seconds
        while not self._done.wait(settings.control_poll_seconds):
            # Those already told to stop are the training thread's to end.
            kept = [control for control in self.controls if control.stop_reason is None]
            if not kept:
                return
            try:
                if time.monotonic() >= next_renewal:
                    for control in kept:
                        self._renew(control)
                    next_renewal = time.monotonic() + settings.heartbeat_seconds
                attempts = [(c.claim.job_id, c.claim.attempt) for c in kept if not c.stop_reason]
                if not attempts:  # every lease just renewed was lost: nothing to read
                    continue
                with transaction(self.ctx.session_factory, write=False) as session:
                    controls = lifecycle.read_controls(session, attempts)
            except (OperationalError, SQLInterfaceError) as exc:
                # The database is away: keep training; the lease has slack for a restart.
                logger.warning("lease renewal failed for %s, will retry: %s", self._jobs, exc.orig)
                continue
            for control in kept:
                if control.stop_reason is None:
                    control.observe(controls[control.claim.job_id])

    def _renew(self, control: AttemptControl) -> None:
        claim = control.claim
        try:
            with transaction(self.ctx.session_factory) as session:
                lifecycle.renew_lease(
                    session, claim.job_id, claim.attempt, self.ctx.settings.lease_seconds
                )
        except LeaseLost:
            control.stop_reason = "lease_lost"


def load_data(ctx: WorkerContext, spec: JobSpec) -> PreparedData:
    def read(session: Session) -> PreparedData:
        info = resolve_dataset(session, spec.dataset.name)
        if spec.dataset.name.startswith(UPLOAD_PREFIX):
            arrays = load_upload_arrays(
                session, uuid.UUID(spec.dataset.name.removeprefix(UPLOAD_PREFIX))
            )
        else:
            arrays = load_builtin(spec.dataset)
        return prepare(spec.dataset, info, arrays)

    data = with_db_retry(ctx, read, write=False)
    dtype = torch.get_default_dtype()
    if data.x_train.is_floating_point() and data.x_train.dtype != dtype:
        # The features in the model's dtype: float32 as served; float64 where a test (the
        # packed-against-alone comparisons) sets it as torch's default.
        data = replace(data, x_train=data.x_train.to(dtype), x_val=data.x_val.to(dtype))
    return data


@dataclass
class CheckpointCadence:
    """When an attempt stores its checkpoints, and which epochs the stored ones hold.

    The `last` checkpoint is rewritten at most every settings.checkpoint_every_seconds, after
    the final epoch, and when the attempt is stopped; `best` rides along whenever a newer best
    epoch exists, so the two stored rows always agree with the stored trainer state.
    """

    every_seconds: float
    last_epoch: int  # what the stored `last` holds
    best_epoch: int  # what the stored `best` holds
    written_at: float = field(default_factory=time.monotonic)

    @classmethod
    def resuming(cls, every_seconds: float, run: Recorded) -> "CheckpointCadence":
        # A resumed run starts from the stored `last`, whose state names the stored `best`.
        return cls(every_seconds, run.completed_epoch, run.best_epoch)

    def due(self, run: Recorded) -> bool:
        return run.finished or time.monotonic() - self.written_at >= self.every_seconds

    def blobs(self, claim: Claim, run: Recorded) -> list[CheckpointBlob]:
        """The checkpoints newer than the stored ones, as of the last completed epoch."""
        if run.completed_epoch <= self.last_epoch:
            return []
        metadata = {"job_id": str(claim.job_id), "spec": json.dumps(claim.spec, sort_keys=True)}
        blobs = [_blob("last", run.completed_epoch, run.weights(metadata), run.trainer_state())]
        if run.best_epoch > self.best_epoch:
            blobs.append(_blob("best", run.best_epoch, run.weights(metadata, best=True), None))
        return blobs

    def stored(self, blobs: list[CheckpointBlob]) -> None:
        for blob in blobs:
            if blob.kind == "last":
                self.last_epoch = blob.epoch
            else:
                self.best_epoch = blob.epoch
        self.written_at = time.monotonic()


def _blob(kind: str, epoch: int, weights: bytes, state: bytes | None) -> CheckpointBlob:
    return CheckpointBlob(kind, epoch, weights, state, hashlib.sha256(weights).hexdigest())


def record(
    ctx: WorkerContext,
    claim: Claim,
    run: Recorded,
    result: EpochResult,
    cadence: CheckpointCadence,
) -> None:
    """Store an epoch's metrics, and its checkpoints when the cadence says they are due.

    A retry after a commit that landed rewrites the same rows (record_epoch overwrites).
    """
    blobs = cadence.blobs(claim, run) if cadence.due(run) else []

    def write(session: Session) -> None:
        lifecycle.record_epoch(
            session,
            claim.job_id,
            claim.attempt,
            result.epoch,
            result.metrics,
            result.diagnostics,
            blobs,
            ctx.settings.lease_seconds,
        )

    with_db_retry(ctx, write)
    if blobs:
        cadence.stored(blobs)


def store_on_stop(
    ctx: WorkerContext, claim: Claim, run: Recorded, cadence: CheckpointCadence
) -> None:
    """A stopped attempt stores its last completed epoch, so the next one resumes from there.

    The half-trained epoch it was in is lost; its metrics were never stored either. A lost
    lease stores nothing: the attempt that owns the job now has its own checkpoints.
    """
    blobs = cadence.blobs(claim, run)
    if not blobs:
        return
    try:
        with_db_retry(
            ctx, lambda s: lifecycle.store_checkpoints(s, claim.job_id, claim.attempt, blobs)
        )
    except LeaseLost:
        logger.warning(
            "job %s attempt %s lost its lease: checkpoint not stored", claim.job_id, claim.attempt
        )
        return
    cadence.stored(blobs)


def end_attempt(ctx: WorkerContext, claim: Claim, status: str, **fields: object) -> None:
    """End the job with this attempt (fenced by its number), and count the end."""
    with_db_retry(
        ctx,
        lambda session: lifecycle.finish(session, claim.job_id, claim.attempt, status, **fields),  # type: ignore[arg-type]
    )
    metrics.observe_job_end(
        status, claim.wall_seconds_used + time.monotonic() - claim.claimed_at_monotonic
    )


def execute_job(ctx: WorkerContext, job_id: uuid.UUID) -> str:
    """Run the job if it can be claimed; returns how this attempt ended."""
    with logs.job_context(job_id):  # every line this attempt logs names the job
        return _attempt(ctx, job_id)


def _attempt(ctx: WorkerContext, job_id: uuid.UUID) -> str:
    if shutdown_requested.is_set():
        # This process is on its way out: leave the job queued; the message or the outbox's
        # republish brings it to another worker.
        return "shutting_down"
    token = uuid.uuid4()  # one for every try: a retry recognises a claim that landed unseen
    claim = with_db_retry(
        ctx,
        lambda s: lifecycle.claim(s, job_id, ctx.worker_id, ctx.settings.lease_seconds, token),
    )
    if claim is None:
        logger.info("job %s is not claimable (taken, ended or cancelled); nothing to do", job_id)
        return "skipped"
    logs.bind_attempt(claim.attempt)
    metrics.observe_claim(claim.queued_seconds, claim.attempt)
    try:
        spec = JobSpec.model_validate(claim.spec)
    except ValidationError as exc:
        # Stored by another version of the API, or edited by hand: no attempt can run it.
        logger.error("job %s has a spec this worker cannot run: %s", job_id, exc)
        end_attempt(
            ctx, claim, JobStatus.FAILED, error_type="invalid_spec", error_message=_describe(exc)
        )
        return "failed"
    if ctx.settings.max_pack > 1:
        from worker import packing  # here, not at the top: packing builds on this module

        companions = packing.claim_companions(ctx, claim, spec)
        if companions:
            return packing.train_pack(ctx, [(claim, spec), *companions])
    metrics.observe_run(1)
    control = AttemptControl(claim, wall_seconds_for(ctx, spec))
    keeper = LeaseKeeper(ctx, [control])
    keeper.start()
    try:
        with sigterm_hands_back():
            return _train(ctx, claim, spec, control)
    finally:
        keeper.finish()


def wall_seconds_for(ctx: WorkerContext, spec: JobSpec) -> float:
    return min(
        spec.max_wall_seconds or ctx.settings.max_wall_seconds, ctx.settings.max_wall_seconds
    )


def _describe(exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'spec'}: {error['msg']}"
        for error in exc.errors()
    )
    return f"the stored spec is not valid for this worker: {problems}"[:2000]


def _train(ctx: WorkerContext, claim: Claim, spec: JobSpec, control: AttemptControl) -> str:
    run: TrainingRun | None = None
    cadence: CheckpointCadence | None = None
    try:
        run = TrainingRun(
            spec,
            load_data(ctx, spec),
            resume_weights=claim.resume_weights,
            resume_state=claim.resume_state,
        )
        cadence = CheckpointCadence.resuming(ctx.settings.checkpoint_every_seconds, run)
        for result in run.epochs(should_stop=control.should_stop):
            seconds = result.metrics["epoch_seconds"]
            metrics.observe_epoch(str(run.device), len(run.x_train), seconds)
            record(ctx, claim, run, result, cadence)
        end_attempt(ctx, claim, JobStatus.SUCCEEDED, summary=run.summary())
        return "succeeded"
    except Interrupted:
        if run and cadence and control.stop_reason in ("cancelled", "handed_back", "timeout"):
            store_on_stop(ctx, claim, run, cadence)
        return end_interrupted(ctx, claim, control, run)
    except Diverged as exc:
        summary = run.summary() if run else None
        end_attempt(
            ctx,
            claim,
            JobStatus.FAILED,
            summary=summary,
            error_type="diverged",
            error_message=str(exc),
        )
        return "failed"
    except LeaseLost:
        logger.warning(
            "job %s attempt %s lost its lease; another attempt owns it", claim.job_id, claim.attempt
        )
        return "lease_lost"
    except Exception as exc:
        if is_out_of_memory(exc):
            # Drop the failed run and its tensors before the next job. The traceback's frames
            # hold them too (as in worker/packing.py's split), until cleared.
            traceback.clear_frames(exc.__traceback__)
            run = None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # give the memory back so the next job on this GPU fits
            logger.warning("job %s ran out of memory: %s", claim.job_id, str(exc))
            end_attempt(
                ctx,
                claim,
                JobStatus.FAILED,
                error_type="out_of_memory",
                error_message=str(exc)[:2000],
            )
            return "failed"
        logger.exception("job %s failed", claim.job_id)
        end_attempt(
            ctx,
            claim,
            JobStatus.FAILED,
            error_type="error",
            error_message=f"{type(exc).__name__}: {exc}"[:2000],
        )
        return "failed"


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OOM is torch.OutOfMemoryError; the CPU allocator's is a plain RuntimeError."""
    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    # c10's DefaultCPUAllocator raises c10::Error ("can't allocate memory" / "not enough
    # memory"), which reaches Python as RuntimeError, e.g. under an RLIMIT_AS or a cgroup cap.
    message = str(exc)
    return isinstance(exc, RuntimeError) and (
        "DefaultCPUAllocator" in message or "out of memory" in message
    )


def end_interrupted(
    ctx: WorkerContext, claim: Claim, control: AttemptControl, run: Recorded | None
) -> str:
    """End an attempt its control stopped, for the control's reason; returns how it ended."""
    reason = control.stop_reason
    summary = run.summary() if run else None
    if reason == "cancelled":
        end_attempt(ctx, claim, JobStatus.CANCELLED, summary=summary)
    elif reason == "timeout":
        end_attempt(
            ctx,
            claim,
            JobStatus.FAILED,
            summary=summary,
            error_type="timeout",
            error_message="the job ran past its wall-time limit (max_wall_seconds)",
        )
    elif reason == "heartbeat_failed":
        # Failed rather than handed back: a hand-back costs no attempt, so a fault that
        # recurs would send the job round the workers for ever.
        end_attempt(
            ctx,
            claim,
            JobStatus.FAILED,
            summary=summary,
            error_type="heartbeat_failed",
            error_message=f"the worker could not keep the job's lease: {control.failure}",
        )
    elif reason == "handed_back":
        with_db_retry(ctx, lambda s: lifecycle.hand_back(s, claim.job_id, claim.attempt))
        ctx.dispatcher.publish([claim.job_id])
    return reason or "interrupted"
