"""The report over metrics stored directly, checked against aggregates computed by hand."""

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.models import EpochMetric, Job
from app.core.studies.grid import point_key
from app.core.studies.report import Run, effects
from tests.factories import spec_payload

NORM = "model.normalization.type"

# (normalization, seed) -> per-epoch (val_accuracy, generalization_gap), epochs 1..3
CURVES = {
    ("none", 0): [(0.2, 0.1), (0.5, 0.2), (0.8, 0.3)],
    ("none", 1): [(0.3, 0.1), (0.6, 0.2), (0.7, 0.5)],
    ("none", 2): [(0.4, 0.0), (0.6, 0.1), (0.9, 0.4)],
    ("batch_norm", 0): [(0.8, 0.1), (0.9, 0.1), (0.9, 0.1)],
    ("batch_norm", 1): [(0.85, 0.1), (0.9, 0.1), (0.95, 0.2)],
    ("batch_norm", 2): [(0.9, 0.0), (0.9, 0.0), (0.9, 0.0)],
}


def store_epochs(session: Session, job_id: uuid.UUID, curve: list[tuple[float, float]]) -> None:
    for epoch, (accuracy, gap) in enumerate(curve, start=1):
        session.add(
            EpochMetric(
                job_id=job_id,
                epoch=epoch,
                attempt=1,
                train_loss=1.0,
                train_accuracy=0.5,
                val_loss=1.0 - accuracy,
                val_accuracy=accuracy,
                lr=0.1,
                epoch_seconds=0.5 * epoch,
                diagnostics={"generalization_gap": gap, "step_loss_std": 0.1 * epoch, "layers": []},
            )
        )


def finish(
    session: Session, job_id: str, status: str = "succeeded", error: str | None = None
) -> Job:
    job = session.get(Job, uuid.UUID(job_id))
    assert job is not None
    job.status = status
    job.error_type = error
    return job


@pytest.fixture
def study(client: TestClient, session: Session) -> dict[str, Any]:
    grid = {NORM: ["none", "batch_norm"], "seed": [0, 1, 2, 3]}
    created = client.post("/v1/studies", json={"base": spec_payload(), "grid": grid}).json()
    for job in created["jobs"]:
        point = job["grid_point"]
        key = (point[NORM], point["seed"])
        if key in CURVES:
            finish(session, job["id"])
            store_epochs(session, uuid.UUID(job["id"]), CURVES[key])
        elif point[NORM] == "none":  # seed 3: one running with a first epoch, one queued
            finish(session, job["id"], "running")
            store_epochs(session, uuid.UUID(job["id"]), [(0.99, 0.0)])
    session.commit()
    return created


def test_configurations_aggregate_over_seeds(client: TestClient, study: dict[str, Any]) -> None:
    report = client.get(f"/v1/studies/{study['id']}/report").json()
    assert report["complete"] is False
    assert report["counts"]["succeeded"] == 6
    assert report["note"] == (
        "1 jobs still queued and 1 running; this report covers the 6 that ended"
    )
    none, batch_norm = report["configurations"]
    assert none["configuration"] == {NORM: "none"}
    assert (none["jobs"], none["succeeded"], none["pending"]) == (4, 3, 1)
    # The running job's 0.99 is not counted: best accuracies 0.8, 0.7, 0.9.
    assert none["best_val_accuracy"] == pytest.approx({"mean": 0.8, "std": 0.1, "n": 3})
    assert batch_norm["best_val_accuracy"]["mean"] == pytest.approx(0.916667, abs=1e-6)
    assert batch_norm["best_val_accuracy"]["std"] == pytest.approx(0.0288675, abs=1e-6)
    assert none["final_val_loss"]["mean"] == pytest.approx(0.2)
    assert none["generalization_gap_final"]["mean"] == pytest.approx(0.4)
    assert none["generalization_gap_at_best"]["mean"] == pytest.approx(0.4)
    # batch_norm's best epochs are 2, 3, 1 (the first of equal bests): gaps 0.1, 0.2, 0.0.
    assert batch_norm["generalization_gap_at_best"]["mean"] == pytest.approx(0.1)
    assert none["step_loss_roughness"]["mean"] == pytest.approx(0.2)
    assert none["seconds_per_epoch"]["mean"] == pytest.approx(1.0)
    # Default target: 95% of batch_norm's 0.91667 = 0.87083; none reaches it only in seed 2.
    assert report["target"]["val_accuracy"] == pytest.approx(0.870833, abs=1e-6)
    assert none["epochs_to_target"] == pytest.approx(
        {"mean": 3.0, "std": None, "n": 1, "never_reached": 2}
    )
    assert batch_norm["epochs_to_target"]["mean"] == pytest.approx(5 / 3)
    assert report["max_stable_lr"] is None
    # Trained alone: nothing to say about how the seconds were measured.
    assert (none["packed"], batch_norm["packed"], report["seconds_note"]) == (0, 0, None)
    assert "probes" not in none  # no job asked for probes: the key is left out, not null


def test_the_report_is_documented_with_its_schema(client: TestClient) -> None:
    """The JSON report has a schema in OpenAPI (every report served is validated against it);
    the HTML page and the CSV table are its other media types."""
    document = client.get("/openapi.json").json()
    path = document["paths"]["/v1/studies/{study_id}/report"]["get"]
    content = path["responses"]["200"]["content"]
    assert set(content) == {"application/json", "text/html", "text/csv"}
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/StudyReport"}
    schemas = document["components"]["schemas"]
    assert {"configurations", "effects", "max_stable_lr", "seconds_note"} <= set(
        schemas["StudyReport"]["properties"]
    )
    assert {"packed", "seconds_per_epoch", "epochs_to_target", "probes"} <= set(
        schemas["ConfigurationReport"]["properties"]
    )


def test_the_report_says_which_jobs_trained_packed(
    client: TestClient, session: Session, study: dict[str, Any]
) -> None:
    """A packed job's epoch_seconds is its pack's epoch: the report counts such jobs per
    configuration (succeeded ones, as its aggregates) and says what their seconds measure."""
    pack = uuid.uuid4()
    for job in study["jobs"]:
        point = job["grid_point"]
        if point[NORM] == "batch_norm" or point["seed"] == 3:  # the running one: not counted
            stored = session.get(Job, uuid.UUID(job["id"]))
            assert stored is not None
            stored.pack = pack
    session.commit()
    report = client.get(f"/v1/studies/{study['id']}/report").json()
    none, batch_norm = report["configurations"]
    assert (none["packed"], batch_norm["packed"]) == (0, 3)
    assert report["seconds_note"].startswith(
        "3 of the 6 succeeded jobs trained in packs (several jobs as one batched model), and a "
        "packed job's seconds per epoch are its pack's"
    )
    csv = client.get(f"/v1/studies/{study['id']}/report", params={"format": "csv"}).text
    assert csv.splitlines()[0].split(",")[:6] == [
        NORM,
        "jobs",
        "succeeded",
        "diverged",
        "pending",
        "packed",
    ]
    html = client.get(f"/v1/studies/{study['id']}/report", params={"format": "html"}).text
    assert "3 of the 6 succeeded jobs trained in packs" in html


def test_effects_pair_over_seeds(client: TestClient, study: dict[str, Any]) -> None:
    report = client.get(f"/v1/studies/{study['id']}/report", params={"target": 0.8}).json()
    [effect] = report["effects"]
    assert (effect["axis"], effect["value"], effect["baseline"], effect["pairs"]) == (
        NORM,
        "batch_norm",
        "none",
        3,
    )
    # Target 0.8: none reaches it at epochs 3, never, 3; batch_norm at 1, 1, 1.
    epochs = effect["epochs_to_target"]
    assert (epochs["estimate"], epochs["ci_low"], epochs["ci_high"], epochs["n"]) == (3, 3, 3, 2)
    # Two pairs: the interval is their range, so no claim (statistics.MIN_PAIRS_TO_JUDGE).
    assert epochs["reading"] == (
        "too few pairs to judge batch_norm on epochs to target (n=2; it takes 4): "
        "3x fewer on average; not counted: 0 pairs where only the baseline reached the "
        "target, 1 where only batch_norm did"
    )
    # Best accuracy differences 0.1, 0.25, 0.0.
    accuracy = effect["best_val_accuracy"]
    assert accuracy["estimate"] == pytest.approx(0.35 / 3)
    assert 0.0 <= accuracy["ci_low"] <= accuracy["estimate"] <= accuracy["ci_high"] <= 0.25
    # Final gap differences -0.2, -0.3, -0.4: every resample's mean is negative.
    gap = effect["generalization_gap"]
    assert gap["estimate"] == pytest.approx(-0.3)
    assert -0.4 - 1e-9 <= gap["ci_low"] <= gap["ci_high"] <= -0.2 + 1e-9
    assert gap["reading"] == (
        "too few pairs to judge batch_norm on the generalization gap (n=3; it takes 4): "
        "-0.3 on average"
    )


def test_max_stable_lr(client: TestClient, session: Session) -> None:
    grid = {NORM: ["none"], "optimizer.lr": [0.1, 1.0, 3.0], "seed": [0, 1]}
    created = client.post("/v1/studies", json={"base": spec_payload(), "grid": grid}).json()
    for job in created["jobs"]:
        lr, seed = job["grid_point"]["optimizer.lr"], job["grid_point"]["seed"]
        if lr == 3.0 and seed == 1:
            finish(session, job["id"], "failed", "diverged")
            continue
        finish(session, job["id"])
        # digits has 10 classes: chance 0.1, so stable needs a final accuracy of 0.2.
        final = 0.15 if lr == 1.0 and seed == 0 else 0.9
        store_epochs(session, uuid.UUID(job["id"]), [(0.5, 0.1), (final, 0.1)])
    session.commit()
    report = client.get(f"/v1/studies/{created['id']}/report").json()
    [row] = report["max_stable_lr"]["configurations"]
    assert row["configuration"] == {NORM: "none"}
    assert row["max_stable_lr"] == 0.1
    assert [v["stable"] for v in row["by_lr"]] == [True, False, False]
    assert "chance" in row["by_lr"][1]["reason"]
    assert row["by_lr"][2]["reason"] == "1 of 2 seeds diverged"
    by_lr = {c["configuration"]["optimizer.lr"]: c for c in report["configurations"]}
    assert by_lr[3.0]["diverged"] == 1


def count_point_keys(monkeypatch: pytest.MonkeyPatch, module: str) -> list[int]:
    """Counts the calls of `module`'s point_key from now on, in the list's one item: the
    work a report or plot does in matching runs to grid points."""
    calls = [0]

    def counted(point: dict[str, Any]) -> str:
        calls[0] += 1
        return point_key(point)

    monkeypatch.setattr(f"{module}.point_key", counted)
    return calls


def test_effects_take_time_in_proportion_to_the_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run was matched against each value of an axis: a study of 1000 values on one axis
    (the largest allowed) took seconds per report request."""
    names = [f"name-{i}" for i in range(300)]
    grid = {"name": names, "seed": [0]}
    runs = [Run(uuid.uuid4(), "queued", {"name": name, "seed": 0}, None, 10) for name in names]
    calls = count_point_keys(monkeypatch, "app.core.studies.report")
    found = effects(grid, runs, dict.fromkeys((run.job_id for run in runs), None), {})
    assert len(found) == len(names) - 1
    assert calls[0] < 5 * len(runs)
