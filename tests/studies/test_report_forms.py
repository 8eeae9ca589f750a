"""The report as HTML and CSV, and the plots as PNG."""

import csv
import io
import uuid
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app.core.studies import plots
from app.core.studies.report import Run
from tests.factories import spec_payload
from tests.studies.test_report import count_point_keys, finish, store_epochs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = {
    "model.normalization.type": ["none", "batch_norm"],
    "model.dropout.rate": [0.0, 0.5],
    "optimizer.lr": [0.1, 1.0],
    "seed": [0, 1],
}


@pytest.fixture
def ended_study(client: TestClient, session: Session) -> dict[str, Any]:
    body = {"name": "<script>alert(1)</script>", "base": spec_payload(), "grid": GRID}
    created = client.post("/v1/studies", json=body).json()
    for index, job in enumerate(created["jobs"]):
        finish(session, job["id"])
        base = 0.5 + 0.01 * index
        store_epochs(
            session, uuid.UUID(job["id"]), [(base, 0.1), (base + 0.2, 0.2), (base + 0.3, 0.3)]
        )
    session.commit()
    return created


def test_csv_has_one_row_per_configuration(client: TestClient, ended_study: dict[str, Any]) -> None:
    response = client.get(f"/v1/studies/{ended_study['id']}/report", params={"format": "csv"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == 8
    first = rows[0]
    assert first["model.normalization.type"] == "none"
    assert first["model.dropout.rate"] == "0.0"
    assert first["optimizer.lr"] == "0.1"
    assert first["succeeded"] == "2"
    # Jobs 0 and 1 (seeds 0, 1) end at 0.80 and 0.81.
    assert float(first["best_val_accuracy_mean"]) == pytest.approx(0.805)
    assert first["best_val_accuracy_n"] == "2"


def test_csv_text_a_spreadsheet_would_run_is_quoted_and_numbers_are_not(
    client: TestClient,
) -> None:
    formula = '=HYPERLINK("http://evil.example","x")'
    grid = {"name": [formula, "@SUM(1)", "plain"], "model.dropout.rate": [0.0, 0.5]}
    study = client.post("/v1/studies", json={"base": spec_payload(), "grid": grid}).json()
    response = client.get(f"/v1/studies/{study['id']}/report", params={"format": "csv"})
    names = [row["name"] for row in csv.DictReader(io.StringIO(response.text))]
    assert sorted(names) == sorted(["'" + formula, "'@SUM(1)", "plain"] * 2)
    assert all(not name.startswith(("=", "@")) for name in names)


def test_null_and_booleans_on_an_axis_read_as_the_spec_spells_them(client: TestClient) -> None:
    """A null (grad_clip_norm: none) was an empty cell, as a missing value is, and a boolean
    Python's True."""
    grid = {"grad_clip_norm": [None, 1.0], "model.normalization.affine": [True, False]}
    base = spec_payload(model={"hidden_sizes": [8], "normalization": {"type": "layer_norm"}})
    study = client.post("/v1/studies", json={"base": base, "grid": grid}).json()
    response = client.get(f"/v1/studies/{study['id']}/report", params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [(row["grad_clip_norm"], row["model.normalization.affine"]) for row in rows] == [
        ("null", "true"),
        ("null", "false"),
        ("1.0", "true"),
        ("1.0", "false"),
    ]
    page = client.get(f"/v1/studies/{study['id']}/report", params={"format": "html"}).text
    assert "<td>null</td>" in page
    assert "<td>true</td>" in page


def test_html_is_escaped_and_shows_the_plots(
    client: TestClient, ended_study: dict[str, Any]
) -> None:
    response = client.get(f"/v1/studies/{ended_study['id']}/report", params={"format": "html"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    for name in ("learning_curves", "gap_by_dropout", "accuracy_by_lr"):
        assert f"/v1/studies/{ended_study['id']}/plots/{name}.png" in page
    assert "Largest stable learning rate" in page
    assert "batch_norm" in page


def test_report_lists_plots_and_each_is_a_png(
    client: TestClient, ended_study: dict[str, Any]
) -> None:
    report = client.get(f"/v1/studies/{ended_study['id']}/report").json()
    assert set(report["plots"]) == {"learning_curves", "gap_by_dropout", "accuracy_by_lr"}
    for url in report["plots"].values():
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"] == "image/png"
        assert response.content.startswith(PNG_SIGNATURE)
        assert len(response.content) > 5000  # axes, lines and labels, not an empty canvas


def test_per_layer_dropout_rates_get_no_plot_by_rate(client: TestClient) -> None:
    """A rate of [0.5, 0.2] is no point on an x axis: its gap_by_dropout plot answered 500."""
    grid = {"model.dropout.rate": [[0.0, 0.0], [0.5, 0.2]], "seed": [0, 1]}
    base = spec_payload(model={"architecture": "mlp", "hidden_sizes": [8, 8]})
    study = client.post("/v1/studies", json={"base": base, "grid": grid}).json()
    report = client.get(f"/v1/studies/{study['id']}/report").json()
    assert list(report["plots"]) == ["learning_curves"]
    missing = client.get(f"/v1/studies/{study['id']}/plots/gap_by_dropout.png")
    assert missing.status_code == 404


def test_plots_of_an_ended_study_are_drawn_once(
    client: TestClient, ended_study: dict[str, Any]
) -> None:
    url = f"/v1/studies/{ended_study['id']}/plots/learning_curves.png"
    first = client.get(url).content
    cache = client.app.state.study_plot_cache  # type: ignore[attr-defined]
    [(key, cached)] = list(cache._entries.items())
    assert key[:2] == (uuid.UUID(ended_study["id"]), "learning_curves")
    cache._entries[key] = b"drawn once"  # a second request must be served from here
    assert client.get(url).content == b"drawn once"
    assert cached == first


def test_running_study_plots_are_not_cached_and_unknown_plot_is_404(
    client: TestClient,
) -> None:
    body = {"base": spec_payload(), "grid": {"seed": [0, 1]}}
    created = client.post("/v1/studies", json=body).json()
    response = client.get(f"/v1/studies/{created['id']}/plots/learning_curves.png")
    assert response.status_code == 200
    assert response.content.startswith(PNG_SIGNATURE)  # no finished run yet: empty axes
    assert not client.app.state.study_plot_cache._entries  # type: ignore[attr-defined]
    missing = client.get(f"/v1/studies/{created['id']}/plots/gap_by_dropout.png")
    assert missing.status_code == 404
    assert missing.json()["error"] == "plot_not_found"


def _texts(figure: Any) -> list[str]:
    return [text.get_text() for axes in figure.axes for text in axes.texts]


@pytest.mark.parametrize("name", ["learning_curves", "gap_by_dropout", "accuracy_by_lr"])
def test_a_plot_with_no_succeeded_run_says_so(name: str) -> None:
    """An all-failed study's plots are frames with a sentence in them, not blank frames."""
    failed = [
        Run(
            uuid.uuid4(), "failed", {"model.dropout.rate": 0.5, "optimizer.lr": 0.1}, "diverged", 10
        )
    ]
    figure = plots.figure_of(name, GRID, failed)
    assert plots.NOTHING_YET in _texts(figure)
    assert not any(axes.lines for axes in figure.axes)


def test_a_plot_with_a_succeeded_run_draws_it_and_says_nothing_more() -> None:
    point = {
        "model.normalization.type": "none",
        "model.dropout.rate": 0.0,
        "optimizer.lr": 0.1,
        "seed": 0,
    }
    run = Run(
        uuid.uuid4(),
        "succeeded",
        point,
        None,
        10,
        epochs=np.array([1, 2]),
        val_loss=np.array([1.0, 0.5]),
        val_accuracy=np.array([0.5, 0.8]),
        gap=np.array([0.0, 0.1]),
    )
    for name in ("learning_curves", "gap_by_dropout", "accuracy_by_lr"):
        figure = plots.figure_of(name, GRID, [run])
        assert _texts(figure) == []
        assert any(axes.lines for axes in figure.axes)


def test_one_epoch_curves_show_and_many_configurations_keep_their_own_colours() -> None:
    """A one-epoch line without a marker drew nothing; the 11th configuration took the 1st's
    colour (the batchnorm-learning-rate preset has 12)."""
    lrs = [0.001 * (i + 1) for i in range(12)]
    runs = [
        Run(
            uuid.uuid4(),
            "succeeded",
            {"optimizer.lr": lr, "seed": 0},
            None,
            10,
            epochs=np.array([1]),
            val_loss=np.array([1.0]),
            val_accuracy=np.array([0.5]),
            gap=np.array([0.0]),
        )
        for lr in lrs
    ]
    figure = plots.figure_of("learning_curves", {"optimizer.lr": lrs, "seed": [0]}, runs)
    lines = figure.axes[0].lines
    assert len(lines) == 12
    assert all(line.get_marker() == "o" for line in lines)
    assert len({line.get_color() for line in lines}) == 12
    figure.canvas.draw()
    ticks = [tick.get_text() for tick in figure.axes[0].get_xticklabels()]
    assert "1" in ticks
    assert all(tick.isdigit() for tick in ticks), ticks  # whole epochs only


def test_a_legend_of_many_or_long_labels_shows_the_first_few_cut_short() -> None:
    """30 configurations, or a 200-character grid value, made a legend that crowded the axes
    out of the figure (matplotlib: "constrained_layout not applied")."""
    names = [f"{i:02d}-" + "x" * 200 for i in range(30)]
    runs = [
        Run(
            uuid.uuid4(),
            "succeeded",
            {"name": name, "seed": 0},
            None,
            10,
            epochs=np.array([1, 2]),
            val_loss=np.array([1.0, 0.5]),
            val_accuracy=np.array([0.5, 0.8]),
            gap=np.array([0.0, 0.1]),
        )
        for name in names
    ]
    figure = plots.figure_of("learning_curves", {"name": names, "seed": [0]}, runs)
    assert len(figure.axes[1].lines) == 30
    assert figure.axes[1].get_legend() is None  # beside the plots, not over them
    [legend] = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert len(labels) == plots.LEGEND_ENTRIES
    assert labels[0].startswith("name=00-")
    assert labels[0].endswith("…")
    assert all(len(label) == plots.LABEL_CHARS for label in labels)
    assert legend.get_title().get_text() == f"first {plots.LEGEND_ENTRIES} of 30"


def test_grid_text_with_dollar_signs_is_drawn_as_written(
    client: TestClient, session: Session
) -> None:
    """A legend label is matplotlib text, which reads "$...$" as mathtext: a grid value such
    as "$\\foo$" raised while drawing (a 500 on every plot of the study)."""
    grid = {"name": ["$\\foo$", "a $x^2$ b"], "seed": [0]}
    created = client.post("/v1/studies", json={"base": spec_payload(), "grid": grid}).json()
    for job in created["jobs"]:
        finish(session, job["id"])
        store_epochs(session, uuid.UUID(job["id"]), [(0.5, 0.1), (0.7, 0.2)])
    session.commit()
    response = client.get(f"/v1/studies/{created['id']}/plots/learning_curves.png")
    assert response.status_code == 200, response.text
    assert response.content.startswith(PNG_SIGNATURE)


def test_plots_group_runs_in_time_proportional_to_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each run was matched against each configuration: seconds per plot of a study of 1000
    configurations, the largest allowed."""
    names = [f"name-{i}" for i in range(300)]
    runs = [
        Run(uuid.uuid4(), "succeeded", {"name": name, "seed": 0}, None, 10, epochs=np.array([1]))
        for name in names
    ]
    calls = count_point_keys(monkeypatch, "app.core.studies.plots")
    groups = plots._groups({"name": names, "seed": [0]}, runs, ())
    assert [len(members) for _, members in groups] == [1] * len(names)
    assert calls[0] < 5 * len(runs)
