"""The `trainsvc` command: serve the API, run a worker, migrate, start both, submit a job."""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.core.config import get_settings
from app.core.observability.logs import configure_logging
from app.core.observability.multiprocess import share_metrics_between_processes


def _serve(args: argparse.Namespace) -> None:
    from app.api.main import create_app
    from app.api.server import run_server

    configure_logging(get_settings())
    run_server(create_app(get_settings()), args.host, args.port, get_settings())


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker  # the worker, and torch with it, only in this process

    configure_logging(get_settings())
    run_worker(get_settings(), concurrency=args.concurrency, loglevel=args.loglevel)


def _migrate(_args: argparse.Namespace) -> None:
    from app.core.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest schema")


def _up(args: argparse.Namespace) -> None:
    """The embedded default in one command: migrate, then a worker process and the API."""
    from app.core.migrate import upgrade

    upgrade(get_settings().database_url)
    share_metrics_between_processes()  # before the worker starts: it inherits the directory
    worker = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"])
    try:
        _serve(args)  # returns on Ctrl-C or SIGTERM, after uvicorn's own graceful shutdown
    finally:
        # SIGTERM asks the worker to hand its running job back and exit (warm shutdown).
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()


def _doctor(args: argparse.Namespace) -> None:
    from app.core.observability.doctor import report, run_checks

    checks = run_checks(get_settings(), host=args.host)
    print(report(checks))
    if any(check.outcome == "fail" for check in checks):
        sys.exit(1)


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

    doctor = commands.add_parser(
        "doctor", help="check the database, broker, workers, GPUs and auth; say how to fix"
    )
    doctor.add_argument("--host", default=None, help="the address the API will listen on")
    doctor.set_defaults(handler=_doctor)

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
