"""A throw-away `trainsvc up` for the benchmarks that drive the service over HTTP.

Embedded SQLite database and broker in a temporary folder, auth off (as `up` always is),
stopped with SIGTERM when the `with` block ends, however it ends, so that no process
outlives the script that started it.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

STARTUP_SECONDS = 180  # migrations and imports on a busy shared machine
STOP_SECONDS = 90


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.contextmanager
def embedded_service(concurrency: int, log_name: str = "trainsvc-up.log") -> Iterator[str]:
    """Start `trainsvc up` with a worker of `concurrency` processes; yield its base URL."""
    with tempfile.TemporaryDirectory(prefix="trainsvc-bench-") as folder:
        port = _free_port()
        env = {
            **os.environ,
            "TRAINSVC_DATABASE_URL": f"sqlite:///{folder}/trainsvc.db",
            "TRAINSVC_BROKER_URL": f"sqla+sqlite:///{folder}/trainsvc-broker.db",
            "TRAINSVC_WORKER_CONCURRENCY": str(concurrency),
            "TRAINSVC_LOG_FORMAT": "json",
            # All the presets are submitted at once (about 150 jobs): over the default 100.
            "TRAINSVC_TENANT_MAX_ACTIVE_JOBS": "1000",
            # One thread per training process: more than one per core made an epoch 80x slower.
            "OMP_NUM_THREADS": "1",
        }
        log_path = Path(folder) / log_name
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "app.cli", "up", "--port", str(port)],
                cwd=folder,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_until_ready(url, process, log_path)
                yield url
            finally:
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
                    try:
                        process.wait(timeout=STOP_SECONDS)
                    except subprocess.TimeoutExpired:
                        process.kill()
                        process.wait()


def _wait_until_ready(url: str, process: "subprocess.Popen[bytes]", log_path: Path) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"trainsvc up exited ({process.returncode}):\n{log_path.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    sys.exit(f"trainsvc up did not answer within {STARTUP_SECONDS} s")


def api_headers() -> dict[str, str]:
    """The key a --url service wants, from TRAINSVC_API_KEY, as `trainsvc submit` sends it."""
    key = os.environ.get("TRAINSVC_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}
