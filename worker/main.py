"""Starting a worker: the Celery app and its tasks, one process per GPU, the sweeper, shutdown."""

import ctypes
import logging
import multiprocessing
import os
import socket
import threading
import time
import uuid
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_ready, worker_shutting_down

from app.core import lifecycle, webhooks
from app.core.broker import QUEUE, create_celery_app
from app.core.config import Settings
from app.core.db import create_db_engine, create_session_factory, transaction
from app.core.observability import heartbeats
from app.core.observability.logs import resolved_format
from app.core.outbox import Dispatcher
from worker.execution import WorkerContext, shutdown_requested, with_db_retry
from worker.tasks import register_tasks

logger = logging.getLogger(__name__)


def visible_gpus() -> int:
    import torch  # counting devices does not initialize CUDA, so forking afterwards is safe

    return torch.cuda.device_count()


def preload() -> None:
    """Import, once and before the pool forks, what a pool process's first job would import
    itself: 2.4 s on the 2-core machine, 31% of the worker's samples over a packed 32-job MLP
    study (py-spy). Nothing imported here starts a thread, so forking afterwards is safe."""
    import torch

    from worker.training.data import import_loaders

    import_loaders()
    # Optimizer.__init__ imports torch._dynamo on its first call (about a second).
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])


class ProcessContexts:
    """One WorkerContext per process, built after the pool forks (engines must not cross a fork)."""

    def __init__(self, settings: Settings, celery: Celery) -> None:
        self.settings = settings
        self.celery = celery
        self._pid: int | None = None
        self._context: WorkerContext | None = None

    def get(self, worker_id: str) -> WorkerContext:
        if self._context is None or self._pid != os.getpid():
            if self._context is not None:
                # A pool process forked from a parent that had connected: forget the parent's
                # connections without closing them, or closing them here would cut the
                # parent's sessions (SQLAlchemy's guidance for engines across a fork).
                engine = self._context.session_factory.kw["bind"]
                engine.dispose(close=False)
            factory = create_session_factory(create_db_engine(self.settings.database_url))
            self._context = WorkerContext(
                self.settings,
                factory,
                Dispatcher(self.celery, factory, self.settings.publish_pause_seconds),
                worker_id,
            )
            self._pid = os.getpid()
        return self._context


class Sweeper(threading.Thread):
    """Reaps expired leases, publishes the outbox and sends due webhooks, every
    settings.sweep_seconds.

    Runs in the worker's main process. Several workers sweeping at once is safe: reaping locks
    rows with SKIP LOCKED, and a job published twice is claimed once.
    """

    def __init__(self, context: WorkerContext) -> None:
        super().__init__(name="sweeper", daemon=True)
        self.context = context
        self.stopped = threading.Event()
        self.webhook_policy = webhooks.policy_from(context.settings)

    def run(self) -> None:
        settings = self.context.settings
        while not self.stopped.wait(settings.sweep_seconds):
            try:
                self.sweep()
            except Exception:
                logger.exception("sweep failed; trying again in %ss", settings.sweep_seconds)

    def sweep(self) -> None:
        settings = self.context.settings
        with transaction(self.context.session_factory) as session:
            requeued = lifecycle.reap_expired_leases(session, settings.max_attempts)
            heartbeats.touch(session, self.context.worker_id, socket.gethostname())
        if requeued:
            logger.warning("re-queued %d job(s) whose worker was lost: %s", len(requeued), requeued)
        self.context.dispatcher.publish_pending(settings.republish_after_seconds)
        # Last: a slow receiver (up to webhook_timeout_seconds each) must not delay the above.
        webhooks.send_due(self.context.session_factory, self.webhook_policy)


def pool_size(settings: Settings, requested: int | None = None) -> int:
    """Training processes: --concurrency, else TRAINSVC_WORKER_CONCURRENCY, else one per GPU
    (at least one: the CPU)."""
    return requested or settings.worker_concurrency or max(1, visible_gpus())


def oversubscription(concurrency: int) -> str | None:
    """Why the pool's threads would outnumber the cores, or None. Each pool process takes
    cores / processes threads unless OMP_NUM_THREADS says otherwise; an OMP_NUM_THREADS meant
    for one process, kept with several, makes their threads spin against each other (2 threads
    in each of 2 processes on 2 cores: 23 to 41 s a small CNN job of 8 epochs, against 6 to 10 s
    with one thread each; benchmarks/packed_sweep.py --service --concurrency 2)."""
    cores = os.cpu_count() or 1
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    if concurrency < 2 or threads * concurrency <= cores:
        return None
    return (
        f"OMP_NUM_THREADS={threads} in each of {concurrency} training processes is "
        f"{threads * concurrency} threads for {cores} cores: CPU training runs several times "
        f"slower; unset it (each process then takes {max(1, cores // concurrency)}) or lower it"
    )


# How often a pool process looks whether its node has begun to stop.
NODE_STOP_POLL_SECONDS = 0.1


def _stop_when_node_stops(node_stopping: "ctypes.c_bool") -> None:
    # Polled, not waited on: a multiprocessing.Event's set() waits for every process sleeping
    # in its wait() to wake, and one that died there (SIGKILL, the OOM-killer) never does: the
    # node's shutdown then hung before asking its jobs to hand back.
    while not node_stopping.value:
        time.sleep(NODE_STOP_POLL_SECONDS)
    shutdown_requested.set()


def run_worker(settings: Settings, concurrency: int | None = None) -> None:
    celery = create_celery_app(settings)
    contexts = ProcessContexts(settings, celery)
    register_tasks(celery, contexts.get)
    gpus = visible_gpus()
    concurrency = pool_size(settings, concurrency)
    if (warning := oversubscription(concurrency)) is not None:
        logger.warning(warning)
    preload()
    # A unique node name: two workers on one host must not share lease owners.
    node = f"trainsvc-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"

    # Set by this main process when it starts shutting down. The pool's processes, forked
    # after this line, share it: from then on they claim nothing (a job handed back during the
    # shutdown is published again, and this node's own pool must not take it back) and a job
    # they are training hands itself back at its next batch.
    node_stopping = multiprocessing.get_context("fork").RawValue(ctypes.c_bool, False)

    @worker_process_init.connect(weak=False)
    def _place_process(**_: Any) -> None:
        import torch
        from billiard.process import current_process

        threading.Thread(
            target=_stop_when_node_stops, args=(node_stopping,), name="node-stopping", daemon=True
        ).start()

        if gpus:
            # One training process per GPU: pool child i trains on GPU i.
            torch.cuda.set_device(current_process().index % gpus)
        # Models are built, and features cast (execution.load_data), in torch's default dtype.
        torch.set_default_dtype(getattr(torch, settings.training_dtype))
        # The pool's processes share the host's cores: each taking all of them makes OpenMP
        # threads spin against each other (80x slower epochs were measured with 2 on 2 cores).
        # An operator's OMP_NUM_THREADS wins. The thread count changes the order of float
        # reductions, so CPU results are bit-exact between processes with the same count.
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // concurrency))

    sweeper: list[Sweeper] = []

    @worker_ready.connect(weak=False)
    def _start_sweeper(**_: Any) -> None:
        thread = Sweeper(contexts.get(f"{node}#{os.getpid()}"))
        thread.start()
        sweeper.append(thread)

    handing_back = threading.Event()

    @worker_shutting_down.connect(weak=False)
    def _hand_back_jobs(**_: Any) -> None:
        # Celery's warm shutdown would wait for a multi-hour job; instead ask this node's
        # running jobs to come back now. Each stops at its next batch, hands its job back to
        # the queue (resuming from its last checkpoint elsewhere), and the shutdown completes.
        # Celery runs this inside its SIGTERM handler, and a second SIGTERM can interrupt it
        # (PR_SET_PDEATHSIG sends one each time a dying `up`'s threads exit): run again inside
        # itself, it waited for ever on the database lock its first run holds, and the worker
        # outlived `up`. Once is enough. (A threading.Event: its is_set takes no lock.)
        if handing_back.is_set():
            return
        handing_back.set()
        node_stopping.value = True
        for thread in sweeper:
            thread.stopped.set()
        context = contexts.get(f"{node}#{os.getpid()}")
        try:
            count = with_db_retry(context, lambda s: lifecycle.request_handback(s, f"{node}#"))
            logger.warning("shutting down: asked %d running job(s) to hand back", count)
        except Exception:
            logger.exception("could not ask jobs to hand back; their leases will expire instead")

    celery.worker_main(celery_arguments(settings, concurrency, node))


def celery_arguments(settings: Settings, concurrency: int, node: str) -> list[str]:
    """The `celery worker` command line run_worker starts."""
    # Celery prints a banner of some 18 lines to standard output at each start; where logs are
    # JSON lines (a container's log collector reads both streams) it is left out.
    quiet = ["--quiet"] if resolved_format(settings) == "json" else []
    return [
        *quiet,
        "worker",
        f"--concurrency={concurrency}",
        "--pool=prefork",
        f"--hostname={node}",
        f"--loglevel={settings.log_level}",
        f"--queues={QUEUE}",
        "--without-gossip",
        "--without-mingle",
    ]
