"""Issue 10's "done when": a job followed with `trainsvc jobs watch` and with Client.wait reports
every epoch exactly once and the final status, also when the API is restarted in the middle.

Real processes: `trainsvc serve` and `trainsvc worker` on a SQLite database in a temporary
folder; the API is SIGKILLed mid-job and started again on the same port.
"""

import json
import signal
import subprocess
import sys
import threading

import httpx
import pytest
from trainsvc_client import Client, Job, ServerSentEvent

from tests.faults.conftest import slow_spec
from tests.support.processes import Processes, free_port, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

EPOCHS = 8


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_followers_see_every_epoch_once_across_an_api_restart(processes: Processes) -> None:
    processes.env.update(TRAINSVC_HEARTBEAT_SECONDS="0.5", TRAINSVC_SWEEP_SECONDS="0.5")
    assert processes.start("migrate").wait(timeout=120) == 0
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    api = processes.start("serve", "--port", str(port))
    wait_until(lambda: _healthy(url), 60, "the API")
    processes.worker()

    with Client(url) as client:
        job_id = client.submit(slow_spec(epochs=EPOCHS)).id

    # Follower 1: the CLI, as a person runs it.
    watch_out = processes.workdir / "watch.out"
    watch_err = processes.workdir / "watch.err"
    with watch_out.open("wb") as out, watch_err.open("wb") as err:
        watch = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "jobs", "watch", str(job_id), "--url", url],
            cwd=processes.workdir,
            env=processes.env,
            stdout=out,
            stderr=err,
        )
    # Follower 2: the client's wait, as a service runs it.
    seen: list[ServerSentEvent] = []
    waited: list[Job | BaseException] = []

    def wait() -> None:
        try:
            with Client(url, timeout=10) as follower:
                waited.append(follower.wait(job_id, timeout=240, on_event=seen.append))
        except BaseException as exc:
            waited.append(exc)

    follower = threading.Thread(target=wait, daemon=True)
    follower.start()

    try:
        wait_until(lambda: _epochs(seen), 120, "the first epoch to be followed")
        progress = httpx.get(f"{url}/v1/jobs/{job_id}", timeout=5).json()["progress"]["epoch"]
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=30)
        assert 1 <= progress < EPOCHS - 1  # the restart falls in the middle of the job
        processes.start("serve", "--port", str(port))
        wait_until(lambda: _healthy(url), 60, "the API to be back")

        follower.join(timeout=240)
        assert watch.wait(timeout=120) == 0, watch_err.read_text(errors="replace")[-3000:]
    finally:
        if watch.poll() is None:
            watch.kill()
            watch.wait()

    [result] = waited
    assert isinstance(result, Job), result
    assert result.status == "succeeded"
    assert _epochs(seen) == list(range(1, EPOCHS + 1))
    statuses = [json.loads(e.data)["status"] for e in seen if e.event == "status"]
    assert statuses[-1] == "succeeded"
    assert len([e.id for e in seen]) == len({e.id for e in seen})  # no event twice

    lines = watch_out.read_text().splitlines()
    rows = [line.split() for line in lines[1:] if line.split() and line.split()[0].isdigit()]
    assert [int(row[0]) for row in rows] == list(range(1, EPOCHS + 1))
    assert all(len(row) == 6 for row in rows), rows  # epoch, 4 figures, status
    assert lines[-1] == f"job {job_id} succeeded"
    assert "epoch" in watch_err.read_text(errors="replace")  # tqdm's bar


def _epochs(events: list[ServerSentEvent]) -> list[int]:
    return [json.loads(e.data)["epoch"] for e in list(events) if e.event == "epoch"]
