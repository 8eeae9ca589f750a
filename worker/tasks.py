"""Celery tasks: thin. They take ids, not objects, and leave the work to worker.execution."""

import os
import uuid
from collections.abc import Callable

from celery import Celery, Task
from celery.exceptions import Reject

from app.core.broker import RUN_JOB_TASK
from worker.execution import WorkerContext, execute_job


def register_tasks(app: Celery, context_for: Callable[[str], WorkerContext]) -> None:
    @app.task(name=RUN_JOB_TASK, bind=True)
    def run_job(self: Task, job_id: str) -> str:
        """Run job `job_id`. Safe to deliver twice: only one delivery can claim the job."""
        worker_id = f"{self.request.hostname}#{os.getpid()}"
        outcome = execute_job(context_for(worker_id), uuid.UUID(job_id))
        if outcome == "shutting_down":
            # This worker is stopping and claimed nothing: the message goes back to the broker
            # for the next worker (acks_late makes a Reject re-queue it), so a job handed back
            # during the shutdown is not left waiting for the outbox's republish.
            raise Reject("this worker is shutting down", requeue=True)
        return outcome
