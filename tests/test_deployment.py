"""docker-compose.yml and the Dockerfile agree with each other and with the CLI.

No Docker engine runs here, so the images are not built; what can be checked without one is.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.cli import build_parser


def test_compose_services_images_and_commands_fit_together(repo_root: Path) -> None:
    compose = yaml.safe_load((repo_root / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "migrate", "api", "worker"}
    stages = set(re.findall(r"^FROM \S+ AS (\w+)$", (repo_root / "Dockerfile").read_text(), re.M))
    for name in ("migrate", "api", "worker"):
        assert services[name]["build"]["target"] in stages
        env = services[name]["environment"]
        assert env["TRAINSVC_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["TRAINSVC_BROKER_URL"].startswith("redis://redis:")
    assert services["migrate"]["command"] == ["trainsvc", "migrate"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    [gpu] = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["capabilities"] == ["gpu"]
    # Every command the images run is one the CLI knows.
    dockerfile_commands = re.findall(
        r'^CMD \["trainsvc", "(\w+)"', (repo_root / "Dockerfile").read_text(), re.M
    )
    assert set(dockerfile_commands) == {"serve", "worker"}
    for command in [*dockerfile_commands, "migrate"]:
        build_parser().parse_args([command])


def _stages(dockerfile: str) -> dict[str, str]:
    """Each build stage's text, by name."""
    parts = re.split(r"^FROM \S+ AS (\w+)$", dockerfile, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_images_install_the_built_wheel_not_the_checkout(repo_root: Path) -> None:
    stages = _stages((repo_root / "Dockerfile").read_text())
    # The client's wheel too: the server's wheel requires it, and PyPI has none.
    assert "COPY client client" in stages["build"]
    assert "pip wheel --no-deps --wheel-dir /wheels . ./client" in stages["build"]
    for name in ("api", "worker"):
        stage = stages[name]
        assert "COPY --from=build /wheels /wheels" in stage
        installs = re.findall(r"pip install .*", stage)
        assert any("--find-links /wheels /wheels/trainsvc-" in line for line in installs)
        for line in installs:
            assert "-c constraints.txt" in line
            assert "-e" not in line.split()  # an editable install only works from a checkout
        # The code reaches the image only inside the wheel.
        assert not re.search(r"^COPY (app|worker|migrations)\b", stage, re.M)


def test_the_images_dependency_lists_leave_the_client_to_its_wheel(
    repo_root: Path, tmp_path: Path
) -> None:
    """The base stage installs pyproject's dependencies before the code; trainsvc-client among
    them would send pip to PyPI, which has no such package."""
    dockerfile = (repo_root / "Dockerfile").read_text().replace("\\\n", "")
    [script] = re.findall(r'^RUN python -c "(.*)"$', dockerfile, re.M)
    shutil.copy(repo_root / "pyproject.toml", tmp_path)
    subprocess.run([sys.executable, "-c", script], cwd=tmp_path, check=True)
    for name in ("requirements-api.txt", "requirements-worker.txt"):
        requirements = (tmp_path / name).read_text().splitlines()
        assert "fastapi>=0.165" in requirements
        assert not [line for line in requirements if line.startswith("trainsvc")], name


def test_compose_file_validates(repo_root: Path) -> None:
    if shutil.which("docker-compose") is None:
        # `make test` installs it where it can (.ci/setup-system); CI must not skip silently.
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("docker-compose is not installed (CI=true)", pytrace=False)
        pytest.skip("docker-compose is not installed")
    result = subprocess.run(
        ["docker-compose", "config", "-q"], cwd=repo_root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
