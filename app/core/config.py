"""Settings: every knob of the service in one typed place, read from TRAINSVC_* variables."""

import ipaddress
import json
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    # No inf or nan: a lease of "inf" passed gt=0 and no lease would ever run out.
    model_config = SettingsConfigDict(
        env_prefix="TRAINSVC_", env_file=".env", extra="ignore", allow_inf_nan=False
    )

    # Embedded default: one SQLite file for jobs, and kombu's SQLAlchemy transport on a second
    # SQLite file as the broker, so `trainsvc up` needs no server at all.
    database_url: str = "sqlite:///./trainsvc.db"
    broker_url: str = "sqla+sqlite:///./trainsvc-broker.db"

    # Request limits. Over them is a 413 (body) or a 422 naming the limit (spec).
    max_body_bytes: int = Field(256 * 1024, ge=1024)
    max_upload_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_epochs: int = Field(500, ge=1)
    max_layer_width: int = Field(4096, ge=1)
    max_layers: int = Field(16, ge=1)
    max_parameters: int = Field(20_000_000, ge=1)
    # What one job may take in its worker's memory, as app.core.spec.memory_bytes estimates
    # it (parameters, optimizer state, a batch's activations): a wide conv on a large image
    # has few parameters and still runs out of memory, so this is judged at submit too.
    max_job_memory_bytes: int = Field(4 * 1024**3, ge=1)
    # What an upload's arrays may take once unpacked: an .npz's members together, and x as
    # float32 (a zip bomb, or a header claiming a huge shape, is a 422). Parsing one upload
    # holds at most about 3x this (README, "Uploads and memory").
    max_upload_unpacked_bytes: int = Field(256 * 1024 * 1024, ge=1024)
    # At most this many uploads are parsed at once; one more waits up to
    # upload_wait_seconds for a slot, then is a 429.
    upload_concurrency: int = Field(2, ge=1)
    upload_wait_seconds: float = Field(10.0, ge=0)
    max_upload_samples: int = Field(200_000, ge=1)
    max_upload_features: int = Field(100_000, ge=1)
    # An upload's labels 0..C-1: C above this is a 422 (the output layer would be that wide).
    max_upload_classes: int = Field(1000, ge=2)
    # Back-pressure: more queued jobs than this and submit answers 429.
    max_queued_jobs: int = Field(10_000, ge=1)
    # The cap on a spec's max_wall_seconds, and the limit used when a spec gives none.
    max_wall_seconds: int = Field(24 * 3600, ge=1)
    # A study is one job per grid point: a grid with more points than this is a 422.
    max_study_jobs: int = Field(1000, ge=1)

    # Leases (docs/reliability.md). A running job's lease is renewed every heartbeat; a lease
    # that runs out means its worker is gone, and the reaper queues the job again.
    # 60 s: a database restart of 30 s stops renewals for at most 30 s + one heartbeat, and
    # the lease must outlast that, or the reaper would take a healthy job from its worker.
    lease_seconds: float = Field(60.0, gt=0)
    heartbeat_seconds: float = Field(5.0, gt=0)
    # How often a running job looks for a cancel or hand-back request: "within a second".
    control_poll_seconds: float = Field(0.5, gt=0)
    # How often the worker's sweeper reaps expired leases and publishes unpublished jobs.
    sweep_seconds: float = Field(5.0, gt=0)
    # A queued job whose message was published this long ago without being claimed is
    # published again, in case the broker lost it; duplicates are harmless (claims are atomic).
    republish_after_seconds: float = Field(300.0, gt=0)
    max_attempts: int = Field(3, ge=1)
    # How long a worker retries a database write before giving the attempt up.
    db_retry_seconds: float = Field(45.0, ge=0)
    # The `last` checkpoint (weights and optimizer state, ~12 bytes a parameter with Adam) is
    # rewritten at most this often, and always after the last epoch and when an attempt is
    # cancelled or handed back; 0 rewrites it every epoch. A lost worker's job resumes from it.
    checkpoint_every_seconds: float = Field(30.0, ge=0)

    # How often each API process reads new job events for its open streams (one query per
    # tick per process, however many clients listen; none while nobody does).
    event_poll_seconds: float = Field(0.25, gt=0)
    # A live stream ends after this long; its client reconnects with Last-Event-ID and misses
    # nothing (EventSource does so itself), and no connection is held for ever.
    event_stream_max_seconds: float = Field(300.0, gt=0)
    # A tenant's open event streams, per API process (429 above): one tenant must not hold
    # every connection the process takes (TRAINSVC_HTTP_MAX_CONNECTIONS, or its file handles).
    tenant_max_streams: int = Field(100, ge=1)

    # Other origins whose pages may call the API from a browser (CORS), as a JSON list of
    # "https://dash.example.com" (scheme, host and port; no path), or ["*"] for any. Empty: only
    # pages the service serves itself (its dashboard). Keys travel in a header, not a cookie.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Webhooks are a way out of the network: when set, callbacks may go to these hosts only
    # (exact names, or "*.example.com" for subdomains). A JSON list in the environment.
    webhook_allowed_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Without that list, a webhook reaches public addresses only: a tenant's callback must not
    # reach the database, the broker or a cloud's metadata service from inside the network.
    # true lifts it (one person's machine: `trainsvc up` sets it).
    webhook_allow_private_networks: bool = False
    # A delivery is retried with backoff (2 s, 4 s, ... up to 5 min apart) for this long.
    webhook_retry_for_seconds: float = Field(3600.0, gt=0)
    webhook_timeout_seconds: float = Field(10.0, gt=0)

    # Worker.
    # Default: visible GPUs, else 1. At most what `trainsvc worker --concurrency` accepts: a
    # typo of 100000 would have forked that many training processes.
    worker_concurrency: int | None = Field(None, ge=1, le=1024)
    # Up to this many queued jobs of one tenant that differ only in numbers train together as
    # one batched model (worker/packing.py); 1 turns packing off.
    max_pack: int = Field(8, ge=1)
    # And no more than fit in this many bytes of the device's memory (estimated per trial by
    # worker/training/packed.py trial_memory_bytes); default: half its free memory when the
    # pack forms.
    pack_memory_bytes: int | None = Field(None, gt=0)
    # The dtype a worker trains in. float64 is for checking exactness through the whole
    # service (a study trained packed against the same study trained job by job gives the
    # same report to rounding, tests/e2e/test_packed_study.py); it is several times slower.
    # bf16 is a job's own choice (its spec's mixed_precision), not the worker's.
    training_dtype: Literal["float32", "float64"] = "float32"
    broker_publish_timeout_seconds: float = Field(2.0, gt=0)
    # The embedded (SQL) broker is polled: how long an idle worker waits between looks.
    broker_polling_seconds: float = Field(0.1, gt=0)
    # After a publish fails (broker down), skip publishing this long; the outbox keeps the jobs.
    publish_pause_seconds: float = Field(5.0, ge=0)

    # Operations (docs/operations.md). Logs: json lines, a console line, or auto (console on a
    # terminal, json otherwise).
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # /metrics answers without a key unless this is set (enforced with the API keys).
    metrics_require_key: bool = False
    # The HTTP server's limits on slow clients: a request's line and headers must arrive within
    # http_header_timeout_seconds of the connection opening (or of the previous response); an
    # idle keep-alive connection closes after http_keep_alive_seconds; a request head over
    # http_max_header_bytes is refused; over http_max_connections open connections, 503.
    http_header_timeout_seconds: float = Field(10.0, gt=0)
    http_keep_alive_seconds: int = Field(5, ge=1)
    http_max_header_bytes: int = Field(16 * 1024, ge=1024)
    http_max_connections: int | None = Field(None, ge=1)
    # Once the API is told to stop, requests still running this long after (a stalled client's
    # download) are cancelled; event streams end at once (app/api/server.py).
    http_shutdown_seconds: int = Field(10, ge=1)
    # Keys and tenants (docs/security.md). With auth off every request acts as the default
    # tenant with admin rights, which is only allowed on a loopback address unless
    # allow_unauthenticated_network says the operator means it.
    auth: Literal["on", "off"] = "on"
    allow_unauthenticated_network: bool = False
    # How long an API process trusts a key lookup: a revoked key is refused within this.
    key_cache_seconds: float = Field(1.0, ge=0)
    # Per tenant: bytes of uploads plus checkpoints, and jobs queued plus running (as many as
    # the largest study, so that one study of max_study_jobs, a preset's 108 among them, fits).
    tenant_storage_bytes: int = Field(10 * 1024**3, ge=0)
    tenant_max_active_jobs: int = Field(1000, ge=1)
    # Per key, per API process: a token bucket refilled at this rate, holding up to the burst.
    key_requests_per_second: float = Field(50.0, gt=0)
    key_request_burst: int = Field(100, ge=1)
    # The key `trainsvc submit` sends (TRAINSVC_API_KEY), kept out of the command line.
    api_key: SecretStr | None = None

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, url: str) -> str:
        """SQLite or PostgreSQL through psycopg, the two this service runs on: any other URL
        ended the first command that connected in SQLAlchemy's traceback."""
        from sqlalchemy import make_url  # here: the client commands read settings too
        from sqlalchemy.exc import ArgumentError

        try:
            parsed = make_url(url)
            backend = (parsed.get_backend_name(), parsed.get_driver_name())
        except ArgumentError:
            backend = None
        if backend not in (("sqlite", "pysqlite"), ("postgresql", "psycopg")):
            raise ValueError(
                "not a database URL this service can use: give sqlite:///path/to/trainsvc.db "
                "or postgresql+psycopg://user:password@host:5432/name"
            )
        return url

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, url: str) -> str:
        """Redis, or the embedded SQLite transport: any other URL started `serve` with a broker
        it could never reach, and ended `worker` in kombu's KeyError traceback."""
        scheme, separator, _ = url.partition("://")
        if not separator or scheme not in _BROKER_SCHEMES:
            raise ValueError(
                "not a broker URL this service can use: give redis://host:6379/0 "
                "or sqla+sqlite:///path/to/trainsvc-broker.db"
            )
        return url

    @field_validator("cors_origins", "webhook_allowed_hosts", mode="before")
    @classmethod
    def _json_list(cls, value: object) -> object:
        """A list in the environment is JSON, read here: pydantic-settings' own reading
        raised, on text that is not JSON, an error naming neither the variable nor why."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f'not JSON ({exc.msg} at column {exc.colno}): give a JSON list, as ["a", "b"]'
            ) from None

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            if origin != "*" and not _ORIGIN.fullmatch(origin):
                raise ValueError(
                    f"{origin!r} is not an origin: give scheme://host[:port], "
                    "as https://dash.example.com, with no path or trailing slash"
                )
        return origins


# Celery's Redis transport (TCP, TLS, a Unix socket, Sentinel) and the embedded SQLite one.
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "sqla+sqlite")

# What a browser sends as Origin: a scheme, a host and perhaps a port, nothing after.
_ORIGIN = re.compile(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings, host: str) -> str | None:
    """Why the API must not start on `host` with these settings, or None if it may."""
    if settings.auth == "on" or settings.allow_unauthenticated_network or is_loopback(host):
        return None
    return (
        f"refusing to serve without API keys on {host}: anyone who reaches it could use it. "
        "Turn auth on (TRAINSVC_AUTH=on, keys from `trainsvc keys create`), bind to "
        "127.0.0.1, or set TRAINSVC_ALLOW_UNAUTHENTICATED_NETWORK=true if the network is yours."
    )


class InvalidSettings(Exception):
    """Settings the service cannot run with: each variable at fault, and why (no values: a
    database URL or a key may hold a secret)."""


@lru_cache
def get_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        problems = [
            f"  TRAINSVC_{'_'.join(map(str, error['loc'])).upper()}: "
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        ]
        raise InvalidSettings(
            "invalid settings (TRAINSVC_ variables, or lines of .env):\n" + "\n".join(problems)
        ) from None
