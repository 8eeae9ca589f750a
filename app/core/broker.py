"""The broker: task names and the Celery app's settings, shared by the worker (consumer) and
the outbox (publisher). Messages name tasks by string, so the publisher never imports worker/.
"""

from celery import Celery

from app.core.config import Settings

RUN_JOB_TASK = "trainsvc.run_job"
QUEUE = "trainsvc"


def create_celery_app(settings: Settings) -> Celery:
    app = Celery("trainsvc", broker=settings.broker_url, set_as_current=False)
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
        broker_transport_options=_transport_options(settings, visibility_timeout),
    )
    return app


def _transport_options(settings: Settings, visibility_timeout: float) -> dict[str, object]:
    if settings.broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands its options to create_engine: wait for SQLite's
        # lock (API and worker share the file) instead of failing with "database is locked".
        return {"connect_args": {"timeout": 30}}
    return {
        "visibility_timeout": visibility_timeout,
        "socket_connect_timeout": settings.broker_publish_timeout_seconds,
        "socket_timeout": max(settings.broker_publish_timeout_seconds, 5.0),
    }
