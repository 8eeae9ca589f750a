"""Settings: every knob of the service in one typed place, read from TRAINSVC_* variables."""

from functools import lru_cache

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINSVC_", env_file=".env", extra="ignore")

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
    # An .npz is compressed: its arrays may unpack to at most this much (a zip bomb is a 422).
    max_upload_unpacked_bytes: int = Field(1024**3, ge=1024)
    max_upload_samples: int = Field(200_000, ge=1)
    max_upload_features: int = Field(100_000, ge=1)
    # An upload's labels 0..C-1: C above this is a 422 (the output layer would be that wide).
    max_upload_classes: int = Field(1000, ge=2)
    # Back-pressure: more queued jobs than this and submit answers 429.
    max_queued_jobs: int = Field(10_000, ge=1)
    # The cap on a spec's max_wall_seconds, and the limit used when a spec gives none.
    max_wall_seconds: int = Field(24 * 3600, ge=1)

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

    # Worker.
    worker_concurrency: int | None = Field(None, ge=1)  # default: visible GPUs, else 1
    broker_publish_timeout_seconds: float = Field(2.0, gt=0)
    # The embedded (SQL) broker is polled: how long an idle worker waits between looks.
    broker_polling_seconds: float = Field(0.1, gt=0)
    # After a publish fails (broker down), skip publishing this long; the outbox keeps the jobs.
    publish_pause_seconds: float = Field(5.0, ge=0)


@lru_cache
def get_settings() -> Settings:
    return Settings()
