"""Packed attempts: a claimed job trains together with its tenant's queued jobs that pack with it.

A study's jobs differ only in numbers, and one small model at a time leaves the device idle.
When a worker claims a job whose spec has a pack_key (worker/training/packed.py), it claims up
to TRAINSVC_MAX_PACK - 1 more queued jobs of the same tenant with the same key and trains them
all as one PackedRun. Every job stays a job: its own claim (the attempt number fences its
writes), its own AttemptControl (lease, cancel, hand-back, wall-time limit; one LeaseKeeper
thread keeps the pack's leases, with one read a poll for all its jobs), its own metrics,
checkpoints (with its own metadata) and events, and its own end. A trial that diverges ends
failed while the others go on; one whose control wants it stopped leaves the pack and ends
(or is handed back) for its own reason; a lost worker's jobs each lapse and are reaped alone.
A pack that runs out of device memory trains on as a pack of half its size, each job from its
last completed epoch; the other half goes back to the queue, to be packed again by whichever
worker is free; and this process packs fewer of that kind from then on.
"""

import logging
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from app.core import lifecycle
from app.core.datasets import resolve_dataset
from app.core.lifecycle import Claim, LeaseLost
from app.core.models import JobStatus
from app.core.observability import metrics
from app.core.spec import JobSpec
from worker import execution
from worker.execution import (
    AttemptControl,
    CheckpointCadence,
    WorkerContext,
    wall_seconds_for,
    with_db_retry,
)
from worker.training.data import PreparedData
from worker.training.loop import resolve_device
from worker.training.packed import (
    PackedRun,
    Trial,
    TrialEpoch,
    free_memory_bytes,
    pack_key,
    trial_memory_bytes,
)

logger = logging.getLogger(__name__)


def claim_companions(
    ctx: WorkerContext, leader: Claim, spec: JobSpec
) -> list[tuple[Claim, JobSpec]]:
    """The queued jobs claimed to train in one pack with the leader's (none: it trains alone)."""
    key = pack_key(spec)
    if key is None:
        return []

    def packs_with(stored: dict[str, Any]) -> bool:
        try:
            return pack_key(JobSpec.model_validate(stored)) == key
        except ValidationError:
            return False  # a spec this worker cannot run is left for its own attempt to fail

    capacity = pack_capacity(ctx, spec)
    if capacity < 2:
        return []
    # Chosen once, for every try: a retry recognises the claims a lost acknowledgement hid.
    token, pack = uuid.uuid4(), uuid.uuid4()
    claims = with_db_retry(
        ctx,
        lambda session: lifecycle.claim_companions(
            session,
            leader,
            ctx.worker_id,
            ctx.settings.lease_seconds,
            token,
            pack,
            packs_with,
            capacity - 1,
        ),
    )
    for claim in claims:
        metrics.observe_claim(claim.queued_seconds, claim.attempt)
    if claims:
        logger.info(
            "job %s trains in pack %s with %s",
            leader.job_id,
            pack,
            ", ".join(str(claim.job_id) for claim in claims),
        )
    return [(claim, JobSpec.model_validate(claim.spec)) for claim in claims]


def pack_capacity(ctx: WorkerContext, spec: JobSpec) -> int:
    """How many jobs like this one may train in its pack: TRAINSVC_MAX_PACK, and no more than
    fit in TRAINSVC_PACK_MEMORY_BYTES (default: half the device's free memory now), nor than
    a pack of them that ran out of memory in this process left it (ctx.pack_limits)."""
    limit = min(ctx.settings.max_pack, ctx.pack_limits.get(pack_key(spec), ctx.settings.max_pack))
    if limit < 2:
        return limit
    budget = ctx.settings.pack_memory_bytes
    if budget is None:
        try:
            device = resolve_device(spec.device)
        except RuntimeError:
            return 1  # no such device here: the job fails alone, with that reason
        free = free_memory_bytes(device)
        if free is None:
            return limit
        budget = free // 2
    info = with_db_retry(
        ctx, lambda session: resolve_dataset(session, spec.dataset.name), write=False
    )
    return max(1, min(limit, budget // trial_memory_bytes(spec, info)))


@dataclass
class _Member:
    """One job of the pack, as the worker keeps it: its claim, control and how it ended."""

    claim: Claim
    spec: JobSpec
    control: AttemptControl
    # What its next PackedRun starts from: the claim's checkpoint (or nothing), then, once a
    # pack of it ran out of memory, its last completed epoch.
    resume: tuple[bytes | None, bytes | None]
    cadence: CheckpointCadence | None = None
    outcome: str | None = None  # set once this job's attempt has ended (or lost its lease)


def train_pack(ctx: WorkerContext, members: list[tuple[Claim, JobSpec]]) -> str:
    """Train the claimed jobs as one pack; returns how the first (the leader's) attempt ended."""
    metrics.observe_run(len(members))
    jobs = [
        _Member(
            claim,
            spec,
            execution.AttemptControl(claim, wall_seconds_for(ctx, spec)),
            (claim.resume_weights, claim.resume_state),
        )
        for claim, spec in members
    ]
    keeper = execution.LeaseKeeper(ctx, [job.control for job in jobs])
    keeper.start()
    try:
        with execution.sigterm_hands_back():
            _train(ctx, jobs)
    finally:
        keeper.finish()
    return jobs[0].outcome or "interrupted"


def _train(ctx: WorkerContext, jobs: list[_Member]) -> None:
    """Train the jobs as one PackedRun. A pack that does not fit its device trains on as a
    pack of half its size, each job from its last completed epoch, down to a job alone: the
    memory estimate that sized the pack is an estimate, and packing must not fail a job that
    fits alone. The half that trains keeps its attempts (and leases, and pack id), so nothing
    is stored twice. The other half is handed back, as at a shutdown, rather than waiting
    here: its jobs show `queued`, not `running` with no progress, and another worker's
    process may take them at once (a new attempt, a new pack); each resumes exactly."""
    split = _train_run(ctx, jobs)
    if split is None:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the failed run's blocks back to CUDA, for other processes too
    on, back = split
    for job in back:
        _guarded(ctx, job, _hand_back, ctx, job)
    if on:
        metrics.observe_run(len(on))
        _train(ctx, on)


def _train_run(
    ctx: WorkerContext, jobs: list[_Member]
) -> tuple[list[_Member], list[_Member]] | None:
    """One PackedRun of the jobs, each ended as it ends. None, unless it ran out of memory:
    then the jobs that train on as a smaller pack and those to hand back, each having stored
    its last completed epoch (both empty where a job left alone failed `out_of_memory`)."""
    run: PackedRun | None = None
    try:
        data, labels = _pack_data(ctx, [job.spec for job in jobs])
        run = PackedRun(
            [job.spec for job in jobs], data, labels=labels, resume=[job.resume for job in jobs]
        )
        trials = run.trials
        every = ctx.settings.checkpoint_every_seconds
        for job, trial in zip(jobs, trials, strict=True):
            job.cadence = CheckpointCadence.resuming(every, trial)

        def leaving() -> set[int]:
            # Asked before every step: a job whose control wants it stopped leaves at once,
            # its state as of its last completed epoch; one that ended or lost its lease too.
            for job, trial in zip(jobs, trials, strict=True):
                if job.outcome is None and job.control.should_stop():
                    _guarded(ctx, job, _leave, ctx, job, trial)
            return {index for index, job in enumerate(jobs) if job.outcome is not None}

        for outcomes in run.epochs(leaving):
            _observe_epoch(run, outcomes)
            for outcome in outcomes:
                job = jobs[outcome.trial]
                if job.outcome is None:
                    _guarded(ctx, job, _epoch, ctx, job, trials[outcome.trial], outcome)
        for job, trial in zip(jobs, trials, strict=True):
            if job.outcome is None:
                # Finished before this attempt trained anything (its final checkpoint was
                # stored, its end was not), or stopped as the pack emptied.
                if trial.finished:
                    _guarded(ctx, job, _succeed, ctx, job, trial)
                else:
                    _guarded(ctx, job, _leave, ctx, job, trial)
    except Exception as exc:
        out_of_memory = execution.is_out_of_memory(exc)
        going = [job for job in jobs if job.outcome is None]
        if out_of_memory and len(going) > 1:
            # The failed step's tensors live on in the traceback's frames: free them before
            # the jobs' checkpoints are serialized, which needs memory of its own. (Logged as
            # text: a handler that keeps records would keep the traceback, and the run.)
            traceback.clear_frames(exc.__traceback__)
            return _split(ctx, jobs, run, str(exc))
        if out_of_memory:
            logger.warning("a pack ran out of memory with %d job(s) left: %s", len(going), str(exc))
        else:
            logger.exception("a pack of %d jobs failed", len(jobs))
        for job in going:
            _guarded(ctx, job, _fail, ctx, job, exc, out_of_memory)
        return ([], []) if out_of_memory else None
    return None


def _split(
    ctx: WorkerContext, jobs: list[_Member], run: PackedRun | None, reason: str
) -> tuple[list[_Member], list[_Member]]:
    """A pack ran out of memory: this process packs fewer of its kind from now on, and each
    job still in it stores its last completed epoch. Returns the half that trains on from
    there as a smaller pack (in this attempt), and the half to hand back (a later attempt)."""
    going = [job for job in jobs if job.outcome is None]
    half = (len(going) + 1) // 2
    on = going[:half]
    key = pack_key(going[0].spec)
    ctx.pack_limits[key] = min(half, ctx.pack_limits.get(key, half))
    metrics.observe_pack_split()
    logger.warning(
        "a pack of %d jobs ran out of memory; %d train on, %d go back to the queue: %s",
        len(going),
        half,
        len(going) - half,
        reason,
    )
    if run is not None:  # else it failed before it was built: each resumes where it was claimed
        run.release()  # room to serialize the checkpoints in, where the device is the host
        for job, trial in zip(jobs, run.trials, strict=True):
            if job.outcome is None and trial.snapshot is not None:
                _guarded(ctx, job, _keep_for_split, ctx, job, trial, job in on)
    # Without the jobs whose store just failed: those have ended.
    return [job for job in on if job.outcome is None], [
        job for job in going[half:] if job.outcome is None
    ]


def _keep_for_split(ctx: WorkerContext, job: _Member, trial: Trial, trains_on: bool) -> None:
    # Stored as a stopped attempt stores it: the stored `last` and `best` then agree with the
    # state it resumes from, as after a hand-back (and a worker lost meanwhile loses nothing).
    if job.cadence is not None:
        execution.store_on_stop(ctx, job.claim, trial, job.cadence)
    if trains_on:  # a job handed back resumes from what was just stored
        job.resume = (trial.weights(), trial.trainer_state())


def _observe_epoch(run: PackedRun, outcomes: list[TrialEpoch]) -> None:
    """The pack's epoch as the device ran it: every trial's samples in the epoch's one time
    (the throughput gauge then shows the device's, not one job's share of it)."""
    results = [outcome.result for outcome in outcomes if outcome.result is not None]
    if results:  # the trials that completed it (a diverged one stopped part of the way)
        seconds = results[0].metrics["epoch_seconds"]
        metrics.observe_epoch(str(run.device), len(results) * len(run.x_train), seconds)


def _pack_data(ctx: WorkerContext, specs: list[JobSpec]) -> tuple[PreparedData, list[torch.Tensor]]:
    """The first job's data, and every job's training labels (label noise may differ).

    Jobs that pack agree on all of the dataset spec but label_noise, so the features, the
    split and the validation set are the same; a job with other noise has its own labels.
    """
    prepared: dict[str, PreparedData] = {}
    for spec in specs:
        key = spec.dataset.model_dump_json()
        if key not in prepared:
            prepared[key] = execution.load_data(ctx, spec)
    labels = [prepared[spec.dataset.model_dump_json()].y_train for spec in specs]
    return prepared[specs[0].dataset.model_dump_json()], labels


def _guarded(ctx: WorkerContext, job: _Member, step: Callable[..., None], *args: Any) -> None:
    """One job's step, whose failure ends that job alone: the others of the pack go on."""
    try:
        step(*args)
    except LeaseLost:
        logger.warning(
            "job %s attempt %s lost its lease; another attempt owns it",
            job.claim.job_id,
            job.claim.attempt,
        )
        job.outcome = "lease_lost"
    except Exception as exc:
        logger.exception("job %s failed in its pack", job.claim.job_id)
        job.outcome = "failed"
        try:
            _fail(ctx, job, exc, execution.is_out_of_memory(exc))
        except Exception:
            logger.exception("job %s: its failure could not be stored", job.claim.job_id)


def _epoch(ctx: WorkerContext, job: _Member, trial: Trial, outcome: TrialEpoch) -> None:
    if outcome.diverged is not None:
        job.outcome = "failed"
        execution.end_attempt(
            ctx,
            job.claim,
            JobStatus.FAILED,
            summary=trial.summary(),
            error_type="diverged",
            error_message=str(outcome.diverged),
        )
        return
    assert outcome.result is not None
    assert job.cadence is not None
    execution.record(ctx, job.claim, trial, outcome.result, job.cadence)
    if trial.finished:
        _succeed(ctx, job, trial)


def _succeed(ctx: WorkerContext, job: _Member, trial: Trial) -> None:
    job.outcome = "succeeded"
    execution.end_attempt(ctx, job.claim, JobStatus.SUCCEEDED, summary=trial.summary())


def _leave(ctx: WorkerContext, job: _Member, trial: Trial) -> None:
    """A job stopped by its control: as a stopped single attempt, for its own reason."""
    if job.control.stop_reason is None:
        job.control.stop_reason = "handed_back"  # left with the pack, not by itself: resume it
    job.outcome = job.control.stop_reason
    if job.cadence and job.control.stop_reason in ("cancelled", "handed_back", "timeout"):
        execution.store_on_stop(ctx, job.claim, trial, job.cadence)
    job.outcome = execution.end_interrupted(ctx, job.claim, job.control, trial)


def _hand_back(ctx: WorkerContext, job: _Member) -> None:
    """A job of the half that does not train on: back to the queue, from what it stored."""
    job.control.stop_reason = "handed_back"  # its lease is no longer this worker's to keep
    job.outcome = execution.end_interrupted(ctx, job.claim, job.control, None)


def _fail(ctx: WorkerContext, job: _Member, exc: BaseException, out_of_memory: bool) -> None:
    job.outcome = "failed"
    if out_of_memory:
        fields = {"error_type": "out_of_memory", "error_message": str(exc)[:2000]}
    else:
        fields = {"error_type": "error", "error_message": f"{type(exc).__name__}: {exc}"[:2000]}
    execution.end_attempt(ctx, job.claim, JobStatus.FAILED, **fields)
