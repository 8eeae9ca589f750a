"""trainsvc study create / report, against the API in-process."""

import json
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import cli
from app.cli import main
from app.core.config import Settings
from tests.factories import spec_payload
from tests.studies.test_report import finish, store_epochs


@pytest.fixture
def cli_talks_to(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The CLI's client reaches the test's app (and its rolled-back transaction), with its key."""
    monkeypatch.setattr(cli, "CLIENT_TRANSPORT", client._transport)
    key = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(cli, "get_settings", lambda: Settings(api_key=key))
    return client


def test_study_create_then_report_with_csv(
    cli_talks_to: TestClient,
    session: Session,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    grid_file = tmp_path / "grid.json"
    body = {
        "name": "cli",
        "base": spec_payload(),
        "grid": {"model.normalization.type": ["none", "batch_norm"], "seed": [0, 1]},
    }
    grid_file.write_text(json.dumps(body))
    main(["study", "create", str(grid_file)])
    out = capsys.readouterr().out
    assert out.endswith(": 4 jobs\n")
    study_id = out.split()[1].rstrip(":")
    study = cli_talks_to.get(f"/v1/studies/{study_id}").json()
    pack = uuid.uuid4()
    for job in study["jobs"]:
        finished = finish(session, job["id"])
        base = 0.9 if job["grid_point"]["model.normalization.type"] == "batch_norm" else 0.6
        if base == 0.9:
            finished.pack = pack  # the batch-norm seeds trained together
        store_epochs(session, uuid.UUID(job["id"]), [(base, 0.1), (base + 0.05, 0.2)])
    session.commit()

    csv_path = tmp_path / "table.csv"
    main(["study", "report", study_id, "--csv", str(csv_path)])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "model.normalization.type",
        "n",
        "best_val_acc",
        "gap_final",
        "epochs_to_target",
        "diverged",
        "s_per_epoch",
        "packed",
    ]
    assert lines[1].split()[:3] == ['"none"', "2", "0.650±0.000"]
    assert lines[2].split()[:3] == ['"batch_norm"', "2", "0.950±0.000"]
    assert lines[1].split()[-2:] == ["0.750±0.000", "0"]  # epochs of 0.5 s and 1.0 s
    assert lines[2].split()[-2:] == ["0.750±0.000", "2"]
    assert "2 of the 4 succeeded jobs trained in packs" in out
    assert (
        "too few pairs to judge batch_norm on best val accuracy (n=2; it takes 4): "
        "+30 percentage points on average"
    ) in out
    assert csv_path.read_text().startswith("model.normalization.type,jobs,succeeded")


def test_a_report_with_no_succeeded_job_says_so_and_where_to_look(
    cli_talks_to: TestClient, session: Session, capsys: pytest.CaptureFixture[str]
) -> None:
    """It printed "target val accuracy: None" and nothing of the two failures."""
    body = {"base": spec_payload(), "grid": {"seed": [0, 1]}}
    study = cli_talks_to.post("/v1/studies", json=body).json()
    for job in study["jobs"]:
        finish(session, job["id"], "failed", "error")
    session.commit()
    main(["study", "report", study["id"]])
    out = capsys.readouterr().out
    assert "\ntarget val accuracy: none (no job has succeeded)\n" in out
    assert (
        f"2 jobs failed; `trainsvc jobs list --study {study['id']} --status failed` lists them"
        in out
    )


def test_study_create_reports_a_422(cli_talks_to: TestClient, tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.json"
    grid_file.write_text(json.dumps({"base": spec_payload(), "grid": {"colour": [1]}}))
    with pytest.raises(SystemExit, match=r"study failed \(422\).*grid\.colour"):
        main(["study", "create", str(grid_file)])


def test_report_csv_to_a_path_that_cannot_be_written_says_why(
    cli_talks_to: TestClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    study = cli_talks_to.post("/v1/studies", json={"base": spec_payload(), "grid": {"seed": [0]}})
    assert study.status_code == 201, study.text
    missing = tmp_path / "no" / "such" / "dir" / "table.csv"
    for path, reason in [
        (missing, f"cannot write {missing}: No such file or directory"),
        (tmp_path, f"cannot write {tmp_path}: Is a directory"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["study", "report", study.json()["id"], "--csv", str(path)])
        assert exited.value.code == reason  # printed on stderr, exit status 1; no traceback
    assert capsys.readouterr().out == ""
    assert not missing.parent.exists()


@pytest.mark.parametrize("study_id", ["../jobs", "a\tb", "not-a-study"])
def test_report_of_an_id_that_is_not_a_uuid_is_a_usage_error(
    study_id: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["study", "report", study_id])
    assert exited.value.code == 2
    printed = capsys.readouterr()
    assert printed.out == ""
    assert f"argument study_id: invalid UUID value: {study_id!r}" in printed.err
