"""Prometheus metrics shared by the API and the workers, and the scrape that renders them.

Two kinds. Events a process sees (a request served, a job claimed or ended, an epoch trained)
are counters and histograms kept by that process. What the database knows (jobs by status,
queue depth, the outbox backlog, attempts lost and recovered) is counted at scrape time by
DatabaseCollector, so it is exact whichever process changed it, and costs nothing between
scrapes.

Several processes (uvicorn workers, Celery's pool) each keep their own counters. With
PROMETHEUS_MULTIPROC_DIR set (before the first import of prometheus_client, to a directory
shared by every process on the host and emptied before they start), each process writes its
values to files there and a scrape adds them up (prometheus-client's multiprocess mode).
`trainsvc up` sets one for its API and worker. Without it, /metrics shows the API process's
own counters only.
"""

import os
from collections.abc import Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from app.core.db import READ_ONLY
from app.core.models import Job, JobAttempt
from app.core.models.jobs import JobStatus

__all__ = ["CONTENT_TYPE_LATEST", "render"]

# -- what the API observes ------------------------------------------------------------------------

HTTP_REQUESTS = Counter(
    "trainsvc_http_requests",
    "HTTP requests answered, by method, route template and status code.",
    ["method", "route", "status"],
)
HTTP_REQUEST_SECONDS = Histogram(
    "trainsvc_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response, by method and route template.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

# -- what the workers observe ---------------------------------------------------------------------

SUBMIT_TO_START_SECONDS = Histogram(
    "trainsvc_job_submit_to_start_seconds",
    "Time from a job's submission to its first claim by a worker.",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
JOB_SECONDS = Histogram(
    "trainsvc_job_duration_seconds",
    "Time from a job's first start to its end, by the status it ended with.",
    ["status"],
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600),
)
JOBS_ENDED = Counter(
    "trainsvc_jobs_ended", "Attempts that ended their job, by the status it ended with.", ["status"]
)
TRAINING_SAMPLES = Counter(
    "trainsvc_training_samples",
    "Training samples processed, by device (rate() of it is the throughput).",
    ["device"],
)
TRAINING_SAMPLES_PER_SECOND = Gauge(
    "trainsvc_training_samples_per_second",
    "Training throughput of the most recent epoch, by device.",
    ["device"],
    multiprocess_mode="mostrecent",
)

RUN_JOBS = Histogram(
    "trainsvc_run_jobs",
    "Jobs a worker trains at once in one run: 1 alone, more in a pack (TRAINSVC_MAX_PACK).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
PACK_SPLITS = Counter(
    "trainsvc_pack_splits",
    "Packs that ran out of device memory: half of each trained on, half went back to the queue.",
)


def observe_claim(queued_seconds: float, attempt: int) -> None:
    """A worker claimed a job: its first claim measures how long it waited in the queue."""
    if attempt == 1:
        SUBMIT_TO_START_SECONDS.observe(queued_seconds)


def observe_job_end(status: str, seconds: float) -> None:
    JOBS_ENDED.labels(status).inc()
    JOB_SECONDS.labels(status).observe(max(0.0, seconds))


def observe_run(jobs: int) -> None:
    """A worker starts training claimed jobs: one alone, or a pack of them."""
    RUN_JOBS.observe(jobs)


def observe_pack_split() -> None:
    """A pack did not fit its device: the memory estimate (or TRAINSVC_MAX_PACK) is too high."""
    PACK_SPLITS.inc()


def observe_epoch(device: str, samples: int, seconds: float) -> None:
    TRAINING_SAMPLES.labels(device).inc(samples)
    if seconds > 0:
        TRAINING_SAMPLES_PER_SECOND.labels(device).set(samples / seconds)


# -- what the database knows, counted at scrape time ----------------------------------------------


class DatabaseCollector(Collector):
    """Jobs by status, queue depth, outbox backlog and attempt outcomes: a few GROUP BYs."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def collect(self) -> Iterator[Metric]:
        with self.session_factory(execution_options=READ_ONLY) as session:
            by_status: dict[str, int] = {
                status: count
                for status, count in session.execute(
                    select(Job.status, func.count()).group_by(Job.status)
                )
            }
            backlog = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.status == JobStatus.QUEUED, Job.published_at.is_(None))
            )
            outcomes: dict[str | None, int] = {
                outcome: count
                for outcome, count in session.execute(
                    select(JobAttempt.outcome, func.count()).group_by(JobAttempt.outcome)
                )
            }
            recovered = session.scalar(_recovered_attempts())

        jobs = GaugeMetricFamily("trainsvc_jobs", "Jobs by status.", labels=["status"])
        for status in JobStatus:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs
        yield GaugeMetricFamily(
            "trainsvc_queue_depth",
            "Jobs queued and waiting for a worker.",
            by_status.get(JobStatus.QUEUED, 0),
        )
        yield GaugeMetricFamily(
            "trainsvc_outbox_backlog",
            "Queued jobs whose message the broker has not accepted yet (published_at is NULL).",
            backlog or 0,
        )
        attempts = CounterMetricFamily(
            "trainsvc_attempts",
            "Ended attempts by outcome; `lost` means the worker vanished and its lease ran out.",
            labels=["outcome"],
        )
        for outcome in ("succeeded", "failed", "cancelled", "handed_back", "lost"):
            attempts.add_metric([outcome], outcomes.get(outcome, 0))
        yield attempts
        yield CounterMetricFamily(
            "trainsvc_attempts_recovered",
            "Lost or handed-back attempts whose job was claimed again by another attempt.",
            recovered or 0,
        )


def _recovered_attempts() -> Select[int]:
    later = aliased(JobAttempt)
    return (
        select(func.count())
        .select_from(JobAttempt)
        .where(
            JobAttempt.outcome.in_(("lost", "handed_back")),
            select(later.id)
            .where(later.job_id == JobAttempt.job_id, later.attempt == JobAttempt.attempt + 1)
            .exists(),
        )
    )


class _ThisProcess(Collector):
    """The default registry's metrics: this process's own, when there is no multiprocess dir."""

    def collect(self) -> Iterator[Metric]:
        yield from REGISTRY.collect()


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def render(session_factory: sessionmaker[Session]) -> bytes:
    """The exposition text for one scrape: process metrics (all processes') plus the database's."""
    registry = CollectorRegistry(auto_describe=False)
    directory = multiprocess_dir()
    if directory:
        MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ThisProcess())
    registry.register(DatabaseCollector(session_factory))
    return generate_latest(registry)
