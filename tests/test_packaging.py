"""A built wheel is a working install: `trainsvc migrate`, `trainsvc serve` and the client
commands from it and the client's wheel alone.

The wheel is built from a copy of the sources and installed into a fresh virtual environment;
the commands run there, in a folder outside the repository, so nothing can come from the
checkout. Its dependencies come from this environment's site-packages (a .pth line), which
keeps the test offline and quick; the project itself (app, worker, migrations) comes only
from the wheel, and the test checks that.
"""

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from tests.support.processes import free_port, wait_until

pytestmark = pytest.mark.timeout(240)

PIP = [sys.executable, "-m", "pip"]
SOURCES = ["pyproject.toml", "README.md", "app", "worker", "migrations", "client"]


@pytest.fixture(scope="module")
def dist(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder README's `pip wheel --no-deps -w dist . ./client` fills."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in SOURCES:
        path = repo_root / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=ignore)
        else:
            shutil.copy(path, source / name)
    dist = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [
            *PIP,
            *("wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)),
            *(str(source), str(source / "client")),
        ],
        check=True,
        capture_output=True,
    )
    return dist


@pytest.fixture(scope="module")
def wheel(dist: Path) -> Path:
    [built] = dist.glob("trainsvc-0*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and the client's installed; returns its bin/
    folder. Both with --no-deps: pip would take this environment's editable client (seen
    through the .pth) for the dependency, and the test_the_wheel_requires_... test checks it
    is declared."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site_packages = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # The dependencies, after the venv's own site-packages on sys.path: the wheel's app,
    # worker and migrations come first. (This environment's editable-install hook is a .pth
    # file of its own, which a path listed here does not run.)
    (site_packages / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    [client] = dist.glob("trainsvc_client-*.whl")
    subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", wheel, client],
        check=True,
        capture_output=True,
    )
    return venv / "bin"


def test_the_wheel_requires_the_client_its_commands_use(wheel: Path) -> None:
    """Without it `trainsvc jobs list` from a wheel install failed: No module named
    'trainsvc_client'."""
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [name for name in archive.namelist() if name.endswith(".dist-info/METADATA")]
        requires = [
            line for line in archive.read(metadata).decode().splitlines() if "Requires-Dist" in line
        ]
    assert "Requires-Dist: trainsvc-client==0.1.0" in requires


def test_the_wheel_carries_the_migrations(wheel: Path, repo_root: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    revisions = {p.name for p in (repo_root / "migrations" / "versions").glob("*.py")}
    assert revisions
    assert {f"migrations/versions/{name}" for name in revisions} <= names
    assert {"migrations/env.py", "migrations/script.py.mako"} <= names


def test_the_wheel_carries_the_dashboard(wheel: Path, repo_root: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    static = repo_root / "app" / "api" / "dashboard" / "static"
    files = {
        f"app/api/dashboard/static/{p.relative_to(static)}"
        for p in static.rglob("*")
        if p.is_file()
    }
    assert "app/api/dashboard/static/vendor/uplot/LICENSE" in files
    assert "app/api/dashboard/static/views/job.js" in files
    assert files <= names, files - names


def test_an_installed_wheel_migrates_and_serves(installed: Path, tmp_path: Path) -> None:
    env = {"PATH": f"{installed}:/usr/bin:/bin", "HOME": str(tmp_path)}
    where = subprocess.run(
        [
            installed / "python",
            "-c",
            "import app, migrations, trainsvc_client; "
            "print(app.__file__, migrations.__file__, trainsvc_client.__file__)",
        ],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert all(path.startswith(str(installed.parent)) for path in where.split()), where

    database = tmp_path / "fresh.db"
    env["TRAINSVC_DATABASE_URL"] = f"sqlite:///{database}"
    env["TRAINSVC_BROKER_URL"] = f"sqla+sqlite:///{tmp_path / 'broker.db'}"
    migrated = subprocess.run(
        [installed / "trainsvc", "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert migrated.returncode == 0, migrated.stderr
    engine = sa.create_engine(f"sqlite:///{database}")
    with engine.connect() as connection:
        assert {"jobs", "job_attempts", "alembic_version"} <= set(
            sa.inspect(connection).get_table_names()
        )
    engine.dispose()

    port = free_port()
    env["TRAINSVC_AUTH"] = "off"  # on loopback: the client command below sends no key
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(
        [installed / "trainsvc", "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: _health(port) == 200, 60, "the installed API's health check")
        # The dashboard's files come from the wheel too.
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200
        assert "trainsvc dashboard" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/views/jobs.js", timeout=5).status_code == 200
        # A client command: the client comes from its own wheel.
        listed = subprocess.run(
            [installed / "trainsvc", "jobs", "list", "--url", f"http://127.0.0.1:{port}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith("id")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _health(port: int) -> int | None:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code
    except httpx.HTTPError:
        return None
