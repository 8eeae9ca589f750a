"""The layers hold at run time too: what each process loads, not only what lint-imports reads."""

import subprocess
import sys
from pathlib import Path

import pytest

LOADED = """
import sys
import {module}
print(sorted({{name.split(".")[0] for name in sys.modules}}))
"""


def _top_level_modules(module: str, repo_root: Path) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", LOADED.format(module=module)],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return set(eval(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["worker.main", "worker.execution", "worker.tasks"])
def test_the_worker_never_loads_fastapi_or_starlette(module: str, repo_root: Path) -> None:
    loaded = _top_level_modules(module, repo_root)
    assert "torch" in loaded  # the check sees real imports
    assert not loaded & {"fastapi", "starlette"}


def test_the_trainer_loads_no_database_broker_or_http(repo_root: Path) -> None:
    loaded = _top_level_modules("worker.training.loop", repo_root)
    assert "torch" in loaded
    assert not loaded & {"sqlalchemy", "celery", "kombu", "fastapi", "starlette", "httpx"}


def test_the_core_loads_neither_http_nor_worker_nor_torch(repo_root: Path) -> None:
    loaded = _top_level_modules("app.core.lifecycle, app.core.outbox, app.core.datasets", repo_root)
    assert "sqlalchemy" in loaded
    assert not loaded & {"fastapi", "starlette", "worker", "torch"}
