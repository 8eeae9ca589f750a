"""The client installs on its own: its wheel needs httpx and pydantic and nothing else, and it
works in a fresh virtual environment that has only those (and their own dependencies)."""

import email
import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.timeout(180)

PIP_WHEEL = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
# Run in the fresh environment: the client from its site-packages, nothing of the server.
CHECK = """
import importlib.util, trainsvc_client
from trainsvc_client import Client
assert trainsvc_client.__file__.startswith(SITE), trainsvc_client.__file__
for server in ("app", "worker", "fastapi", "sqlalchemy", "torch", "celery"):
    assert importlib.util.find_spec(server) is None, server
with Client("http://127.0.0.1:9") as client:
    print("ok", type(client).__name__)
"""


def _closure(names: list[str]) -> set[str]:
    """These distributions and everything they require (without extras), as installed here."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        dist = importlib.metadata.distribution(name)
        key = dist.metadata["Name"].lower()
        if key in found:
            continue
        found.add(key)
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return found


def test_the_client_wheel_needs_only_httpx_and_pydantic(repo_root: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    shutil.copytree(
        repo_root / "client", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    dist = tmp_path / "dist"
    subprocess.run(
        [*PIP_WHEEL, "-w", str(dist), str(source)],
        check=True,
        timeout=120,
    )
    [wheel] = dist.glob("trainsvc_client-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(archive.read(metadata_name))
        requires = sorted(Requirement(r).name for r in metadata.get_all("Requires-Dist") or [])
        assert requires == ["httpx", "pydantic"]
        packages = {name.split("/")[0] for name in names if not name.startswith(metadata_name[:-9])}
        assert packages == {"trainsvc_client"}  # nothing of the server

        # A fresh environment: the wheel unpacked into its site-packages (what pip does for a
        # pure-Python wheel), and only httpx and pydantic with their dependencies beside it.
        venv = tmp_path / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        python = venv / "bin" / "python"
        site = Path(
            subprocess.run(
                [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        )
        archive.extractall(site)

    allowed = tmp_path / "allowed"
    allowed.mkdir()
    for name in _closure(["httpx", "pydantic"]):
        for file in importlib.metadata.distribution(name).files or []:
            top = file.parts[0]
            located = Path(str(file.locate()))
            origin = located.parents[len(file.parts) - 2] if len(file.parts) > 1 else located
            target = allowed / top
            if not target.exists() and not top.endswith((".dist-info", ".pth")):
                target.symlink_to(origin if len(file.parts) > 1 else located)
    (site / "allowed.pth").write_text(f"{allowed}\n")

    check = CHECK.replace("SITE", repr(str(site)))
    run = subprocess.run(
        [str(python), "-I", "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "ok Client"
