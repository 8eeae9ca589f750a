"""The `trainsvc` command: serve the API, run a worker, migrate, start both, submit a job."""

import argparse
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from app.core.config import Settings, get_settings


def _api_settings(args: argparse.Namespace) -> Settings:
    """The API's settings; exits if they would expose an unauthenticated API to the network."""
    from app.api.auth import check_exposure

    settings = get_settings()
    if getattr(args, "embedded", False):
        # `trainsvc up`: one person's laptop, so no keys; check_exposure keeps it on loopback.
        settings = settings.model_copy(update={"auth": "off"})
    refusal = check_exposure(settings, args.host)
    if refusal is not None:
        sys.exit(refusal)
    return settings


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.api.main import create_app

    settings = _api_settings(args)
    if settings.auth == "off":
        print(f"trainsvc: auth is off, no API keys needed; listening on {args.host}", flush=True)
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")


def _worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker  # the worker, and torch with it, only in this process

    run_worker(get_settings(), concurrency=args.concurrency, loglevel=args.loglevel)


def _migrate(_args: argparse.Namespace) -> None:
    from app.core.migrate import upgrade

    upgrade(get_settings().database_url)
    print("database is at the latest schema")


def _up(args: argparse.Namespace) -> None:
    """The embedded default in one command: migrate, then a worker process and the API."""
    from app.core.migrate import upgrade

    _api_settings(args)  # refuse before starting anything
    upgrade(get_settings().database_url)
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

    submit = commands.add_parser("submit", help="submit a job spec (JSON file)")
    submit.add_argument("spec")
    submit.add_argument("--wait", action="store_true", help="show progress until the job ends")
    submit.add_argument("--url", default="http://127.0.0.1:8000")
    submit.set_defaults(handler=_submit)

    keys = commands.add_parser("keys", help="create, list and revoke API keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="make a key; it is printed once")
    create.add_argument("--tenant", required=True, help="whose jobs and datasets the key reaches")
    create.add_argument("--admin", action="store_true", help="may see every tenant")
    create.add_argument("--description", default=None)
    create.set_defaults(handler=_keys_create)
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
