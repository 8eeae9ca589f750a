"""`trainsvc jobs list|show|watch|cancel|metrics`, through trainsvc_client, against the API
in-process (the test's rolled-back transaction)."""

import csv
import io
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from app import cli
from app.api.main import create_app
from app.cli import main
from app.core import lifecycle
from app.core.config import Settings, get_settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.migrate import upgrade
from tests.api.test_events import METRICS
from tests.factories import spec_payload
from tests.studies.test_report import store_epochs
from tests.support.documented import documented_client


@pytest.fixture
def api(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> TestClient:
    """The CLI's client reaches the test's app, with the test client's key."""
    monkeypatch.setattr(cli, "CLIENT_TRANSPORT", client._transport)
    key = client.headers["Authorization"].removeprefix("Bearer ")
    monkeypatch.setattr(cli, "get_settings", lambda: Settings(api_key=key))
    return client


def submit(api: TestClient, name: str) -> dict[str, Any]:
    response = api.post("/v1/jobs", json=spec_payload(name=name, epochs=2))
    assert response.status_code == 201, response.text
    job: dict[str, Any] = response.json()
    return job


def run(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    main(list(args))
    return capsys.readouterr().out


def test_list_show_and_cancel(api: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    first, second = submit(api, "first"), submit(api, "second")

    out = run(capsys, "jobs", "cancel", first["id"])
    assert out == f"job {first['id']} cancelled\n"

    listed = run(capsys, "jobs", "list").splitlines()
    assert listed[0].split() == ["id", "name", "status", "progress", "pack", "created"]
    assert [line.split()[:5] for line in listed[1:]] == [
        [second["id"], "second", "queued", "0/2", "-"],  # no pack: neither trained
        [first["id"], "first", "cancelled", "0/2", "-"],
    ]
    cancelled = run(capsys, "jobs", "list", "--status", "cancelled").splitlines()
    assert [line.split()[0] for line in cancelled[1:]] == [first["id"]]

    shown = json.loads(run(capsys, "jobs", "show", second["id"]))
    assert (shown["id"], shown["status"], shown["spec"]["name"]) == (
        second["id"],
        "queued",
        "second",
    )

    # An error prints the API's status, code and message, and exits non-zero.
    missing = uuid.uuid4()
    with pytest.raises(SystemExit, match=rf"show failed \(404\) job_not_found: no job .*{missing}"):
        main(["jobs", "show", str(missing)])


def test_metrics_as_a_table_and_as_csv(
    api: TestClient, session: Session, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = submit(api, "curves")
    store_epochs(session, uuid.UUID(job["id"]), [(0.6, 0.1), (0.8, 0.2)])
    session.commit()

    table = run(capsys, "jobs", "metrics", job["id"]).splitlines()
    assert table[0].split() == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr"]
    assert table[2].split() == ["2", "1.0000", "0.5000", "0.2000", "0.8000", "0.1000"]

    rows = list(csv.DictReader(io.StringIO(run(capsys, "jobs", "metrics", job["id"], "--csv"))))
    assert [row["epoch"] for row in rows] == ["1", "2"]
    assert (rows[1]["val_accuracy"], rows[1]["generalization_gap"]) == ("0.8", "0.2")
    assert "layers" not in rows[0]  # per-layer lists stay in the API's JSON

    path = tmp_path / "metrics.csv"
    assert run(capsys, "jobs", "metrics", job["id"], "--csv", str(path)) == (
        f"2 epochs written to {path}\n"
    )
    assert list(csv.DictReader(path.open())) == rows


def test_watch_prints_each_epoch_and_the_final_status(
    tmp_path: Path,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Committed rows, as a worker in another process commits them: the event streams read
    # them through connections of their own.
    url = f"sqlite:///{tmp_path / 'watch.db'}"
    upgrade(url)
    engine = create_db_engine(url)
    factory = create_session_factory(engine)
    settings = Settings(database_url=url, broker_url=redis_url, event_poll_seconds=0.05, auth="off")
    with documented_client(create_app(settings)) as client:
        monkeypatch.setattr(cli, "CLIENT_TRANSPORT", client._transport)
        monkeypatch.setattr(cli, "get_settings", lambda: settings)
        job_id = uuid.UUID(submit(client, "watched")["id"])
        with transaction(factory) as session:
            claim = lifecycle.claim(session, job_id, "node@host#1", 30)
        assert claim is not None
        for epoch, accuracy in ((1, 0.5), (2, 0.75)):
            metrics = {**METRICS, "val_accuracy": accuracy}
            with transaction(factory) as session:
                lifecycle.record_epoch(session, job_id, claim.attempt, epoch, metrics, {}, [], 30)
        with transaction(factory) as session:
            lifecycle.finish(
                session,
                job_id,
                claim.attempt,
                "failed",
                error_type="diverged",
                error_message="loss is NaN",
            )

        with pytest.raises(SystemExit) as exited:
            main(["jobs", "watch", str(job_id)])
    engine.dispose()
    assert exited.value.code == 1  # the job did not succeed
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "status"]
    assert [line.split() for line in lines[1:-1]] == [
        ["1", "1.0000", "0.5000", "1.1000", "0.5000", "running"],
        ["2", "1.0000", "0.5000", "1.1000", "0.7500", "running"],
    ]
    assert lines[-1] == f"job {job_id} failed (diverged: loss is NaN)"


@pytest.mark.parametrize("command", [["submit"], ["study", "create"]])
def test_a_file_that_cannot_be_read_is_named_with_why_and_nothing_is_sent(
    api: TestClient, command: list[str], tmp_path: Path
) -> None:
    before = api.get("/v1/jobs").json()["items"]
    broken = tmp_path / "broken.json"
    broken.write_text('{"name": "x",\n "epochs": }')
    latin = tmp_path / "latin.json"
    latin.write_bytes(b'{"name": "caf\xe9"}')
    missing = tmp_path / "missing.json"
    for path, reason in [
        (missing, f"cannot read {missing}: No such file or directory"),
        (tmp_path, f"cannot read {tmp_path}: Is a directory"),
        (broken, f"{broken} is not JSON: Expecting value at line 2, column 12"),
        (latin, f"cannot read {latin}: not UTF-8 text"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main([*command, str(path)])
        assert exited.value.code == reason  # printed on stderr, exit status 1; no traceback
    assert api.get("/v1/jobs").json()["items"] == before


def test_list_shows_at_most_limit_jobs(api: TestClient, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = [submit(api, name) for name in ("one", "two", "three")]
    listed = run(capsys, "jobs", "list", "--limit", "2").splitlines()
    assert [line.split()[0] for line in listed[1:]] == [jobs[2]["id"], jobs[1]["id"]]


STUDY = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["jobs", "show", "a\tb"], "argument id: invalid UUID value: 'a\\tb'"),
        (["jobs", "show", "../studies"], "argument id: invalid UUID value: '../studies'"),
        (["jobs", "cancel", f"../studies/{STUDY}"], "argument id: invalid UUID value"),
        (["jobs", "watch", "not-a-job"], "argument id: invalid UUID value: 'not-a-job'"),
        (["jobs", "metrics", "not-a-job", "--csv"], "argument id: invalid UUID value"),
        (["jobs", "list", "--study", "not-a-study"], "argument --study: invalid UUID value"),
        (["jobs", "list", "--limit", "-5"], "argument --limit: '-5' is not a number of jobs"),
        (["jobs", "list", "--limit", "0"], "argument --limit: '0' is not a number of jobs"),
        (["jobs", "list", "--limit", "9" * 23], "is not a number of jobs (1 to 1000000)"),
        (["jobs", "list", "--limit", "ten"], "argument --limit: 'ten' is not a number of jobs"),
        (["keys", "revoke", "not-a-key"], "argument id: invalid UUID value: 'not-a-key'"),
        (["jobs", "list", "--url", "http://[::1"], "argument --url: 'http://[::1' is not an http"),
        (["submit", "x.json", "--url", "localhost:8000"], "'localhost:8000' is not an http://"),
        (["study", "report", STUDY, "--url", "ftp://h"], "argument --url: 'ftp://h' is not an"),
    ],
)
def test_an_id_or_limit_that_is_not_one_is_a_usage_error_and_nothing_is_sent(
    api: TestClient, capsys: pytest.CaptureFixture[str], args: list[str], complaint: str
) -> None:
    submit(api, "untouched")
    before = api.get("/v1/jobs").json()["items"]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2  # argparse: usage, then the complaint, on stderr
    printed = capsys.readouterr()
    assert printed.out == ""
    assert printed.err.startswith("usage: trainsvc ")
    assert complaint in printed.err
    assert "Traceback" not in printed.err
    assert api.get("/v1/jobs").json()["items"] == before  # nothing cancelled


def test_metrics_csv_to_a_path_that_cannot_be_written_says_why(
    api: TestClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = submit(api, "curves")
    missing = tmp_path / "no" / "such" / "dir" / "metrics.csv"
    for path, reason in [
        (missing, f"cannot write {missing}: No such file or directory"),
        (tmp_path, f"cannot write {tmp_path}: Is a directory"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(["jobs", "metrics", job["id"], "--csv", str(path)])
        assert exited.value.code == reason  # printed on stderr, exit status 1; no traceback
    assert capsys.readouterr().out == ""
    assert not missing.parent.exists()


# A CLI whose API answers every metrics request with many epochs, more than a pipe holds.
MANY_EPOCHS = """
import sys, httpx
from app import cli
epoch = {"train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.1, "val_accuracy": 0.5,
         "lr": 0.1, "epoch_seconds": 1.0}
epochs = [{**epoch, "epoch": n} for n in range(1, 20001)]
cli.CLIENT_TRANSPORT = httpx.MockTransport(lambda _: httpx.Response(200, json={"epochs": epochs}))
cli.main(sys.argv[1:])
"""


def test_a_reader_that_stops_early_ends_the_command_quietly(repo_root: Path) -> None:
    """`trainsvc jobs metrics ID --csv | head -2` printed a BrokenPipeError traceback."""
    command = [sys.executable, "-c", MANY_EPOCHS, "jobs", "metrics", str(uuid.uuid4()), "--csv"]
    with subprocess.Popen(
        command,
        cwd=repo_root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={k: v for k, v in os.environ.items() if not k.startswith("TRAINSVC_")},
        text=True,
    ) as cli_process:
        assert cli_process.stdout is not None
        assert cli_process.stderr is not None
        head = [cli_process.stdout.readline() for _ in range(2)]
        cli_process.stdout.close()  # as `head -2` does once it has its lines
        errors = cli_process.stderr.read()
        status = cli_process.wait(timeout=60)
    assert head == [
        "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,epoch_seconds\n",
        "1,1.0,0.5,1.1,0.5,0.1,1.0\n",
    ]
    assert errors == ""
    assert status == 141  # 128 + SIGPIPE, as a shell reports `cat` ended by a closed pipe


@pytest.fixture
def answering(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Point the CLI's client at a handler standing in for the API (or what is at --url)."""

    def point(handler: Any) -> None:
        monkeypatch.setattr(cli, "CLIENT_TRANSPORT", httpx.MockTransport(handler))
        monkeypatch.setattr(cli, "get_settings", lambda: Settings())

    return point


def test_ctrl_c_ends_a_client_command_with_a_line_not_a_traceback(
    answering: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(_request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    answering(interrupted)
    with pytest.raises(SystemExit) as exited:  # was the KeyboardInterrupt, with a traceback
        main(["jobs", "watch", str(uuid.uuid4())])
    assert exited.value.code == 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
    assert capsys.readouterr().err == "\nwatch interrupted\n"


def test_an_answer_that_is_not_the_apis_is_one_line(answering: Any) -> None:
    answering(lambda _: httpx.Response(200, headers={"Content-Type": "text/html"}, text="<html>"))
    job_id = uuid.uuid4()
    with pytest.raises(SystemExit) as exited:
        main(["jobs", "show", str(job_id)])
    assert exited.value.code == (
        f"show failed: GET /v1/jobs/{job_id} answered 200 with a text/html body, not JSON; "
        "is http://127.0.0.1:8000 a trainsvc API?"
    )


@pytest.mark.parametrize("command", [["migrate"], ["up", "--port", "0"]])
def test_ctrl_c_during_start_up_is_a_line_not_a_traceback(
    command: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C while `migrate` or `up` imports or migrates, before `up` has handlers of its
    own: was a KeyboardInterrupt traceback from wherever the import or migration was."""

    def interrupted(_database_url: str) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("app.core.migrate.upgrade", interrupted)
    monkeypatch.chdir(tmp_path)
    for name, value in cli.EMBEDDED.items():  # what `up` sets, put back after the test
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exited:
            main(command)
    finally:
        get_settings.cache_clear()
    assert exited.value.code == 130
    assert capsys.readouterr().err.endswith("\ninterrupted\n")
