"""The broker: task names and the Celery app's settings, shared by the worker (consumer) and
the outbox (publisher). Messages name tasks by string, so the publisher never imports worker/.
"""

from typing import Any

from celery import Celery
from kombu.transport import sqlalchemy as kombu_sqlalchemy
from sqlalchemy import Engine, create_engine

from app.core.config import Settings

RUN_JOB_TASK = "trainsvc.run_job"
QUEUE = "trainsvc"


def create_celery_app(settings: Settings) -> Celery:
    broker_url, transport = settings.broker_url, None
    if broker_url.startswith(SQL_PREFIX):
        # The same transport as `sqla+`, with the polling interval honoured (see SQLTransport).
        broker_url, transport = broker_url.removeprefix(SQL_PREFIX), f"{__name__}:SQLTransport"
    app = Celery("trainsvc", broker=broker_url, set_as_current=False)
    # Redis re-delivers a message left unacknowledged past its visibility timeout, to another
    # worker. Recovery here is the database's job (leases and the reaper), so the broker's
    # re-delivery must never fire for a live job: the timeout is the longest a job may run
    # (the wall-time cap) plus two leases of slack. A re-delivery that does happen is harmless
    # anyway: the claim is atomic and the duplicate finds the job taken.
    visibility_timeout = settings.max_wall_seconds + 2 * settings.lease_seconds
    app.conf.update(
        task_default_queue=QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        # Acknowledge after the task returns, and re-queue the message if the child process
        # dies: together with the database claim, a message is neither lost nor run twice.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A worker holds one message at a time, so a long job never sits on another's message.
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_publish_timeout_seconds,
        broker_transport=transport,
        broker_transport_options=_transport_options(settings, visibility_timeout),
    )
    return app


def _transport_options(settings: Settings, visibility_timeout: float) -> dict[str, object]:
    if settings.broker_url.startswith(SQL_PREFIX):
        return {
            # A SQL table has no way to wake a consumer: kombu polls it, by default once a
            # second, and takes one message per poll. That capped the embedded default at 60
            # job starts a minute, and a cancelled job's stale message cost a second too.
            "polling_interval": settings.broker_polling_seconds,
            # Handed to create_engine: wait for SQLite's lock (API and worker share the file)
            # instead of failing with "database is locked".
            "connect_args": {"timeout": 30},
        }
    return {
        "visibility_timeout": visibility_timeout,
        "socket_connect_timeout": settings.broker_publish_timeout_seconds,
        "socket_timeout": max(settings.broker_publish_timeout_seconds, 5.0),
    }


SQL_PREFIX = "sqla+"
# Transport options that are kombu's own, not create_engine's.
_KOMBU_OPTIONS = {
    "queue_tablename",
    "message_tablename",
    "callback",
    "errback",
    "max_retries",
    "interval_start",
    "interval_step",
    "interval_max",
    "retry_errors",
    "polling_interval",
}


class SQLChannel(kombu_sqlalchemy.Channel):
    def _engine_from_config(self) -> Engine:
        # kombu's own passes every option it does not know to create_engine, polling_interval
        # included, which create_engine refuses (TypeError): the interval could not be set.
        client = self.connection.client
        options: dict[str, Any] = {
            k: v for k, v in client.transport_options.items() if k not in _KOMBU_OPTIONS
        }
        return create_engine(client.hostname, **options)


class SQLTransport(kombu_sqlalchemy.Transport):
    """kombu's SQLAlchemy transport (`sqla+` URLs), with `polling_interval` usable."""

    Channel = SQLChannel
