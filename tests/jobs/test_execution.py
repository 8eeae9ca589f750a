"""worker.execution on a real database, with the trainer replaced only where a GPU is needed."""

import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.core.broker import create_celery_app
from app.core.config import Settings
from app.core.models import Job
from app.core.outbox import Dispatcher
from tests.factories import make_job
from worker import execution
from worker.execution import WorkerContext, execute_job


class _CudaOutOfMemory:
    """Stands in for TrainingRun on a GPU that is full: this machine has no CUDA device."""

    def __init__(self, *_: Any, **__: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def _context(settings: Settings, session_factory: sessionmaker[Session]) -> WorkerContext:
    """A worker's context on the test's one connection, with no lease keeper polling: its
    thread's transactions would interleave with the test's savepoints on that connection."""
    settings = settings.model_copy(update={"control_poll_seconds": 3600.0})
    return WorkerContext(
        settings,
        session_factory,
        Dispatcher(create_celery_app(settings), session_factory),
        "node@host#1",
    )


def test_cuda_out_of_memory_fails_the_job_with_out_of_memory(
    session_factory: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with session_factory() as session:
        job = make_job(session)
        session.commit()
    monkeypatch.setattr(execution, "TrainingRun", _CudaOutOfMemory)
    monkeypatch.setattr(execution, "load_data", lambda *_: None)
    ctx = _context(settings, session_factory)
    assert execute_job(ctx, job.id) == "failed"
    with session_factory() as session:
        stored = session.get(Job, job.id)
        assert stored is not None
        assert (stored.status, stored.error_type) == ("failed", "out_of_memory")
        assert "CUDA out of memory" in (stored.error_message or "")
        assert [a.outcome for a in stored.attempt_history] == ["failed"]


class _FillsTheGpu:
    """Stands in for a TrainingRun that starts, then finds the GPU full in its first epoch."""

    completed_epoch = best_epoch = 0

    def __init__(self, made: list[weakref.ref[Any]]) -> None:
        made.append(weakref.ref(self))

    def epochs(self, should_stop: Any) -> Iterator[Any]:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        yield


def test_a_run_out_of_memory_is_freed_before_its_attempt_ends(
    session_factory: sessionmaker[Session],
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its tensors (on a GPU, device memory the next job needs) go when the worker drops the
    run, not whenever the failure's traceback happens to be collected."""
    with session_factory() as session:
        job = make_job(session)
        session.commit()
    made: list[weakref.ref[Any]] = []
    alive_at_end: list[bool] = []
    end_attempt = execution.end_attempt

    def ending(*args: Any, **kwargs: Any) -> None:
        alive_at_end.append(any(run() is not None for run in made))
        end_attempt(*args, **kwargs)

    monkeypatch.setattr(execution, "TrainingRun", lambda *_, **__: _FillsTheGpu(made))
    monkeypatch.setattr(execution, "load_data", lambda *_: None)
    monkeypatch.setattr(execution, "end_attempt", ending)
    ctx = _context(settings, session_factory)
    assert execute_job(ctx, job.id) == "failed"
    assert len(made) == 1
    assert alive_at_end == [False]


def test_cpu_allocator_failures_count_as_out_of_memory() -> None:
    cpu = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")
    assert execution.is_out_of_memory(cpu)
    assert execution.is_out_of_memory(MemoryError())
    assert not execution.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def _flaky(failures: int, error: Exception) -> tuple[list[int], Any]:
    calls: list[int] = []

    def work(_: Session) -> int:
        calls.append(1)
        if len(calls) <= failures:
            raise error
        return 7

    return calls, work


def test_database_retries_back_off_until_the_database_answers(
    session_factory: sessionmaker[Session],
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
) -> None:
    away = OperationalError("SELECT 1", None, ConnectionRefusedError("connection refused"))
    calls, work = _flaky(2, away)
    assert execution.with_db_retry(_context(settings, session_factory), work) == 7
    assert len(calls) == 3
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert [message.split(":")[0] for message in retries] == [
        "database unavailable, retrying in 0.2s",
        "database unavailable, retrying in 0.4s",
    ]


def test_database_retries_stop_at_the_deadline_with_the_database_error(
    session_factory: sessionmaker[Session], settings: Settings
) -> None:
    away = InterfaceError("SELECT 1", None, ConnectionResetError("connection reset"))
    calls, work = _flaky(100, away)
    ctx = _context(settings.model_copy(update={"db_retry_seconds": 0.5}), session_factory)
    with pytest.raises(InterfaceError):
        execution.with_db_retry(ctx, work)
    assert len(calls) == 2  # 0.2 s fits in 0.5 s; 0.2 + 0.4 would not
    calls, work = _flaky(1, ValueError("a bug, not an outage"))
    with pytest.raises(ValueError, match="a bug"):
        execution.with_db_retry(ctx, work)
    assert len(calls) == 1
