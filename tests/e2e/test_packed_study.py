"""End to end: a study through `trainsvc up` trains packed (its jobs show a pack), and its report
equals the report of the same study trained one job at a time (TRAINSVC_MAX_PACK=1).

Both services train in float64 (TRAINSVC_TRAINING_DTYPE), where a packed trial is its job
alone to rounding: every number of the reports agrees within REPORT_TOLERANCE, and everything
that is not a number (configurations, counts, which jobs diverged) exactly. In float32, as
served by default, a packed trial's kernels round differently (batched matmuls, per-trial
norms) and the stored numbers agree to about 1e-7 (tests/jobs/test_packing.py measures both).
"""

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.processes import Processes

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400)]

REPORT_TOLERANCE = 1e-10  # float64 rounding: measured 4.7e-16 over 81 numbers
FLOAT64 = {"TRAINSVC_TRAINING_DTYPE": "float64"}
# Wall-clock figures, which no two runs share, and what names this run's own resources.
DIFFERENCES: list[float] = []  # each compared number's, relative where above 1
UNCOMPARED = {"seconds_per_epoch", "plots", "study_id", "id", "created_at", "generated_at"}
# How the jobs trained, which is what differs between the two services (checked on its own).
UNCOMPARED |= {"packed", "seconds_note"}

STUDY = {
    "name": "packed-norm-x-lr",
    "base": {
        "dataset": {"name": "digits", "train_subset": 512, "batch_size": 64},
        "model": {"architecture": "mlp", "hidden_sizes": [32, 16], "dropout": {"rate": 0.1}},
        "optimizer": {"type": "sgd", "lr": 0.1, "momentum": 0.9},
        "epochs": 4,
        "device": "cpu",
    },
    "grid": {
        "model.normalization.type": ["none", "batch_norm"],
        "optimizer.lr": [0.05, 0.1],
        "seed": [0, 1],
    },
}


def _run_study(processes: Processes, url: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    grid_file = processes.workdir / "grid.json"
    grid_file.write_text(json.dumps(STUDY))
    command = ["study", "create", str(grid_file), "--wait", "--url", url]
    created = subprocess.run(
        [sys.executable, "-m", "app.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
        env=processes.env,
    )
    assert created.returncode == 0, created.stderr
    assert '"succeeded": 8' in created.stdout
    study_id = created.stdout.split()[1].rstrip(":")
    with httpx.Client(base_url=url, timeout=30) as client:
        report = client.get(f"/v1/studies/{study_id}/report").raise_for_status().json()
        jobs = client.get("/v1/jobs", params={"study_id": study_id, "limit": 100}).json()["items"]
    return report, jobs


def _assert_close(packed: Any, alone: Any, path: str = "report") -> None:
    if isinstance(packed, dict):
        assert packed.keys() == alone.keys(), path
        for key in packed:
            if key not in UNCOMPARED:
                _assert_close(packed[key], alone[key], f"{path}.{key}")
    elif isinstance(packed, list):
        assert len(packed) == len(alone), path
        for i, (a, b) in enumerate(zip(packed, alone, strict=True)):
            _assert_close(a, b, f"{path}[{i}]")
    elif isinstance(packed, float) and isinstance(alone, float):
        DIFFERENCES.append(abs(packed - alone) / max(1.0, abs(alone)))
        assert math.isclose(packed, alone, rel_tol=REPORT_TOLERANCE, abs_tol=REPORT_TOLERANCE), (
            path,
            packed,
            alone,
        )
    else:
        assert packed == alone, (path, packed, alone)


def test_a_study_trains_packed_and_reports_as_one_trained_job_by_job(
    processes: Processes, tmp_path: Path
) -> None:
    processes.env.update(FLOAT64)
    packed_report, packed_jobs = _run_study(processes, processes.api("up"))
    packs = {job["pack"] for job in packed_jobs}
    # One pack per normalization (the two computations), four jobs each.
    assert None not in packs
    assert len(packs) == 2, packs
    assert all(job["attempts"] == 1 for job in packed_jobs)
    processes.stop_all()

    (tmp_path / "alone").mkdir()
    alone = Processes(tmp_path / "alone", {"TRAINSVC_MAX_PACK": "1", **FLOAT64})
    try:
        alone_report, alone_jobs = _run_study(alone, alone.api("up"))
    finally:
        alone.stop_all()
    assert {job["pack"] for job in alone_jobs} == {None}
    assert len(packed_report["configurations"]) == 4
    # Each report says how its jobs trained: a packed job's seconds per epoch are its pack's.
    assert [row["packed"] for row in packed_report["configurations"]] == [2, 2, 2, 2]
    assert packed_report["seconds_note"].startswith("8 of the 8 succeeded jobs trained in packs")
    assert [row["packed"] for row in alone_report["configurations"]] == [0, 0, 0, 0]
    assert alone_report["seconds_note"] is None
    _assert_close(packed_report, alone_report)
    print(f"{len(DIFFERENCES)} numbers compared, largest difference {max(DIFFERENCES):.2g}")
