"""Claims, leases and fencing (app.core.lifecycle) on SQLite and PostgreSQL."""

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core import lifecycle
from app.core.errors import JobNotCancellable
from app.core.lifecycle import CheckpointBlob, LeaseLost, database_now
from app.core.models import Checkpoint, EpochMetric, Job, JobAttempt, utcnow
from tests.factories import METRICS, make_job


def _expire_lease(session: Session, job: Job) -> None:
    session.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=database_now(-1)))


def _record(session: Session, job: Job, attempt: int, epoch: int) -> None:
    blob = CheckpointBlob("last", epoch, b"weights", b"state", "0" * 64)
    lifecycle.record_epoch(session, job.id, attempt, epoch, METRICS, {}, [blob], 30)


def _outcomes(session: Session, job: Job) -> list[str | None]:
    return list(
        session.scalars(
            select(JobAttempt.outcome)
            .where(JobAttempt.job_id == job.id)
            .order_by(JobAttempt.attempt)
        )
    )


def test_a_second_claim_of_a_claimed_job_gets_nothing(session: Session) -> None:
    job = make_job(session)
    first = lifecycle.claim(session, job.id, "w1#1", 30)
    assert first is not None
    assert first.attempt == 1
    assert first.resume_weights is None
    assert lifecycle.claim(session, job.id, "w2#1", 30) is None
    session.refresh(job)
    assert (job.status, job.attempts, job.lease_owner) == ("running", 1, "w1#1")


def test_a_cancelled_or_finished_job_cannot_be_claimed(session: Session) -> None:
    cancelled = make_job(session, status="cancelled")
    assert lifecycle.claim(session, cancelled.id, "w1#1", 30) is None
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    lifecycle.finish(session, job.id, claim.attempt, "succeeded", summary={})
    assert lifecycle.claim(session, job.id, "w1#1", 30) is None


def test_a_stale_attempt_cannot_write_after_the_job_moved_on(session: Session) -> None:
    job = make_job(session)
    stale = lifecycle.claim(session, job.id, "w1#1", 30)
    assert stale is not None
    _record(session, job, stale.attempt, 1)
    _expire_lease(session, job)
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == [job.id]
    current = lifecycle.claim(session, job.id, "w2#1", 30)
    assert current is not None
    assert current.attempt == 2
    assert current.resume_weights == b"weights"  # resumes from the stored epoch

    with pytest.raises(LeaseLost):
        _record(session, job, stale.attempt, 2)
    with pytest.raises(LeaseLost):
        lifecycle.finish(session, job.id, stale.attempt, "succeeded")
    with pytest.raises(LeaseLost):
        lifecycle.renew_lease(session, job.id, stale.attempt, 30)
    assert lifecycle.read_controls(session, [(job.id, stale.attempt)]) == {job.id: None}
    with pytest.raises(LeaseLost):
        lifecycle.hand_back(session, job.id, stale.attempt)

    _record(session, job, current.attempt, 2)
    lifecycle.finish(session, job.id, current.attempt, "succeeded", summary={"ok": True})
    session.refresh(job)
    assert job.status == "succeeded"
    epochs = session.execute(
        select(EpochMetric.epoch, EpochMetric.attempt)
        .where(EpochMetric.job_id == job.id)
        .order_by(EpochMetric.epoch)
    ).all()
    assert [tuple(row) for row in epochs] == [(1, 1), (2, 2)]
    checkpoint = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job.id)).one()
    assert (checkpoint.epoch, checkpoint.attempt) == (2, 2)
    assert _outcomes(session, job) == ["lost", "succeeded"]


def test_the_reaper_leaves_live_leases_alone(session: Session) -> None:
    job = make_job(session)
    assert lifecycle.claim(session, job.id, "w1#1", 30) is not None
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == []
    session.refresh(job)
    assert job.status == "running"


def test_the_reaper_fails_the_job_after_max_attempts_lost(session: Session) -> None:
    job = make_job(session)
    for attempt in (1, 2):
        assert lifecycle.claim(session, job.id, f"w{attempt}#1", 30) is not None
        _expire_lease(session, job)
        assert lifecycle.reap_expired_leases(session, max_attempts=2) == (
            [job.id] if attempt < 2 else []
        )
    session.refresh(job)
    assert (job.status, job.error_type) == ("failed", "worker_lost")
    assert job.finished_at is not None
    assert job.lease_owner is None
    assert _outcomes(session, job) == ["lost", "lost"]


def test_a_hand_back_is_not_counted_as_a_lost_attempt(session: Session) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    lifecycle.hand_back(session, job.id, claim.attempt)
    claim = lifecycle.claim(session, job.id, "w2#1", 30)
    assert claim is not None
    _expire_lease(session, job)
    assert lifecycle.reap_expired_leases(session, max_attempts=2) == [job.id]
    session.refresh(job)
    assert job.status == "queued"
    assert job.published_at is None  # back in the outbox
    assert _outcomes(session, job) == ["handed_back", "lost"]


def test_the_reaper_honours_a_cancel_request(session: Session) -> None:
    job = make_job(session)
    assert lifecycle.claim(session, job.id, "w1#1", 30) is not None
    session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    _expire_lease(session, job)
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == []
    session.refresh(job)
    assert job.status == "cancelled"


def test_control_reports_cancel_and_hand_back_requests(session: Session) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "node-a@host#7", 30)
    assert claim is not None
    assert lifecycle.read_controls(session, [(job.id, 1)]) == {
        job.id: lifecycle.Control(False, False)
    }
    other = make_job(session)
    assert lifecycle.claim(session, other.id, "node-b@host#7", 30) is not None
    assert lifecycle.request_handback(session, "node-a@host#") == 1
    assert lifecycle.read_controls(session, [(job.id, 1), (other.id, 1)]) == {
        job.id: lifecycle.Control(cancel_requested=False, handback_requested=True),
        other.id: lifecycle.Control(cancel_requested=False, handback_requested=False),
    }


def test_one_read_answers_for_every_job_of_a_pack(session: Session) -> None:
    """The lease keeper of a pack reads all its jobs' controls at once: each answer is that
    job's own, and None for a job its attempt no longer holds (ended, reclaimed or unknown)."""
    jobs = [make_job(session) for _ in range(4)]
    for job in jobs:
        assert lifecycle.claim(session, job.id, "node@host#1", 30) is not None
    assert lifecycle.request_cancel(session, jobs[1].id) == "running"
    lifecycle.finish(session, jobs[2].id, 1, "succeeded")
    unknown = uuid.uuid4()
    attempts = [(jobs[0].id, 1), (jobs[1].id, 1), (jobs[2].id, 1), (jobs[3].id, 2), (unknown, 1)]
    assert lifecycle.read_controls(session, attempts) == {
        jobs[0].id: lifecycle.Control(cancel_requested=False, handback_requested=False),
        jobs[1].id: lifecycle.Control(cancel_requested=True, handback_requested=False),
        jobs[2].id: None,  # ended
        jobs[3].id: None,  # attempt 1 holds it, not 2
        unknown: None,
    }


def test_the_outbox_holds_unpublished_and_long_unclaimed_jobs(session: Session) -> None:
    fresh = make_job(session)
    old = make_job(session)
    running = make_job(session)
    assert lifecycle.claim(session, running.id, "w1#1", 30) is not None
    lifecycle.mark_published(session, [fresh.id, old.id])
    session.execute(
        update(Job).where(Job.id == old.id).values(published_at=utcnow() - timedelta(hours=1))
    )
    pending = lifecycle.jobs_to_publish(session, republish_after_seconds=60)
    assert old.id in pending
    assert fresh.id not in pending
    assert running.id not in pending


def test_a_hand_back_racing_a_cancel_ends_the_job_cancelled(session: Session) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    session.execute(update(Job).where(Job.id == job.id).values(cancel_requested=True))
    lifecycle.hand_back(session, job.id, claim.attempt)
    session.refresh(job)
    assert job.status == "cancelled"
    assert job.finished_at is not None


def _attempt_rows(session: Session, job: Job) -> int:
    return len(_outcomes(session, job))


def test_a_retried_claim_gets_its_own_claim_back(session: Session) -> None:
    # The first try committed, its acknowledgement was lost; the retry passes the same token.
    job = make_job(session)
    token = uuid.uuid4()
    first = lifecycle.claim(session, job.id, "w1#1", 30, token)
    assert first is not None
    again = lifecycle.claim(session, job.id, "w1#1", 30, token)
    assert again is not None
    assert (again.job_id, again.attempt, again.spec) == (first.job_id, first.attempt, first.spec)
    session.refresh(job)
    assert (job.status, job.attempts, _attempt_rows(session, job)) == ("running", 1, 1)
    # Another claimer's token is not recognised: the job is taken.
    assert lifecycle.claim(session, job.id, "w2#1", 30, uuid.uuid4()) is None


def test_a_token_recognises_only_the_claim_that_is_still_current(session: Session) -> None:
    job = make_job(session)
    token = uuid.uuid4()
    first = lifecycle.claim(session, job.id, "w1#1", 30, token)
    assert first is not None
    lifecycle.hand_back(session, job.id, first.attempt)
    other = lifecycle.claim(session, job.id, "w2#1", 30, uuid.uuid4())
    assert other is not None
    assert lifecycle.claim(session, job.id, "w1#1", 30, token) is None
    session.refresh(job)
    assert (job.attempts, job.lease_owner) == (2, "w2#1")


@pytest.mark.parametrize("status", ["succeeded", "failed", "cancelled"])
def test_a_retried_finish_that_landed_is_a_no_op(session: Session, status: str) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    lifecycle.finish(session, job.id, claim.attempt, status, summary={"ok": True})
    lifecycle.finish(session, job.id, claim.attempt, status, summary={"ok": True})
    session.refresh(job)
    assert (job.status, job.attempts) == (status, 1)
    assert _outcomes(session, job) == [status]
    # Not a licence for anything else: another ending by the same attempt is refused.
    with pytest.raises(LeaseLost):
        lifecycle.finish(
            session, job.id, claim.attempt, "failed" if status != "failed" else "succeeded"
        )
    with pytest.raises(LeaseLost):
        lifecycle.hand_back(session, job.id, claim.attempt)


def test_a_retried_hand_back_that_landed_is_a_no_op(session: Session) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    lifecycle.hand_back(session, job.id, claim.attempt)
    lifecycle.hand_back(session, job.id, claim.attempt)
    session.refresh(job)
    assert (job.status, job.attempts) == ("queued", 1)
    assert _outcomes(session, job) == ["handed_back"]
    with pytest.raises(LeaseLost):
        lifecycle.finish(session, job.id, claim.attempt, "succeeded")


def test_an_attempt_the_reaper_took_is_not_mistaken_for_a_landed_hand_back(
    session: Session,
) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    _expire_lease(session, job)
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == [job.id]
    with pytest.raises(LeaseLost):
        lifecycle.hand_back(session, job.id, claim.attempt)
    with pytest.raises(LeaseLost):
        lifecycle.finish(session, job.id, claim.attempt, "succeeded")


def test_one_cancel_statement_decides_for_every_status(session: Session) -> None:
    queued = make_job(session)
    assert lifecycle.request_cancel(session, queued.id) == "cancelled"
    running = make_job(session)
    claim = lifecycle.claim(session, running.id, "w1#1", 30)
    assert claim is not None
    assert lifecycle.request_cancel(session, running.id) == "running"
    # The flag is what the worker's hand-back and the reaper honour.
    lifecycle.hand_back(session, running.id, claim.attempt)
    for job in (queued, running):
        session.refresh(job)
        assert (job.status, job.cancel_requested) == ("cancelled", True)
        assert job.finished_at is not None
        assert lifecycle.request_cancel(session, job.id) == "cancelled"  # again: no change
    for ended in ("succeeded", "failed"):
        job = make_job(session, status=ended)
        with pytest.raises(JobNotCancellable):
            lifecycle.request_cancel(session, job.id)
        session.refresh(job)
        assert (job.status, job.cancel_requested) == (ended, False)


# -- the database's clock, not the worker's -------------------------------------------------


def _skew_clock(monkeypatch: pytest.MonkeyPatch, offset: timedelta) -> None:
    monkeypatch.setattr(lifecycle, "utcnow", lambda: utcnow() + offset)


def test_a_worker_clock_behind_does_not_lose_its_lease(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(session)
    _skew_clock(monkeypatch, -timedelta(hours=1))
    claim = lifecycle.claim(session, job.id, "slow-clock#1", 30)
    assert claim is not None
    lifecycle.renew_lease(session, job.id, claim.attempt, 30)
    _record(session, job, claim.attempt, 1)
    monkeypatch.undo()  # an honest reaper
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == []
    session.refresh(job)
    assert job.status == "running"
    moment = session.scalar(select(database_now()))
    assert job.lease_expires_at is not None
    assert moment is not None
    assert timedelta(seconds=25) < job.lease_expires_at - moment <= timedelta(seconds=30)


def test_a_reaper_clock_ahead_does_not_steal_a_live_lease(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(session)
    assert lifecycle.claim(session, job.id, "w1#1", 30) is not None
    _skew_clock(monkeypatch, timedelta(hours=1))
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == []
    session.refresh(job)
    assert job.status == "running"
    # ... and a lease expired by the database's clock is reaped, whatever the worker's says.
    _skew_clock(monkeypatch, -timedelta(hours=1))
    _expire_lease(session, job)
    assert lifecycle.reap_expired_leases(session, max_attempts=3) == [job.id]


def test_the_outbox_republishes_by_the_database_clock(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(session)
    _skew_clock(monkeypatch, -timedelta(hours=1))
    lifecycle.mark_published(session, [job.id])
    monkeypatch.undo()
    assert job.id not in lifecycle.jobs_to_publish(session, republish_after_seconds=60)
    _skew_clock(monkeypatch, timedelta(hours=1))
    assert job.id not in lifecycle.jobs_to_publish(session, republish_after_seconds=60)
    assert job.id in lifecycle.jobs_to_publish(session, republish_after_seconds=-1)


def test_the_wall_time_used_is_measured_by_the_database_clock(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = make_job(session)
    first = lifecycle.claim(session, job.id, "w1#1", 30)
    assert first is not None
    assert 0 <= first.wall_seconds_used < 5
    lifecycle.hand_back(session, job.id, first.attempt)
    session.execute(update(Job).where(Job.id == job.id).values(started_at=database_now(-100)))
    # A worker whose clock is an hour ahead resumes it: 100 s are used, not an hour.
    _skew_clock(monkeypatch, timedelta(hours=1))
    second = lifecycle.claim(session, job.id, "fast-clock#1", 30)
    assert second is not None
    assert 100 <= second.wall_seconds_used < 105


def test_non_finite_diagnostics_are_stored_as_null_so_json_queries_still_read_them(
    session: Session,
) -> None:
    job = make_job(session)
    claim = lifecycle.claim(session, job.id, "w1#1", 30)
    assert claim is not None
    overflowed = {
        "grad_norm_mean": float("inf"),
        "grad_norm_max": float("nan"),
        "generalization_gap": 0.25,
        "layers": [{"name": "hidden.0.linear", "grad_norm": float("-inf")}],
    }
    lifecycle.record_epoch(session, job.id, claim.attempt, 1, METRICS, overflowed, [], 30)
    session.flush()
    stored = session.scalars(select(EpochMetric).where(EpochMetric.job_id == job.id)).one()
    assert stored.diagnostics["grad_norm_mean"] is None
    assert stored.diagnostics["grad_norm_max"] is None
    assert stored.diagnostics["layers"][0]["grad_norm"] is None
    # What a study report's SQL reads out of the JSON (SQLite refused the whole row before).
    gap = session.scalar(
        select(EpochMetric.diagnostics["generalization_gap"].as_float()).where(
            EpochMetric.job_id == job.id
        )
    )
    assert gap == 0.25
