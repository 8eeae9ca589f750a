"""The `trainsvc` command: serve the API, run a worker, migrate, start both, submit a job."""

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from app.core.config import Settings, check_exposure, get_settings
from app.core.observability.logs import configure_logging
from app.core.observability.multiprocess import share_metrics_between_processes

if TYPE_CHECKING:
    import uvicorn


def _api_settings(args: argparse.Namespace) -> Settings:
    """The API's settings; exits if they would expose an unauthenticated API to the network."""
    settings = get_settings()
    if getattr(args, "embedded", False):
        # `trainsvc up`: one person's laptop, so no keys; check_exposure keeps it on loopback.
        settings = settings.model_copy(update={"auth": "off"})
    refusal = check_exposure(settings, args.host)
    if refusal is not None:
        sys.exit(refusal)
    return settings


def _server(args: argparse.Namespace) -> "uvicorn.Server":
    from app.api.main import create_app
    from app.api.server import build_server

    settings = _api_settings(args)
    configure_logging(settings)
    if settings.auth == "off":
        logging.getLogger("trainsvc").warning(
            "auth is off: no API keys needed; listening on %s", args.host
        )
    return build_server(create_app(settings), args.host, args.port, settings)


def _serve(args: argparse.Namespace) -> None:
    _server(args).run()


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker  # the worker, and torch with it, only in this process

    configure_logging(get_settings())
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

    _api_settings(args)  # refuse before starting anything
    upgrade(get_settings().database_url)
    share_metrics_between_processes()  # before the worker starts: it inherits the directory
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


def _doctor(args: argparse.Namespace) -> None:
    from app.core.observability.doctor import report, run_checks

    checks = run_checks(get_settings(), host=args.host)
    print(report(checks))
    if any(check.outcome == "fail" for check in checks):
        sys.exit(1)


def _keys_create(args: argparse.Namespace) -> None:
    from app.core.errors import DomainError
    from app.core.keys import create_key

    try:
        with _session() as session:
            row, key = create_key(session, args.tenant, args.admin, args.description)
            role = "admin key" if row.admin else "key"
            print(f"created {role} {row.id} for tenant {row.tenant!r}")
    except DomainError as exc:
        sys.exit(f"cannot create a key: {exc}")
    print("the key is shown once, now; the service keeps only its hash:")
    print(key)


def _keys_list(_args: argparse.Namespace) -> None:
    from app.core.keys import list_keys

    columns = ("id", "tenant", "admin", "prefix", "created", "last used", "revoked", "description")
    rows = [columns]
    with _session() as session:
        for key in list_keys(session):
            rows.append(
                (
                    str(key.id),
                    key.tenant,
                    "yes" if key.admin else "no",
                    key.prefix,
                    _moment(key.created_at),
                    _moment(key.last_used_at),
                    _moment(key.revoked_at),
                    key.description or "",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _keys_revoke(args: argparse.Namespace) -> None:
    import uuid

    from app.core.errors import DomainError
    from app.core.keys import revoke_key

    try:
        key_id = uuid.UUID(args.id)
        with _session() as session:
            row = revoke_key(session, key_id)
            print(f"revoked key {row.id} ({row.prefix}...) of tenant {row.tenant!r}")
    except (ValueError, DomainError) as exc:
        sys.exit(f"cannot revoke {args.id}: {exc}")


def _session() -> Any:
    """One committed unit of work on the configured database, for the `keys` commands."""
    from app.core.db import create_db_engine, create_session_factory, transaction

    return transaction(create_session_factory(create_db_engine(get_settings().database_url)))


def _moment(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def _submit(args: argparse.Namespace) -> None:
    import httpx
    from tqdm import tqdm

    spec = json.loads(Path(args.spec).read_text())
    api_key = get_settings().api_key
    headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
    with httpx.Client(base_url=args.url, timeout=30, headers=headers) as client:
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


def _study_create(args: argparse.Namespace) -> None:
    import httpx
    from tqdm import tqdm

    body = json.loads(Path(args.grid).read_text())
    with httpx.Client(base_url=args.url, timeout=60) as client:
        response = client.post("/v1/studies", json=body)
        if response.status_code >= 400:
            sys.exit(f"study failed ({response.status_code}): {response.text}")
        study = response.json()
        print(f"study {study['id']}: {len(study['jobs'])} jobs")
        if not args.wait:
            return
        with tqdm(total=len(study["jobs"]), unit="job", desc=study["name"] or "study") as bar:
            while not study["ended"]:
                time.sleep(1)
                study = client.get(f"/v1/studies/{study['id']}").raise_for_status().json()
                counts = study["counts"]
                bar.update(len(study["jobs"]) - counts["queued"] - counts["running"] - bar.n)
                bar.set_postfix(running=counts["running"], failed=counts["failed"])
    print(json.dumps(study["counts"]))
    print(f"report: trainsvc study report {study['id']}")


def _mean_sd(aggregate: dict[str, Any]) -> str:
    if aggregate["mean"] is None:
        return "-"
    sd = f"±{aggregate['std']:.3f}" if aggregate["std"] is not None else ""
    return f"{aggregate['mean']:.3f}{sd}"


def _study_report(args: argparse.Namespace) -> None:
    import httpx

    with httpx.Client(base_url=args.url, timeout=60) as client:
        response = client.get(f"/v1/studies/{args.study_id}/report")
        if response.status_code >= 400:
            sys.exit(f"report failed ({response.status_code}): {response.text}")
        report = response.json()
        if args.csv:
            table = client.get(
                f"/v1/studies/{args.study_id}/report", params={"format": "csv"}
            ).raise_for_status()
            Path(args.csv).write_text(table.text)
    axes = [axis for axis in report["axes"] if axis != "seed"]
    columns = [*axes, "n", "best_val_acc", "gap_final", "epochs_to_target", "diverged"]
    rows = [
        [
            *(json.dumps(row["configuration"].get(axis)) for axis in axes),
            str(row["succeeded"]),
            _mean_sd(row["best_val_accuracy"]),
            _mean_sd(row["generalization_gap_final"]),
            _mean_sd(row["epochs_to_target"]),
            str(row["diverged"]),
        ]
        for row in report["configurations"]
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if report["note"]:
        print(f"\n{report['note']}")
    print(f"\ntarget val accuracy: {report['target']['val_accuracy']}")
    if report["effects"]:
        print("\neffects (paired, bootstrap 95% intervals):")
        for effect in report["effects"]:
            for metric in ("epochs_to_target", "best_val_accuracy", "generalization_gap"):
                print(f"  {effect[metric]['reading']}")
    if args.csv:
        print(f"\nconfiguration table saved to {args.csv}")


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
    up.set_defaults(handler=_up, embedded=True)

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

    study = commands.add_parser("study", help="create a study or print its report")
    study_commands = study.add_subparsers(dest="study_command", required=True)
    create = study_commands.add_parser("create", help="create a study from a JSON file")
    create.add_argument("grid", help='{"name", "base", "grid"} or {"preset": ...}')
    create.add_argument("--wait", action="store_true", help="show progress until it ends")
    create.add_argument("--url", default="http://127.0.0.1:8000")
    create.set_defaults(handler=_study_create)
    report = study_commands.add_parser("report", help="print a study's report")
    report.add_argument("study_id")
    report.add_argument("--csv", help="also save the configuration table to this file")
    report.add_argument("--url", default="http://127.0.0.1:8000")
    report.set_defaults(handler=_study_report)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    key_create = key_commands.add_parser("create", help="make a key; it is printed once")
    key_create.add_argument(
        "--tenant", required=True, help="whose jobs and datasets the key reaches"
    )
    key_create.add_argument("--admin", action="store_true", help="may see every tenant")
    key_create.add_argument("--description", default=None)
    key_create.set_defaults(handler=_keys_create)
    key_commands.add_parser("list", help="every key, without the keys").set_defaults(
        handler=_keys_list
    )
    revoke = key_commands.add_parser("revoke", help="refuse a key from now on")
    revoke.add_argument("id")
    revoke.set_defaults(handler=_keys_revoke)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()
