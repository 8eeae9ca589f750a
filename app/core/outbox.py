"""The sending side of the outbox: publish "run job X" for jobs committed as queued.

A job is committed before it is published, so a broker outage never loses one: publishing
that fails leaves published_at NULL, and the worker's sweeper publishes it once the broker
answers again. A duplicate message is harmless (the claim is atomic). While the broker is
down, publishing pauses for a few seconds after each failure, so a submit stays fast.
"""

import logging
import time
import uuid
from collections.abc import Iterable

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app.core import lifecycle
from app.core.broker import RUN_JOB_TASK
from app.core.db import transaction

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(
        self,
        celery: Celery,
        session_factory: sessionmaker[Session],
        pause_seconds: float = 5.0,
    ) -> None:
        self.celery = celery
        self.session_factory = session_factory
        # After a failed publish, leave the broker alone this long: a refused connection costs
        # about 2 s (kombu's connect and redis-py's retries), and every submit would pay it.
        self.pause_seconds = pause_seconds
        self._paused_until = 0.0

    def publish(self, job_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        """Publish each job; returns those the broker accepted (and marks them published)."""
        if time.monotonic() < self._paused_until:
            return []  # the broker was down a moment ago; the sweeper publishes these later
        sent = []
        for job_id in job_ids:
            try:
                self.celery.send_task(RUN_JOB_TASK, args=[str(job_id)], retry=False)
            except Exception as exc:  # the broker is down: the outbox keeps the job for later
                logger.warning("broker unavailable, job %s stays in the outbox: %s", job_id, exc)
                self._paused_until = time.monotonic() + self.pause_seconds
                break
            sent.append(job_id)
        if sent:
            with transaction(self.session_factory) as session:
                lifecycle.mark_published(session, sent)
        return sent

    def publish_pending(self, republish_after_seconds: float) -> list[uuid.UUID]:
        with transaction(self.session_factory, write=False) as session:
            pending = lifecycle.jobs_to_publish(session, republish_after_seconds)
        return self.publish(pending)

    def broker_reachable(self) -> bool:
        # As long as a publish waits (TRAINSVC_BROKER_PUBLISH_TIMEOUT_SECONDS): a broker that
        # answers a publish in time is ready, and one that does not is not.
        timeout = self.celery.conf.broker_connection_timeout
        try:
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=timeout)
            return True
        except Exception:
            return False
