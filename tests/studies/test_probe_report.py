"""The probes' figures (issue 12) in a study's report, effects and plots, from stored metrics
whose expected aggregates are computed here by hand."""

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.models import EpochMetric, Job
from app.core.studies import plots
from tests.factories import spec_payload

NORM = "model.normalization.type"
DIAGNOSTICS = {"landscape": {"every_steps": 5}, "gradient_noise": {"every_steps": 5}}
# (normalization, seed) -> per-epoch (beta_smoothness, gradient_noise_scale), epochs 1..2
FIGURES = {
    ("none", 0): [(4.0, 100.0), (6.0, 200.0)],
    ("none", 1): [(5.0, 110.0), (7.0, 210.0)],
    ("batch_norm", 0): [(1.0, 300.0), (2.0, 400.0)],
    ("batch_norm", 1): [(2.0, 320.0), (2.0, 420.0)],
}


def _diagnostics(beta: float, noise: float) -> dict[str, Any]:
    return {
        "generalization_gap": 0.1,
        "step_loss_std": 0.1,
        "layers": [],
        "landscape": {
            "samples": 2,
            "beta_smoothness_mean": beta,
            "beta_smoothness_relative_mean": beta / 10,
            "loss_variation_mean": beta / 100,
        },
        "gradient_noise": {"samples": 2, "gradient_noise_scale": noise, "grad_norm_var": 0.5},
    }


@pytest.fixture
def study(client: TestClient, session: Session) -> dict[str, Any]:
    grid = {NORM: ["none", "batch_norm"], "seed": [0, 1]}
    base = spec_payload(diagnostics=DIAGNOSTICS)
    created = client.post("/v1/studies", json={"base": base, "grid": grid}).json()
    for job in created["jobs"]:
        point = job["grid_point"]
        row = session.get(Job, uuid.UUID(job["id"]))
        assert row is not None
        row.status = "succeeded"
        for epoch, (beta, noise) in enumerate(FIGURES[(point[NORM], point["seed"])], start=1):
            session.add(
                EpochMetric(
                    job_id=row.id,
                    epoch=epoch,
                    attempt=1,
                    train_loss=1.0,
                    train_accuracy=0.5,
                    val_loss=0.5,
                    val_accuracy=0.5 + 0.1 * epoch,
                    lr=0.1,
                    epoch_seconds=1.0,
                    diagnostics=_diagnostics(beta, noise),
                )
            )
    session.commit()
    return created


def test_configurations_aggregate_probe_figures(client: TestClient, study: dict[str, Any]) -> None:
    report = client.get(f"/v1/studies/{study['id']}/report").json()
    none, batch_norm = report["configurations"]
    # Seeds' means over epochs: none 5 and 6, batch_norm 1.5 and 2; finals 6, 7 and 2, 2.
    beta = none["probes"]["beta_smoothness"]
    assert beta["over_epochs"]["estimate"] == pytest.approx(5.5)
    assert beta["over_epochs"]["n"] == 2
    assert 5.0 <= beta["over_epochs"]["ci_low"] <= beta["over_epochs"]["ci_high"] <= 6.0
    assert beta["final_epoch"]["estimate"] == pytest.approx(6.5)
    assert batch_norm["probes"]["beta_smoothness"]["over_epochs"]["estimate"] == pytest.approx(1.75)
    assert batch_norm["probes"]["beta_smoothness_relative"]["final_epoch"][
        "estimate"
    ] == pytest.approx(0.2)
    noise = batch_norm["probes"]["gradient_noise_scale"]["over_epochs"]
    assert noise["estimate"] == pytest.approx((350.0 + 370.0) / 2)
    # A figure no run measured is left out rather than reported empty.
    assert "ics_cosine" not in none["probes"]


def test_effects_compare_probe_figures_with_the_baseline(
    client: TestClient, study: dict[str, Any]
) -> None:
    report = client.get(f"/v1/studies/{study['id']}/report").json()
    [effect] = report["effects"]
    # Paired per seed: beta 1.5 - 5 and 2 - 6; noise scale 350 - 150 and 370 - 160.
    beta = effect["probes"]["beta_smoothness"]
    assert beta["estimate"] == pytest.approx(-3.75)
    assert beta["n"] == 2
    assert beta["reading"] == (
        "too few pairs to judge batch_norm on beta smoothness (n=2; it takes 4): -3.75 on average"
    )
    assert effect["probes"]["gradient_noise_scale"]["estimate"] == pytest.approx(205.0)


def test_probe_plots_are_listed_and_drawn(client: TestClient, study: dict[str, Any]) -> None:
    report = client.get(f"/v1/studies/{study['id']}/report").json()
    assert {"landscape", "gradient_noise"} <= report["plots"].keys()
    assert "covariate_shift" not in report["plots"]  # the base spec did not ask for it
    for name in ("landscape", "gradient_noise"):
        png = client.get(f"/v1/studies/{study['id']}/plots/{name}.png")
        assert png.status_code == 200
        assert png.content.startswith(b"\x89PNG")
    assert client.get(f"/v1/studies/{study['id']}/plots/covariate_shift.png").status_code == 404


def test_a_study_without_probes_reports_none(client: TestClient, session: Session) -> None:
    grid = {NORM: ["none", "batch_norm"], "seed": [0]}
    created = client.post("/v1/studies", json={"base": spec_payload(), "grid": grid}).json()
    report = client.get(f"/v1/studies/{created['id']}/report").json()
    assert all("probes" not in row for row in report["configurations"])
    assert all("probes" not in effect for effect in report["effects"])
    assert list(report["plots"]) == ["learning_curves"]


@pytest.mark.parametrize(
    ("base_diagnostics", "grid"),
    [
        ({"landscape": {}}, {}),  # the probe with its defaults: {} was read as "off"
        (None, {"diagnostics.landscape.every_steps": [10, 100]}),
        (None, {"diagnostics.landscape": [None, {"every_steps": 10}]}),
        (None, {"diagnostics": [None, {"landscape": {}}]}),
    ],
    ids=["base-defaults", "axis-field", "axis-section", "axis-diagnostics"],
)
def test_a_probe_asked_for_by_the_base_or_an_axis_has_its_plot(
    base_diagnostics: dict[str, Any] | None, grid: dict[str, list[Any]]
) -> None:
    """The plot was listed only where the base's probe section was a non-empty object."""
    base = spec_payload(diagnostics=base_diagnostics)
    names = plots.available({**grid, "seed": [0]}, base)
    assert "landscape" in names
    assert "covariate_shift" not in names
