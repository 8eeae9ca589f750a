"""Real service processes for end-to-end tests: `trainsvc up`, or `serve` and `worker` apart."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Poll `predicate` until it returns something truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Service:
    """Processes started from the `trainsvc` command, stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        # Only what the test names: a developer's own TRAINSVC_* variables must not leak in.
        inherited = {k: v for k, v in os.environ.items() if not k.startswith("TRAINSVC_")}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **env}
        self.processes: list[tuple[subprocess.Popen[bytes], Path]] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{args[0]}-{len(self.processes)}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", *args],
            cwd=self.workdir,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # so a stop reaches the whole process group (pool children)
        )
        self.processes.append((process, log))
        return process

    def serve(self, command: str = "serve") -> None:
        self.start(command, "--port", str(self.port))
        wait_until(self._healthy, 60, f"the API on {self.url}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/v1/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def logs(self) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}"
            for _, log in self.processes
        )

    def stop(self) -> None:
        for process, _ in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process, _ in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@pytest.fixture
def service_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[dict[str, str]], Service]]:
    services: list[Service] = []

    def make(env: dict[str, str]) -> Service:
        service = Service(tmp_path, env)
        services.append(service)
        return service

    yield make
    report = getattr(request.node, "rep_call", None)
    for service in services:
        service.stop()
        if report is not None and report.failed:
            print(service.logs())  # pytest shows it beside the failure


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    # Lets the fixture above print the processes' logs when a test failed.
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    setattr(item, f"rep_{report.when}", report)
