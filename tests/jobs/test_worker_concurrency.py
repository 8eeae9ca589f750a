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
