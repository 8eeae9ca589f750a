"""The sending side of the outbox: publish "run job X" for jobs committed as queued.

A job is committed before it is published, so a broker outage never loses one: publishing
that fails leaves published_at NULL, and the worker's sweeper publishes it once the broker
answers again. A duplicate message is harmless (the claim is atomic).
"""

import logging
import uuid
from collections.abc import Iterable

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from app.db import transaction
from app.jobs import attempts
from worker.celery_app import RUN_JOB_TASK

logger = logging.getLogger(__name__)


class Dispatcher:
    def __init__(self, celery: Celery, session_factory: sessionmaker[Session]) -> None:
        self.celery = celery
        self.session_factory = session_factory

    def publish(self, job_ids: Iterable[uuid.UUID]) -> list[uuid.UUID]:
        """Publish each job; returns those the broker accepted (and marks them published)."""
        sent = []
        for job_id in job_ids:
            try:
                self.celery.send_task(RUN_JOB_TASK, args=[str(job_id)], retry=False)
            except Exception as exc:  # the broker is down: the outbox keeps the job for later
                logger.warning("broker unavailable, job %s stays in the outbox: %s", job_id, exc)
                break
            sent.append(job_id)
        if sent:
            with transaction(self.session_factory) as session:
                attempts.mark_published(session, sent)
        return sent

    def publish_pending(self, republish_after_seconds: float) -> list[uuid.UUID]:
        with transaction(self.session_factory) as session:
            pending = attempts.jobs_to_publish(session, republish_after_seconds)
        return self.publish(pending)

    def broker_reachable(self) -> bool:
        try:
            with self.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
            return True
        except Exception:
            return False
