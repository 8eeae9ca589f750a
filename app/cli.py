"""The `trainsvc` command: serve the API, run a worker, migrate, start both, submit a job."""

import argparse
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from app.core.config import get_settings

if TYPE_CHECKING:
    import uvicorn


def _server(args: argparse.Namespace) -> "uvicorn.Server":
    import uvicorn

    from app.api.main import create_app

    config = uvicorn.Config(
        create_app(get_settings()), host=args.host, port=args.port, log_level="info"
    )
    return uvicorn.Server(config)


def _serve(args: argparse.Namespace) -> None:
    _server(args).run()


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker  # the worker, and torch with it, only in this process

    run_worker(get_settings(), concurrency=args.concurrency, loglevel=args.loglevel)


def _migrate(_args: argparse.Namespace) -> None:
    from app.core.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest schema")


# How long `up` waits for its worker to hand a running job back (a batch and one write).
WORKER_STOP_SECONDS = 60
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _up(args: argparse.Namespace) -> None:
    """The embedded default in one command: migrate, then a worker process and the API.

    Both are supervised here: a stop signal (Ctrl-C, SIGTERM, a closed terminal) or either
    one ending stops the other, and `up` returns only once the worker, pool included, is gone.
    """
    from app.core.migrate import upgrade

    upgrade(get_settings().database_url)
    server = _server(args)

    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    # uvicorn puts its own handlers in place while it serves, and on its way out restores
    # these and raises the signal it caught again: with Python's default SIGTERM action that
    # would end `up` right there and orphan the worker. These handlers make it a no-op.
    for stop_signal in STOP_SIGNALS:
        signal.signal(stop_signal, stop)
    # Its own process group: a terminal's Ctrl-C reaches `up` alone, which stops the worker
    # with one SIGTERM (a second signal, SIGINT, would make Celery's shutdown a cold one).
    worker = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker"],
        process_group=0,
        preexec_fn=_stop_with_parent,
    )
    worker_ended = threading.Event()

    def supervise() -> None:
        worker.wait()
        worker_ended.set()
        server.should_exit = True

    threading.Thread(target=supervise, name="worker-supervisor", daemon=True).start()
    try:
        server.run()
    finally:
        worker_died = worker_ended.is_set()  # on its own, before `up` was asked to stop
        _stop_worker(worker)
    if worker_died:
        sys.exit(f"the worker exited with status {worker.returncode}; the API stopped with it")


def _stop_worker(worker: "subprocess.Popen[bytes]") -> None:
    """SIGTERM: the worker hands its running job back to the queue and exits (warm shutdown)."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=WORKER_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            print("the worker did not stop in time; killing it", file=sys.stderr)
    # Whatever is left of its process group (a pool process) goes with it.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()


def _stop_with_parent() -> None:
    """In the worker, before exec: SIGTERM it if `up` dies without stopping it (SIGKILL)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _submit(args: argparse.Namespace) -> None:
    import httpx
    from tqdm import tqdm

    spec = json.loads(Path(args.spec).read_text())
    with httpx.Client(base_url=args.url, timeout=30) as client:
        response = client.post("/v1/jobs", json=spec)
        if response.status_code >= 400:
            sys.exit(f"submit failed ({response.status_code}): {response.text}")
        job = response.json()
        print(f"job {job['id']} {job['status']}")
        if not args.wait:
            return
        job = _wait(client, job, tqdm)
    print(
        json.dumps(
            {"status": job["status"], "summary": job["summary"], "error": job["error"]}, indent=2
        )
    )
    if job["status"] != "succeeded":
        sys.exit(1)


def _wait(client: Any, job: dict[str, Any], tqdm: Any) -> dict[str, Any]:
    with tqdm(total=job["progress"]["epochs"], unit="epoch", desc=job["name"] or "training") as bar:
        while job["status"] in ("queued", "running"):
            time.sleep(1)
            job = client.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
            bar.update(job["progress"]["epoch"] - bar.n)
            bar.set_postfix(status=job["status"])
    return job


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainsvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def server_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=int, default=8000)

    serve = commands.add_parser("serve", help="run the HTTP API")
    server_options(serve)
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a Celery worker (one process per GPU)")
    worker.add_argument("--concurrency", type=int, default=None)
    worker.add_argument("--loglevel", default="INFO")
    worker.set_defaults(handler=_worker)

    migrate = commands.add_parser("migrate", help="bring the database schema up to date")
    migrate.set_defaults(handler=_migrate)

    up = commands.add_parser("up", help="migrate, then run the API and one worker together")
    server_options(up)
    up.set_defaults(handler=_up)

    submit = commands.add_parser("submit", help="submit a job spec (JSON file)")
    submit.add_argument("spec")
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    submit.add_argument("--url", default="http://127.0.0.1:8000")
    submit.set_defaults(handler=_submit)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
