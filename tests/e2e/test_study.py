"""End to end: a 2x2x3-seed study from one POST, on the embedded default (`trainsvc up`:
SQLite and its SQL broker) and as in production (PostgreSQL and Redis, `serve` + `worker`)."""

import json
import subprocess
import sys

import httpx
import pytest

from tests.support.processes import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

STUDY = {
    "name": "norm-x-dropout",
    "base": {
        "dataset": {"name": "digits"},
        "model": {"architecture": "mlp", "hidden_sizes": [32]},
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        "epochs": 6,
        "device": "cpu",
    },
    "grid": {
        "model.normalization.type": ["none", "batch_norm"],
        "model.dropout.rate": [0.0, 0.5],
        "seed": [0, 1, 2],
    },
}


@pytest.fixture(params=["embedded", "postgres"])
def service_url(request: pytest.FixtureRequest, processes: Processes) -> str:
    if request.param == "embedded":
        return processes.api("up")
    processes.env.update(
        TRAINSVC_DATABASE_URL=request.getfixturevalue("fresh_postgres_url"),
        TRAINSVC_BROKER_URL=request.getfixturevalue("fresh_redis_url"),
        TRAINSVC_WORKER_CONCURRENCY="2",
    )
    processes.worker()
    return processes.api("serve")  # auth off: Processes.api sets TRAINSVC_AUTH=off for serve


def test_study_runs_end_to_end_with_its_report(processes: Processes, service_url: str) -> None:
    url = service_url
    grid_file = processes.workdir / "grid.json"
    grid_file.write_text(json.dumps(STUDY))
    created = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "study",
            "create",
            str(grid_file),
            "--wait",
            "--url",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=processes.env,
    )
    assert created.returncode == 0, created.stderr
    study_id = created.stdout.split()[1].rstrip(":")
    assert '"succeeded": 12' in created.stdout
    with httpx.Client(base_url=url, timeout=30) as client:
        report = client.get(f"/v1/studies/{study_id}/report").raise_for_status().json()
        assert report["complete"] is True
        assert len(report["configurations"]) == 4
        for row in report["configurations"]:
            assert row["best_val_accuracy"]["n"] == 3
            assert row["best_val_accuracy"]["mean"] > 0.5
            assert row["seconds_per_epoch"]["mean"] > 0
        assert len(report["effects"]) == 2
        for effect in report["effects"]:
            accuracy = effect["best_val_accuracy"]
            assert accuracy["n"] == 6
            assert accuracy["ci_low"] <= accuracy["estimate"] <= accuracy["ci_high"]
        html = client.get(f"/v1/studies/{study_id}/report", params={"format": "html"})
        assert "norm-x-dropout" in html.text
        table = client.get(f"/v1/studies/{study_id}/report", params={"format": "csv"})
        assert len(table.text.strip().splitlines()) == 5
        for plot in report["plots"].values():
            png = client.get(plot)
            assert png.content.startswith(b"\x89PNG")
