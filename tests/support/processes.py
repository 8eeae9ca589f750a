"""Real trainsvc processes for multi-process tests: API and workers, stopped however a test ends.

Each process runs in a session of its own, so a signal can reach the main process alone (as
`docker stop` does) or the whole group; at the end every group still alive is SIGKILLed.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """Poll `predicate` until it returns something truthy; raise naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Processes:
    """Starts `python -m app.cli ...` processes with one environment; `stop_all` ends them all."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        # Only what the test names: a developer's own TRAINSVC_* variables must not leak in.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSVC_")}
        # Auth off (on loopback): these tests are about processes; keys have their own tests.
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", "TRAINSVC_AUTH": "off", **env}
        self.started: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        preexec: Callable[[], None] | None = None,
    ) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{args[0]}-{len(self.started)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=self.workdir,
            env={**self.env, **(env or {})},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=preexec,
        )
        self.started.append((process, log))
        return process

    def migrate(self) -> None:
        """Bring the environment's database to the latest schema, as `serve` and `worker` need."""
        subprocess.run(
            [sys.executable, "-m", "app.cli", "migrate"],
            check=True,
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
        )

    def worker(self, env: dict[str, str] | None = None) -> "Worker":
        process = self.start("worker", "--concurrency", "1", env=env)
        worker = Worker(process, self.started[-1][1])
        # Celery logs "ready" once its pool has started; before that, the main process's
        # children may include the short-lived `uname -p` its banner runs (platform.platform()).
        wait_until(lambda: " ready." in worker.log.read_text(errors="replace"), 60, "the worker")
        wait_until(worker.pool_child, 60, "the worker's pool process")
        return worker

    def api(self, command: str = "serve") -> str:
        """Start the API (`serve`, or `up` for API and worker together); returns its URL."""
        port = free_port()
        # `serve` needs keys unless told otherwise: these tests are about processes, and keys
        # have tests of their own. `up` is left alone, as it must work without keys by itself.
        auth = (
            {"TRAINSVC_AUTH": "off"}
            if command == "serve" and "TRAINSVC_AUTH" not in self.env
            else {}
        )
        process = self.start(command, "--port", str(port), env=auth)
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            if process.poll() is not None:  # it refused to start: say why now, not in a minute
                log = self.started[-1][1].read_text(errors="replace")[-2000:]
                raise AssertionError(f"`{command}` exited ({process.returncode}):\n{log}")
            return _healthy(url)

        wait_until(up, 60, f"the API on {url}")
        return url

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-6000:]}" for _, log in self.started
        )

    def stop_all(self) -> None:
        """SIGKILL everything each started process began, in its session: `up`'s worker has a
        process group of its own, and may outlive an `up` that has already exited; a test
        must not leave it running, whatever the process under test did."""
        for process, _ in self.started:
            for pid in _session(process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for process, _ in self.started:
            process.wait(timeout=30)


class Worker:
    """A `trainsvc worker --concurrency 1`: its main process and its one pool process."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def pool_child(self) -> int | None:
        """The pool process: a live child forked from the main process (so with its command
        line), not some other child such as a subprocess the main process runs."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        for child in children:
            try:
                alive = "VmSize:" in Path(f"/proc/{child}/status").read_text()
                forked = Path(f"/proc/{child}/cmdline").read_bytes() == command
            except OSError:
                continue  # ended meanwhile
            if alive and forked:
                return int(child)
        return None

    def kill(self) -> None:
        """SIGKILL the whole worker, pool process included: a crash, an OOM-killer, a lost VM."""
        _signal_group(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self) -> None:
        """SIGTERM to the main process only, as `docker stop` and Kubernetes send it."""
        self.process.send_signal(signal.SIGTERM)


def _session(session_id: int) -> list[int]:
    """The processes of a session (its leader's pid: each started process leads its own)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # pid (comm) state ppid pgrp session ...: comm may hold spaces, so split after it.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == session_id:
            members.append(int(stat.parent.name))
    return members


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/v1/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
