"""README: a worker runs one training process per GPU, one on a machine without a GPU."""

import pytest

from app.core.config import Settings
from worker import main


@pytest.mark.parametrize(("gpus", "processes"), [(0, 1), (1, 1), (4, 4)])
def test_default_is_one_process_per_gpu_else_one(
    monkeypatch: pytest.MonkeyPatch, gpus: int, processes: int
) -> None:
    monkeypatch.setattr(main, "visible_gpus", lambda: gpus)
    assert main.pool_size(Settings()) == processes


def test_setting_and_flag_override_the_gpu_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(main, "visible_gpus", lambda: 4)
    assert main.pool_size(Settings(worker_concurrency=2)) == 2
    assert main.pool_size(Settings(worker_concurrency=2), requested=3) == 3


def test_an_omp_num_threads_meant_for_one_process_is_named_when_there_are_several(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker leaves an operator's OMP_NUM_THREADS alone; kept from a one-process setup it
    oversubscribes the cores several times over, so the worker says so as it starts."""
    monkeypatch.setattr(main.os, "cpu_count", lambda: 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert main.oversubscription(2) == (
        "OMP_NUM_THREADS=2 in each of 2 training processes is 4 threads for 2 cores: CPU "
        "training runs several times slower; unset it (each process then takes 1) or lower it"
    )
    assert main.oversubscription(1) is None  # one process: its threads are the operator's call
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main.oversubscription(2) is None
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert main.oversubscription(2) is None  # the worker splits the cores itself
