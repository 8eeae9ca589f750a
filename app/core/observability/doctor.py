"""`trainsvc doctor`: can this deployment run jobs? Each check says what is wrong and the fix.

Checks the database (reachable, schema at the latest migration), the broker, the workers (a
heartbeat in the database within the last few sweeps), the GPUs this host sees (nvidia-smi,
without importing PyTorch) and whether API keys are required.
"""

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import sqlalchemy as sa

from app.core.broker import create_celery_app
from app.core.config import Settings, is_loopback
from app.core.db import create_db_engine, create_session_factory
from app.core.migrate import missing_sqlite_file, schema_state
from app.core.observability import heartbeats

Outcome = Literal["ok", "info", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    outcome: Outcome
    detail: str
    fix: str | None = None


def _safe_url(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


def check_database(settings: Settings) -> list[Check]:
    """Reachable, then at the latest migration, then recent worker heartbeats."""
    url = _safe_url(settings.database_url)
    if (path := missing_sqlite_file(settings.database_url)) is not None:
        return [
            Check("database", "fail", f"{url}: no such file {path}", "run `trainsvc migrate`"),
            Check("workers", "fail", "unknown: there is no database"),
        ]
    engine = create_db_engine(settings.database_url)
    try:
        try:
            with engine.connect() as connection:
                connection.execute(sa.text("SELECT 1"))
                schema = schema_state(connection, settings.database_url)
        except sa.exc.SQLAlchemyError as exc:
            reason = getattr(exc, "orig", None) or exc
            return [
                Check(
                    "database",
                    "fail",
                    f"{url} is not reachable: {type(exc).__name__}: {reason}"[:500],
                    "check TRAINSVC_DATABASE_URL, and that the database server is up",
                ),
                Check("workers", "fail", "unknown: the database is not reachable"),
            ]
        checks = [Check("database", "ok", f"{url} is reachable")]
        if schema.behind:
            checks.append(Check("migrations", "fail", schema.describe(), "run `trainsvc migrate`"))
            checks.append(Check("workers", "fail", "unknown: the schema is not up to date"))
            return checks
        if schema.latest:
            latest = ", ".join(sorted(schema.heads))
            checks.append(Check("migrations", "ok", f"at the latest ({latest})"))
        else:  # as serve and worker judge it: they start, with this warning
            checks.append(
                Check(
                    "migrations",
                    "warn",
                    f"{schema.describe()}: newer than this release knows",
                    "upgrade trainsvc on this host to the release that migrated it",
                )
            )
        checks.append(_check_workers(settings, engine))
        return checks
    finally:
        engine.dispose()


def _check_workers(settings: Settings, engine: sa.Engine) -> Check:
    # A sweeper stamps its worker's row every sweep_seconds; three missed sweeps is "not seen".
    window = max(3 * settings.sweep_seconds, 15.0)
    with create_session_factory(engine)() as session:
        seen = heartbeats.seen_since(session, window)
    if not seen:
        return Check(
            "workers",
            "fail",
            f"no worker has been seen in the last {window:.0f}s: queued jobs will wait",
            "start `trainsvc worker` (same TRAINSVC_DATABASE_URL and TRAINSVC_BROKER_URL), "
            "or `trainsvc up` on a laptop",
        )
    hosts = sorted({worker.hostname for worker in seen})
    return Check(
        "workers", "ok", f"{len(seen)} seen in the last {window:.0f}s on {', '.join(hosts)}"
    )


def check_broker(settings: Settings) -> Check:
    url = _safe_url(settings.broker_url)
    try:
        with create_celery_app(settings).connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        return Check(
            "broker",
            "fail",
            f"{url} is not reachable: {type(exc).__name__}: {exc}"[:500],
            "check TRAINSVC_BROKER_URL, and that Redis is up (submits still succeed: the "
            "outbox holds jobs until the broker answers, but none starts)",
        )
    return Check("broker", "ok", f"{url} is reachable")


def check_gpus(run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run) -> Check:
    if shutil.which("nvidia-smi") is None:
        return Check("gpus", "info", "none visible on this host (no nvidia-smi): CPU training")
    try:
        listed = run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Check("gpus", "warn", f"nvidia-smi did not answer: {exc}", "check the driver")
    gpus = [line for line in listed.stdout.splitlines() if line.startswith("GPU ")]
    if listed.returncode != 0 or not gpus:
        return Check(
            "gpus",
            "warn",
            f"nvidia-smi found no usable GPU: {(listed.stderr or listed.stdout).strip()[:300]}",
            "check the NVIDIA driver (and the container's GPU reservation); jobs train on CPU",
        )
    return Check("gpus", "ok", f"{len(gpus)} visible: " + "; ".join(gpus))


def check_auth(settings: Settings, host: str | None) -> Check:
    if settings.auth == "on":
        # `trainsvc up` is one person's laptop: it turns keys off (on loopback only) whatever
        # the settings say, so "required" would be untrue of a service it started.
        return Check(
            "auth",
            "ok",
            "`trainsvc serve` requires API keys (TRAINSVC_AUTH=on); "
            "`trainsvc up` runs without them, on 127.0.0.1 only",
        )
    if host is not None and not is_loopback(host):
        return Check(
            "auth",
            "fail",
            f"API keys are off and the API is to listen on {host}: anyone on the network "
            "can read and cancel every job",
            "set TRAINSVC_AUTH=on and create keys with `trainsvc keys create`, or serve on "
            "127.0.0.1",
        )
    return Check("auth", "warn", "API keys are off: safe only on 127.0.0.1", "set TRAINSVC_AUTH=on")


def run_checks(settings: Settings, host: str | None = None) -> list[Check]:
    return [
        *check_database(settings),
        check_broker(settings),
        check_gpus(),
        check_auth(settings, host),
    ]


def report(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"[{check.outcome:^4}] {check.name}: {check.detail}")
        if check.fix and check.outcome in ("warn", "fail"):
            lines.append(f"       fix: {check.fix}")
    failed = [check.name for check in checks if check.outcome == "fail"]
    lines.append(
        f"{len(failed)} problem(s): {', '.join(failed)}" if failed else "all checks passed"
    )
    return "\n".join(lines)
