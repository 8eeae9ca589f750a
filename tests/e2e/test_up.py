"""Stopping `trainsvc up` (README's `make run`): every process ends, the running job waits queued.

A supervisor or `docker stop` sends SIGTERM to the `up` process alone; a terminal's Ctrl-C
sends SIGINT to its whole process group. Either way nothing of `up` may outlive it, and the job
it was training must be `queued` again at once, with no attempt counted as lost, so the next
`trainsvc up` resumes it.
"""

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from app.cli import _listen
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.models import Job, JobAttempt
from tests.e2e.walkthrough import SPEC
from tests.support.processes import Processes, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

FAST_CONTROL = {
    "TRAINSVC_HEARTBEAT_SECONDS": "0.5",
    "TRAINSVC_CONTROL_POLL_SECONDS": "0.2",
    "TRAINSVC_SWEEP_SECONDS": "0.5",
}


def _descendants(pid: int) -> set[int]:
    """Every process below `pid`, found through /proc (children of children included)."""
    found: set[int] = set()
    pending = [pid]
    while pending:
        parent = pending.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                children = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.add(child)
                    pending.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


def _start_long_job(
    processes: Processes,
) -> tuple[subprocess.Popen[bytes], str, set[int], str]:
    """`trainsvc up` training a long job; returns the up process, the job id, every pid and
    the API's URL."""
    processes.env.update(FAST_CONTROL)
    url = processes.api("up")
    up = processes.started[0][0]
    with httpx.Client(base_url=url, timeout=10) as client:
        # Small batches: hundreds of steps an epoch, so the job outlasts the test by far.
        dataset = {**SPEC["dataset"], "batch_size": 4}
        long_job = {**SPEC, "name": "long", "epochs": 500, "dataset": dataset}
        job_id = client.post("/v1/jobs", json=long_job).json()["id"]
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["epoch"] >= 1,
            60,
            "the long job to finish an epoch",
        )
    pids = {up.pid, *_descendants(up.pid)}
    assert len(pids) >= 3, pids  # up, the worker's main process and its pool process
    return up, job_id, pids, url


def _parent(pid: int) -> int:
    # /proc/<pid>/stat: "pid (name) state ppid ..."; the name may hold spaces, not ")".
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _assert_everything_stopped(up: subprocess.Popen[bytes], pids: set[int]) -> None:
    up.wait(timeout=30)
    wait_until(
        lambda: not [pid for pid in pids if _alive(pid)], 15, f"every process of up to end: {pids}"
    )


def _stored_job(workdir: Path, job_id: str) -> tuple[Job, list[JobAttempt]]:
    engine = create_db_engine(f"sqlite:///{workdir / 'trainsvc.db'}")
    try:
        with transaction(create_session_factory(engine)) as session:
            job = session.scalars(select(Job).where(Job.id == uuid.UUID(job_id))).one()
            attempts = list(session.scalars(select(JobAttempt).where(JobAttempt.job_id == job.id)))
            return job, attempts
    finally:
        engine.dispose()


def _assert_handed_back(workdir: Path, job_id: str) -> None:
    job, attempts = _stored_job(workdir, job_id)
    assert job.status == "queued", (job.status, [(a.attempt, a.outcome) for a in attempts])
    assert job.lease_owner is None
    assert [a.outcome for a in attempts] == ["handed_back"]


def test_sigterm_to_up_ends_every_process_and_hands_the_job_back(processes: Processes) -> None:
    up, job_id, pids, url = _start_long_job(processes)
    # A dashboard left open: its event stream would last event_stream_max_seconds (5 minutes),
    # and uvicorn stops only once every connection has closed.
    dashboard = _follow_events(url)
    up.send_signal(signal.SIGTERM)  # to `up` alone, as a supervisor or `docker stop` sends it
    _assert_everything_stopped(up, pids)
    _assert_handed_back(processes.workdir, job_id)
    dashboard.join(timeout=5)
    assert not dashboard.is_alive(), "the event stream outlived the API"


def _follow_events(url: str) -> threading.Thread:
    """A client following every job's events, as the dashboard does, in a thread; returned once
    its stream is open."""
    opened = threading.Event()

    def follow() -> None:
        with (
            httpx.Client(base_url=url, timeout=httpx.Timeout(10, read=None)) as client,
            client.stream("GET", "/v1/events") as response,
        ):
            assert response.status_code == 200
            opened.set()
            for _ in response.iter_lines():
                pass  # until the server ends the stream

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert opened.wait(10), "the event stream did not open"
    return follower


def test_ctrl_c_ends_every_process_and_the_next_up_resumes_the_job(
    processes: Processes,
) -> None:
    up, job_id, pids, _ = _start_long_job(processes)
    os.killpg(up.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    _assert_everything_stopped(up, pids)
    _assert_handed_back(processes.workdir, job_id)

    # The next `make run` picks it up at once, not after a lease or a republish interval.
    url = processes.api("up")
    with httpx.Client(base_url=url, timeout=10) as client:
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "running",
            30,
            "the next up to resume the handed-back job",
        )


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGQUIT])
def test_up_killed_outright_still_ends_its_worker_and_hands_the_job_back(
    processes: Processes, stop_signal: signal.Signals
) -> None:
    """`up` gone without stopping its worker (SIGKILL, the OOM-killer; SIGQUIT, Ctrl-\\): the
    worker is told by PR_SET_PDEATHSIG, once for each of `up`'s threads as they exit. Each
    SIGTERM after the first once made the worker's hand-back run again inside itself and wait
    for ever on a lock, leaving the worker and its pool running with no `up`."""
    up, job_id, pids, _ = _start_long_job(processes)
    up.send_signal(stop_signal)
    _assert_everything_stopped(up, pids)
    _assert_handed_back(processes.workdir, job_id)


def test_a_worker_told_to_stop_again_while_handing_back_still_stops(
    processes: Processes,
) -> None:
    """The same SIGTERMs in quick succession, sent to `up`'s worker itself, for a test that
    does not depend on how fast `up`'s threads exit."""
    up, job_id, pids, _ = _start_long_job(processes)
    [worker] = [pid for pid in pids if _parent(pid) == up.pid]  # the worker's main process
    for _ in range(20):
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGTERM)
        time.sleep(0.002)
    _assert_everything_stopped(up, pids)
    _assert_handed_back(processes.workdir, job_id)


def test_ctrl_c_twice_still_shuts_the_app_down_without_a_lifespan_traceback(
    processes: Processes,
) -> None:
    """The second Ctrl-C while a request still runs forces uvicorn's exit, which skipped the
    app's shutdown (its pools were never closed) and left it to be cancelled at the event
    loop's end: a CancelledError traceback from the lifespan on the terminal."""
    url = processes.api("up")
    up, log = processes.started[0]
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as held:
        # A request whose body has not all arrived: the first Ctrl-C waits for it.
        held.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        time.sleep(0.2)
        os.killpg(up.pid, signal.SIGINT)
        wait_until(lambda: b"Waiting for connections to close" in log.read_bytes(), 10, "a stop")
        os.killpg(up.pid, signal.SIGINT)
        up.wait(timeout=30)
    output = log.read_text(errors="replace")
    assert "Application shutdown complete" in output, output
    # The request itself is cancelled, and uvicorn logs that as at its graceful timeout; the
    # app's lifespan, cancelled the same way, added a second traceback.
    assert "in lifespan" not in output, output


@pytest.mark.parametrize("where", ["port in use", "unknown host"])
def test_an_address_up_cannot_listen_on_is_a_line_and_starts_no_worker(
    where: str, processes: Processes
) -> None:
    """Before: uvicorn's log line (`[Errno -2] Name or service not known`, naming no host) and
    exit status 3, after `up` had started its worker only to stop it again."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        host = "127.0.0.1" if where == "port in use" else "nohost.invalid"
        up = processes.start(
            "up",
            "--host",
            host,
            "--port",
            str(port),
            env={"TRAINSVC_ALLOW_UNAUTHENTICATED_NETWORK": "true"},  # lets a non-loopback host by
        )
        assert up.wait(timeout=60) == 1
    output = processes.started[-1][1].read_text(errors="replace")
    reason = "Address already in use" if where == "port in use" else "Name or service not known"
    assert output.strip().splitlines()[-1] == f"cannot listen on {host}:{port}: {reason}"
    assert "celery" not in output.lower()  # no worker was started
    assert not list(processes.workdir.glob("trainsvc*.db"))  # nor the database made


def test_a_host_name_is_listened_on_as_ipv4_as_uvicorn_did(monkeypatch: pytest.MonkeyPatch) -> None:
    """Debian's /etc/hosts gives localhost ::1 as well, and getaddrinfo puts ::1 first: `serve
    --host localhost` listened on [::1] alone, where uvicorn's own bind had taken 127.0.0.1,
    the address the client commands and the API image's health check use."""
    resolve = socket.getaddrinfo

    def ipv6_first(host: str, port: int, family: int = 0, *args: Any, **kwargs: Any) -> Any:
        found = resolve(host, port, family, *args, **kwargs)
        if host == "localhost" and family == socket.AF_UNSPEC:
            return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)), *found]
        return found

    monkeypatch.setattr(socket, "getaddrinfo", ipv6_first)
    with _listen("localhost", 0) as listening:
        assert listening.getsockname()[0] == "127.0.0.1"
    with _listen("::1", 0) as listening:  # an IPv6 address is still one
        assert listening.getsockname()[0] == "::1"
