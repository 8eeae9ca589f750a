"""The API process never imports torch: torch lives in the worker."""

import subprocess
import sys
from pathlib import Path

PROGRAM = """
import sys
from fastapi.testclient import TestClient
from app.core.config import Settings
from app.api.main import create_app
from app.core.migrate import upgrade

url = "sqlite:///" + sys.argv[1]
upgrade(url)
settings = Settings(
    database_url=url, broker_url="sqla+sqlite:///" + sys.argv[1] + ".broker", auth="off"
)
with TestClient(create_app(settings)) as client:
    job = client.post("/v1/jobs", json={"dataset": {"name": "digits"}, "epochs": 1}).json()
    assert client.get(f"/v1/jobs/{job['id']}").status_code == 200
    assert client.get("/v1/jobs").status_code == 200
    assert client.get("/v1/datasets").status_code == 200
    assert client.get("/v1/ready").status_code == 200
import app.cli  # the command-line entry point too
print(sorted(name for name in sys.modules if name == "torch" or name.startswith("torch.")))
"""


def test_api_process_never_imports_torch(tmp_path: Path, repo_root: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path / "api.db")],
        capture_output=True,
        text=True,
        cwd=repo_root,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
