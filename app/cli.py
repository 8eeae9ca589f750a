"""The `trainsvc` command: serve the API, run a worker, migrate, start both; and, as a client
of a running API (trainsvc_client), submit, follow and read jobs and studies."""

import argparse
import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from app.core.config import InvalidSettings, Settings, check_exposure, get_settings
from app.core.observability.logs import configure_logging
from app.core.observability.multiprocess import directory_refusal, share_metrics_between_processes

if TYPE_CHECKING:
    import httpx
    import sqlalchemy as sa
    import uvicorn
    from trainsvc_client import Client, Job, ServerSentEvent


# What `trainsvc up` sets in its environment, which its API (this process) and its worker
# (a child) both read: one person's machine, so no keys (check_exposure keeps it on loopback),
# and webhooks may reach a receiver on the same machine (no other tenant to probe the network).
EMBEDDED = {"TRAINSVC_AUTH": "off", "TRAINSVC_WEBHOOK_ALLOW_PRIVATE_NETWORKS": "true"}


def _api_settings(args: argparse.Namespace) -> Settings:
    """The API's settings; exits if they would expose an unauthenticated API to the network."""
    settings = get_settings()
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


def _listen(host: str, port: int) -> socket.socket:
    """The API's socket, bound before anything else starts: a port in use, or an address that
    is not this host's, is a line naming it (uvicorn's own bind named neither a host it could
    not resolve nor, for `up`, came before the worker had started). A name is looked up as IPv4,
    as uvicorn's bind did: Debian's localhost resolves to ::1 first, and IPv6 alone was not
    where the client commands (127.0.0.1) or the API image's health check look."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        family, kind, _, _, address = socket.getaddrinfo(
            host, port, family=family, type=socket.SOCK_STREAM
        )[0]
        listening = socket.socket(family, kind)
    except OSError as exc:
        sys.exit(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    try:
        listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        listening.bind(address)
    except OSError as exc:
        listening.close()
        sys.exit(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    shown = f"[{host}]" if ":" in host else host
    logging.getLogger("trainsvc").info(
        "listening on http://%s:%d (Ctrl-C to stop)", shown, listening.getsockname()[1]
    )
    return listening


def _require_latest_schema(settings: Settings) -> None:
    """Exit, naming the fix, when the database's schema is behind this release's migrations,
    or a SQLite file (the database's, the embedded broker's) cannot be written."""
    from app.core.migrate import schema_refusal, unwritable_refusal

    refusal = (
        schema_refusal(settings.database_url)
        or unwritable_refusal(settings.database_url)
        or unwritable_refusal(settings.broker_url)
    )
    if refusal is not None:
        sys.exit(refusal)


def _require_metrics_directory() -> None:
    """Exit, naming it, when PROMETHEUS_MULTIPROC_DIR is set but cannot be written: before
    anything imports prometheus-client, which would fail on it with a traceback."""
    if (refusal := directory_refusal()) is not None:
        sys.exit(refusal)


def _serve(args: argparse.Namespace) -> None:
    _require_metrics_directory()
    server = _server(args)
    _require_latest_schema(get_settings())
    server.run(sockets=[_listen(args.host, args.port)])


def _worker(args: argparse.Namespace) -> None:
    _require_metrics_directory()
    from worker.main import run_worker  # the worker, and torch with it, only in this process

    settings = get_settings()
    if args.loglevel is not None:
        settings = settings.model_copy(update={"log_level": args.loglevel})
    configure_logging(settings)
    _require_latest_schema(settings)
    run_worker(settings, concurrency=args.concurrency)


def _migrate(_args: argparse.Namespace) -> None:
    _upgrade(get_settings().database_url)
    print("database is at the latest schema")


def _upgrade(database_url: str) -> None:
    """Migrate, or exit with a line saying why the database could not be reached or written
    (a server that does not answer, a folder that does not exist or is read-only)."""
    import sqlalchemy as sa

    from app.core.migrate import upgrade

    try:
        upgrade(database_url)
    except sa.exc.OperationalError as exc:
        sys.exit(_database_failure("migrate", database_url, exc))


def _database_failure(action: str, database_url: str, exc: "sa.exc.DBAPIError") -> str:
    """One line: what could not be done to which database (its password hidden), and why."""
    import sqlalchemy as sa

    shown = sa.make_url(database_url).render_as_string(hide_password=True)
    reason = str(exc.orig).strip().splitlines()[0]
    return f"cannot {action} {shown}: {reason}"


# How long `up` waits for its worker to hand a running job back (a batch and one write).
WORKER_STOP_SECONDS = 60
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _up(args: argparse.Namespace) -> None:
    """The embedded default in one command: migrate, then a worker process and the API.

    Both are supervised here: a stop signal (Ctrl-C, SIGTERM, a closed terminal) or either
    one ending stops the other, and `up` returns only once the worker, pool included, is gone.
    """
    os.environ.update(EMBEDDED)
    get_settings.cache_clear()  # read again, with these
    _api_settings(args)  # refuse before starting anything
    _require_metrics_directory()
    # First: a port in use makes nothing, not even the database files a first run creates.
    listening = _listen(args.host, args.port)
    _upgrade(get_settings().database_url)
    _require_latest_schema(get_settings())  # at the latest now; but perhaps read-only
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
        preexec_fn=partial(_stop_with_parent, os.getpid()),
    )
    worker_ended = threading.Event()

    def supervise() -> None:
        worker.wait()
        worker_ended.set()
        server.should_exit = True

    threading.Thread(target=supervise, name="worker-supervisor", daemon=True).start()
    try:
        server.run(sockets=[listening])
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


def _stop_with_parent(parent: int) -> None:
    """In the worker, before exec: SIGTERM it if `up` dies without stopping it (SIGKILL)."""
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)  # `up` died between the fork and the line above: nothing would stop us


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
    from app.core.errors import DomainError
    from app.core.keys import revoke_key

    try:
        with _session() as session:
            row = revoke_key(session, args.id)
            print(f"revoked key {row.id} ({row.prefix}...) of tenant {row.tenant!r}")
    except DomainError as exc:
        sys.exit(f"cannot revoke {args.id}: {exc}")


@contextlib.contextmanager
def _session() -> Iterator[Any]:
    """One committed unit of work on the configured database, for the `keys` commands. A
    database not migrated, or not answering, is a line saying so: both were SQLAlchemy's
    traceback (`docker compose run` of `keys create` before `migrate` had finished)."""
    import sqlalchemy as sa

    from app.core.db import create_db_engine, create_session_factory, transaction
    from app.core.migrate import missing_sqlite_file, schema_refusal

    database_url = get_settings().database_url
    engine = create_db_engine(database_url)
    try:
        if missing_sqlite_file(database_url) is None:  # connecting would create it, empty
            with engine.connect():
                pass
        if (refusal := schema_refusal(database_url)) is not None:
            sys.exit(refusal)
        with transaction(create_session_factory(engine)) as session:
            yield session
    except sa.exc.OperationalError as exc:
        sys.exit(_database_failure("reach", database_url, exc))
    finally:
        engine.dispose()


def _moment(value: Any) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


# -- the client-side commands: each talks to a running API through trainsvc_client ---------

# How a shell reports a command that Ctrl-C ended: 128 + SIGINT.
EXIT_INTERRUPTED = 128 + signal.SIGINT

# What the client commands send their requests through; tests point it at an app in-process.
CLIENT_TRANSPORT: "httpx.BaseTransport | None" = None
DEFAULT_URL = "http://127.0.0.1:8000"


def _client(args: argparse.Namespace) -> "Client":
    """A client of the API at --url; the key comes from TRAINSVC_API_KEY, never the command line."""
    from trainsvc_client import Client

    api_key = get_settings().api_key
    return Client(
        args.url,
        api_key=api_key.get_secret_value() if api_key else None,
        transport=CLIENT_TRANSPORT,
    )


@contextlib.contextmanager
def _reporting(action: str) -> Iterator[None]:
    """The API's error code and message, or why it could not be reached, and a non-zero exit."""
    from trainsvc_client import ApiError, TrainsvcError

    try:
        yield
    except ApiError as exc:
        sys.exit(f"{action} failed ({exc.status_code}) {exc.code}: {exc.message}")
    except TrainsvcError as exc:
        sys.exit(f"{action} failed: {exc.message}")
    except KeyboardInterrupt:
        # Ctrl-C while waiting or following: a line, not a traceback; a job goes on.
        print(f"\n{action} interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


def _read_json(path: str) -> Any:
    """A JSON file the user named, or a one-line reason and a non-zero exit (no traceback)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        sys.exit(f"cannot read {path}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        sys.exit(f"cannot read {path}: not UTF-8 text")
    except json.JSONDecodeError as exc:
        sys.exit(f"{path} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}")


def _write_text(path: str, text: str) -> None:
    """Save a file the user named, or a one-line reason and a non-zero exit (no traceback)."""
    try:
        Path(path).write_text(text, encoding="utf-8")
    except OSError as exc:
        sys.exit(f"cannot write {path}: {exc.strerror or exc}")


def _submit(args: argparse.Namespace) -> None:
    spec = _read_json(args.spec)
    with _reporting("submit"), _client(args) as client:
        job = client.submit(spec)
        print(f"job {job.id} {job.status}")
        if not args.wait:
            return
        job = _follow(client, job.id, table=False)
    print(
        json.dumps(
            {
                "status": job.status,
                "summary": job.summary,
                "error": job.error.model_dump() if job.error else None,
            },
            indent=2,
        )
    )
    if job.status != "succeeded":
        sys.exit(1)


WATCH_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "status")


def _follow(client: "Client", job_id: uuid.UUID, *, table: bool) -> "Job":
    """Follow a job's events until it ends: a progress bar by epoch (on stderr) and, with
    `table`, one row per epoch as it is stored (on stdout); returns the ended job."""
    from tqdm import tqdm

    job = client.get(job_id)
    status = job.status
    if table:
        print("  ".join(f"{column:>10}" for column in WATCH_COLUMNS), flush=True)
    with tqdm(total=job.progress.epochs, unit="epoch", desc=job.name or "training") as bar:

        def on_event(event: "ServerSentEvent") -> None:
            nonlocal status
            data = json.loads(event.data)
            if event.event == "status":
                status = data["status"]
                bar.set_postfix(status=status)
            elif event.event == "epoch":
                if table:
                    cells = (
                        data["epoch"],
                        *(_figure(data.get(name)) for name in _EPOCH_FIELDS),
                        status,
                    )
                    bar.clear()
                    print("  ".join(f"{cell:>10}" for cell in cells), flush=True)
                bar.update(max(0, data["epoch"] - bar.n))
                bar.refresh()

        job = client.wait(job_id, on_event=on_event)
        bar.update(max(0, job.progress.epoch - bar.n))
        bar.set_postfix(status=job.status)
    return job


_EPOCH_FIELDS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def _figure(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


# `jobs list` reads a page at a time, so its --limit is not the API's page limit; this cap
# only keeps the number one islice takes and more than anyone reads in a table.
LIST_PAGE_SIZE = 100
MAX_LIST_LIMIT = 1_000_000


def _jobs_list(args: argparse.Namespace) -> None:
    import itertools

    with _reporting("list"), _client(args) as client:
        # Pages no larger than what is wanted: `--limit 5` asks the API for 5 jobs, not 100.
        listed = client.list(
            status=args.status, study_id=args.study, page_size=min(args.limit, LIST_PAGE_SIZE)
        )
        jobs = itertools.islice(listed, args.limit)
        rows: list[tuple[str, ...]] = [("id", "name", "status", "progress", "pack", "created")]
        rows += [
            (
                str(job.id),
                job.name or "-",
                job.status,
                f"{job.progress.epoch}/{job.progress.epochs}",
                str(job.pack)[:8] if job.pack else "-",  # as the dashboard shows it
                _moment(job.created_at),
            )
            for job in jobs
        ]
    _print_table(rows)


def _jobs_show(args: argparse.Namespace) -> None:
    with _reporting("show"), _client(args) as client:
        print(client.get(args.id).model_dump_json(indent=2))


def _jobs_watch(args: argparse.Namespace) -> None:
    with _reporting("watch"), _client(args) as client:
        job = _follow(client, args.id, table=True)
    error = f" ({job.error.type}: {job.error.message})" if job.error else ""
    print(f"job {job.id} {job.status}{error}")
    if job.status != "succeeded":
        sys.exit(1)


def _jobs_cancel(args: argparse.Namespace) -> None:
    with _reporting("cancel"), _client(args) as client:
        job = client.cancel(args.id)
    state = "cancelled" if job.status == "cancelled" else f"{job.status}, stopping within a batch"
    print(f"job {job.id} {state}")


def _jobs_metrics(args: argparse.Namespace) -> None:
    import csv
    import io

    with _reporting("metrics"), _client(args) as client:
        epochs = [epoch.model_dump() for epoch in client.metrics(args.id)]
    if args.csv is None:
        rows: list[tuple[str, ...]] = [
            ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr")
        ]
        rows += [
            (str(e["epoch"]), *(_figure(e[name]) for name in (*_EPOCH_FIELDS, "lr")))
            for e in epochs
        ]
        _print_table(rows)
        return
    # Scalars only (the per-layer diagnostics are lists): one column each, in a stable order.
    columns = list(dict.fromkeys(k for e in epochs for k, v in e.items() if _scalar(v)))
    out = sys.stdout if args.csv == "-" else io.StringIO()
    writer = csv.DictWriter(out, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(epochs)
    if isinstance(out, io.StringIO):
        _write_text(args.csv, out.getvalue())
        print(f"{len(epochs)} epochs written to {args.csv}")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, str | int | float | bool)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        )


def _study_create(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    body = _read_json(args.grid)
    with _reporting("study"), _client(args) as client:
        study = client.create_study(body)
        print(f"study {study['id']}: {len(study['jobs'])} jobs")
        if not args.wait:
            return
        with tqdm(total=len(study["jobs"]), unit="job", desc=study["name"] or "study") as bar:
            while not study["ended"]:
                time.sleep(1)
                study = client.get_study(study["id"])
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
    with _reporting("report"), _client(args) as client:
        report = client.study_report(args.study_id)
        if args.csv:
            _write_text(args.csv, client.study_report(args.study_id, format="csv"))
    axes = [axis for axis in report["axes"] if axis != "seed"]
    columns = [
        *axes,
        "n",
        "best_val_acc",
        "gap_final",
        "epochs_to_target",
        "diverged",
        "s_per_epoch",
        "packed",
    ]
    rows = [
        [
            *(json.dumps(row["configuration"].get(axis)) for axis in axes),
            str(row["succeeded"]),
            _mean_sd(row["best_val_accuracy"]),
            _mean_sd(row["generalization_gap_final"]),
            _mean_sd(row["epochs_to_target"]),
            str(row["diverged"]),
            _mean_sd(row["seconds_per_epoch"]),
            str(row["packed"]),
        ]
        for row in report["configurations"]
    ]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    if report["note"]:
        print(f"\n{report['note']}")
    if report.get("seconds_note"):
        print(f"\n{report['seconds_note']}")
    target = report["target"]["val_accuracy"]
    print(
        f"\ntarget val accuracy: {target:.4g}"
        if target is not None
        else "\ntarget val accuracy: none (no job has succeeded)"
    )
    if failed := report["counts"].get("failed", 0):
        print(
            f"{failed} jobs failed; `trainsvc jobs list --study {report['study_id']} "
            "--status failed` lists them, `trainsvc jobs show <id>` says why"
        )
    if report["effects"]:
        print("\neffects (paired, bootstrap 95% intervals):")
        for effect in report["effects"]:
            for metric in ("epochs_to_target", "best_val_accuracy", "generalization_gap"):
                print(f"  {effect[metric]['reading']}")
    if args.csv:
        print(f"\nconfiguration table saved to {args.csv}")


def _whole_number(text: str, low: int, high: int, what: str) -> int:
    try:
        number = int(text)
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
    return number


def _port(text: str) -> int:
    return _whole_number(text, 0, 65535, "a TCP port (0 to 65535)")


def _processes(text: str) -> int:
    return _whole_number(text, 1, 1024, "a number of processes (1 to 1024)")


def _api_url(text: str) -> str:
    import httpx

    try:
        url = httpx.URL(text)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http:// or https:// URL")
    return text


def _list_limit(text: str) -> int:
    return _whole_number(text, 1, MAX_LIST_LIMIT, f"a number of jobs (1 to {MAX_LIST_LIMIT})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trainsvc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    def server_options(command: argparse.ArgumentParser) -> None:
        command.add_argument("--host", default="127.0.0.1")
        command.add_argument("--port", type=_port, default=8000)

    serve = commands.add_parser("serve", help="run the HTTP API")
    server_options(serve)
    serve.set_defaults(handler=_serve)

    worker = commands.add_parser("worker", help="run a Celery worker (one process per GPU)")
    worker.add_argument("--concurrency", type=_processes, default=None)
    worker.add_argument(
        "--loglevel",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default=None,
        help="this worker's log level, instead of TRAINSVC_LOG_LEVEL",
    )
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
    submit.add_argument("--url", type=_api_url, default=DEFAULT_URL)
    submit.set_defaults(handler=_submit)

    study = commands.add_parser("study", help="create a study or print its report")
    study_commands = study.add_subparsers(dest="study_command", required=True)
    create = study_commands.add_parser("create", help="create a study from a JSON file")
    create.add_argument("grid", help='{"name", "base", "grid"} or {"preset": ...}')
    create.add_argument("--wait", action="store_true", help="show progress until it ends")
    create.add_argument("--url", type=_api_url, default=DEFAULT_URL)
    create.set_defaults(handler=_study_create)
    report = study_commands.add_parser("report", help="print a study's report")
    report.add_argument("study_id", type=uuid.UUID, help="the study's id")
    report.add_argument("--csv", help="also save the configuration table to this file")
    report.add_argument("--url", type=_api_url, default=DEFAULT_URL)
    report.set_defaults(handler=_study_report)

    jobs = commands.add_parser("jobs", help="list, show, watch, cancel jobs; read metrics")
    job_commands = jobs.add_subparsers(dest="jobs_command", required=True)

    def job_command(name: str, help: str, handler: Any, with_id: bool = True) -> Any:
        command = job_commands.add_parser(name, help=help)
        if with_id:
            command.add_argument("id", type=uuid.UUID, help="the job's id")
        command.add_argument(
            "--url", type=_api_url, default=DEFAULT_URL, help="the API (default %(default)s)"
        )
        command.set_defaults(handler=handler)
        return command

    job_list = job_command("list", "the newest jobs first", _jobs_list, with_id=False)
    job_list.add_argument(
        "--status", choices=("queued", "running", "succeeded", "failed", "cancelled")
    )
    job_list.add_argument("--study", type=uuid.UUID, help="only this study's jobs (its id)")
    job_list.add_argument("--limit", type=_list_limit, default=50, help="at most this many (50)")
    job_command("show", "a job as JSON: status, progress, spec, summary, error", _jobs_show)
    job_command(
        "watch", "a live table of epochs and a progress bar until the job ends", _jobs_watch
    )
    job_command("cancel", "cancel a job (a running one stops within a batch)", _jobs_cancel)
    job_metrics = job_command("metrics", "per-epoch metrics, as a table or CSV", _jobs_metrics)
    job_metrics.add_argument(
        "--csv",
        nargs="?",
        const="-",
        metavar="PATH",
        help="write CSV (every scalar column) to PATH, or to stdout without one",
    )

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
    revoke.add_argument("id", type=uuid.UUID, help="the key's id (trainsvc keys list)")
    revoke.set_defaults(handler=_keys_revoke)
    return parser


# How a shell reports a command that a closed pipe ended (`trainsvc jobs metrics ID --csv |
# head`): 128 + SIGPIPE, what `cat` or `seq` give under `set -o pipefail`.
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        get_settings()  # every command reads them: one that is wrong is named before anything
    except InvalidSettings as exc:
        sys.exit(str(exc))
    try:
        args.handler(args)
        sys.stdout.flush()  # here, so a reader that went away is caught below, not at exit
    except KeyboardInterrupt:
        # Ctrl-C before `up` or `serve` has handlers of its own: while importing, or during a
        # migration (one transaction: rolled back, the next run starts it again).
        print("\ninterrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:
        # The reader has all it wanted; end quietly, as a program that SIGPIPE killed would.
        # Python ignores SIGPIPE, so the write raised instead. Standard output now goes to
        # /dev/null, or the interpreter's own flush at exit would fail and print again
        # (the recipe in the documentation of Python's signal module).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_BROKEN_PIPE)


if __name__ == "__main__":
    main()
