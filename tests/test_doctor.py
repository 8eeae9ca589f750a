"""`trainsvc doctor`: exit 0 when all is well, non-zero naming the fix when something is not."""

import sqlite3
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from app.core.config import Settings
from app.core.migrate import upgrade
from app.core.observability import doctor
from tests.support.processes import Processes, free_port, wait_until
from tests.test_schema_check import stamp


def run_doctor(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "doctor", *args],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def migrated_sqlite(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'trainsvc.db'}"
    upgrade(url)
    return url


@pytest.mark.e2e
@pytest.mark.timeout(180)
def test_a_healthy_deployment_passes_every_check(
    processes: Processes, migrated_sqlite: str, fresh_redis_url: str
) -> None:
    processes.env.update(
        {
            "TRAINSVC_DATABASE_URL": migrated_sqlite,
            "TRAINSVC_BROKER_URL": fresh_redis_url,
            "TRAINSVC_SWEEP_SECONDS": "0.5",
        }
    )
    before = run_doctor(processes.workdir, processes.env)
    assert before.returncode == 1  # no worker yet: queued jobs would wait for ever
    assert "[fail] workers: no worker has been seen" in before.stdout
    assert "start `trainsvc worker`" in before.stdout

    processes.worker()
    result = wait_until(
        lambda: (done := run_doctor(processes.workdir, processes.env)).returncode == 0 and done,
        60,
        "doctor to see the worker's heartbeat",
        interval=1,
    )
    for name in ("database", "migrations", "workers", "broker"):
        assert f"[ ok ] {name}:" in result.stdout
    assert "gpus:" in result.stdout
    assert "auth:" in result.stdout
    assert result.stdout.rstrip().endswith("all checks passed")


def test_an_unmigrated_database_fails_naming_trainsvc_migrate(
    tmp_path: Path, fresh_redis_url: str
) -> None:
    sqlite3.connect(tmp_path / "empty.db").close()
    env = _env(f"sqlite:///{tmp_path / 'empty.db'}", fresh_redis_url)
    result = run_doctor(tmp_path, env)
    assert result.returncode == 1
    assert "[fail] migrations: the schema is at none; the latest is" in result.stdout
    assert "fix: run `trainsvc migrate`" in result.stdout


def test_a_schema_newer_than_this_release_is_a_warning_as_at_start(
    migrated_sqlite: str, fresh_redis_url: str
) -> None:
    """serve and worker start on a newer schema (a rolling upgrade migrates first); doctor
    said "run `trainsvc migrate`", which cannot help, and failed."""
    stamp(migrated_sqlite, "0011")
    settings = Settings(database_url=migrated_sqlite, broker_url=fresh_redis_url)
    by_name = {check.name: check for check in doctor.check_database(settings)}
    migrations = by_name["migrations"]
    assert migrations.outcome == "warn"
    assert (
        migrations.detail
        == "the schema is at 0011; the latest is 0010: newer than this release knows"
    )
    assert "workers" in by_name  # the rest is still checked


def test_a_missing_sqlite_file_is_not_created(tmp_path: Path, fresh_redis_url: str) -> None:
    env = _env(f"sqlite:///{tmp_path / 'absent.db'}", fresh_redis_url)
    result = run_doctor(tmp_path, env)
    assert result.returncode == 1
    assert "no such file" in result.stdout
    assert not (tmp_path / "absent.db").exists()


def test_an_unreachable_broker_fails_naming_the_setting(
    tmp_path: Path, migrated_sqlite: str
) -> None:
    env = _env(migrated_sqlite, f"redis://127.0.0.1:{free_port()}/0")  # a closed port
    result = run_doctor(tmp_path, env)
    assert result.returncode == 1
    assert "[fail] broker:" in result.stdout
    assert "fix: check TRAINSVC_BROKER_URL" in result.stdout
    assert "[ ok ] database:" in result.stdout


def test_an_unreachable_database_fails(tmp_path: Path, fresh_redis_url: str) -> None:
    closed = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    result = run_doctor(tmp_path, _env(closed, fresh_redis_url))
    assert result.returncode == 1
    assert "[fail] database:" in result.stdout
    assert "fix: check TRAINSVC_DATABASE_URL" in result.stdout


def test_auth_off_on_a_network_address_is_a_failure() -> None:
    off: Any = SimpleNamespace(auth="off")
    assert doctor.check_auth(off, "0.0.0.0").outcome == "fail"
    assert doctor.check_auth(off, "127.0.0.1").outcome == "warn"
    assert doctor.check_auth(off, "localhost").outcome == "warn"
    assert doctor.check_auth(SimpleNamespace(auth="on"), "0.0.0.0").outcome == "ok"
    by_default = doctor.check_auth(Settings(), None)  # keys are on by default, but not for `up`
    assert by_default.outcome == "ok"
    assert "`trainsvc up` runs without them" in by_default.detail


def test_gpus_are_listed_from_nvidia_smi(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor.shutil, "which", lambda _: "/usr/bin/nvidia-smi")

    def nvidia_smi(*_: Any, **__: Any) -> subprocess.CompletedProcess[str]:
        out = "GPU 0: NVIDIA H100 (UUID: GPU-1)\nGPU 1: NVIDIA H100 (UUID: GPU-2)\n"
        return subprocess.CompletedProcess([], 0, out, "")

    check = doctor.check_gpus(run=nvidia_smi)
    assert (check.outcome, check.detail.split(":")[0]) == ("ok", "2 visible")
    monkeypatch.setattr(doctor.shutil, "which", lambda _: None)
    assert doctor.check_gpus().outcome == "info"  # CPU training is not a problem


def _env(database_url: str, broker_url: str) -> dict[str, str]:
    return {
        **Processes(Path("."), {}).env,
        "TRAINSVC_DATABASE_URL": database_url,
        "TRAINSVC_BROKER_URL": broker_url,
    }
