"""The embedded farm's worker: a loop over the SQLite queue that `dalle-farm serve` runs as its
child process (`python -m worker.embedded`).

It runs the same `run_job` as the Celery workers, on DALLE_FARM_MAX_JOBS threads that share
one engine, so their jobs decode in one batch. A job's queue row is leased for QUEUE_LEASE_S
and the lease extended while the job runs, so a worker that dies leaves the row to be leased
again; it is acknowledged (removed) only when run_job is DONE with it.

Once the model is loaded, a thread announces the model the worker serves (DALLE_FARM_MODEL)
with its heartbeat and fails queued jobs whose model no live worker serves, after
DALLE_FARM_UNSERVED_JOB_TIMEOUT_S (core/presence.py, core/unserved.py). A webhook dispatcher
(worker/webhooks.py) sends finished jobs' webhooks meanwhile.

SIGTERM or SIGINT: the worker stops announcing its model, the jobs running are handed back at
their next decoder step (queued again, their queue leases released) and the loop exits; the
next start resumes them from their last checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from core.presence import WorkerPresence
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import Storage, StorageUnavailable
from core.store import JobStore, StoreUnavailable
from worker.runner import Outcome, RenderEngine, lease_owner, run_job
from worker.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

# A dead worker's job can be leased again this long after its last extension.
QUEUE_LEASE_S = 20.0
IDLE_POLL_S = 0.5
# Pause before a job that could not be stored or recorded is tried again.
RETRY_PAUSE_S = 5.0
# A job another live worker holds is looked at again after this long.
DEFER_PAUSE_S = 5.0
# `dalle-farm serve` passes a file for the worker to create once its model is loaded.
READY_FILE_ENV = "DALLE_FARM_WORKER_READY_FILE"


def worker_name() -> str:
    return f"embedded@{socket.gethostname()}"


class _QueueLeaseKeeper:
    """Extends a leased queue row every QUEUE_LEASE_S / 4 seconds while a job runs."""

    def __init__(self, queue: SqliteJobQueue, job_id: str, owner: str) -> None:
        self.queue, self.job_id, self.owner = queue, job_id, owner
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="queue-lease", daemon=True)

    def __enter__(self) -> _QueueLeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(QUEUE_LEASE_S / 4):
            try:
                self.queue.extend(self.job_id, self.owner, QUEUE_LEASE_S)
            except StoreUnavailable as error:
                log.warning("job %s: could not extend its queue lease: %s", self.job_id, error)


def work(
    *,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    queue: SqliteJobQueue,
    engine: RenderEngine,
    stop: threading.Event,
    name: str | None = None,
    on_idle: Callable[[], None] | None = None,
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Run queued jobs on settings.max_jobs threads until `stop` is set; the jobs running then
    are handed back. Meanwhile the worker announces that it serves settings.model; `on_ready`
    is called once it has announced it."""
    name = name or worker_name()
    presence = WorkerPresence(
        store, name, [settings.model], unserved_timeout_s=settings.unserved_job_timeout_s
    )

    def loop() -> None:
        owner = lease_owner(name)  # one per thread
        while not stop.is_set():
            try:
                job_id = queue.lease(owner, QUEUE_LEASE_S)
            except StoreUnavailable as error:
                log.warning("cannot read the queue: %s", error)
                stop.wait(RETRY_PAUSE_S)
                continue
            if job_id is None:
                if on_idle is not None:
                    on_idle()
                stop.wait(IDLE_POLL_S)
                continue
            _run_one(job_id, settings, store, storage, queue, engine, name, owner, stop)

    threads = [
        threading.Thread(target=loop, name=f"job-{number}") for number in range(settings.max_jobs)
    ]
    presence.start()
    # Webhook deliveries of finished jobs, on threads of their own (worker/webhooks.py).
    webhooks = WebhookDispatcher(store, storage, settings, name=name).start()
    try:
        for thread in threads:
            thread.start()
        if on_ready is not None:
            on_ready()
        # The API refuses new jobs for the model as soon as the worker is stopping.
        while not stop.wait(1.0) and any(thread.is_alive() for thread in threads):
            pass
        presence.stop()
        for thread in threads:
            thread.join()
    finally:
        presence.stop()
        webhooks.stop()


def _run_one(
    job_id: str,
    settings: Settings,
    store: JobStore,
    storage: Storage,
    queue: SqliteJobQueue,
    engine: RenderEngine,
    name: str,
    owner: str,
    stop: threading.Event,
) -> None:
    try:
        with _QueueLeaseKeeper(queue, job_id, owner):
            outcome = run_job(
                job_id,
                store=store,
                storage=storage,
                engine=engine,
                worker_name=name,
                settings=settings,
                stop_requested=stop,
            )
    except (StorageUnavailable, StoreUnavailable) as error:
        # The row stays leased for a few seconds, then is taken again: a retry with a pause.
        log.warning("job %s will be retried: %s", job_id, error)
        _try(lambda: queue.extend(job_id, owner, RETRY_PAUSE_S))
        return
    if outcome is Outcome.DONE:
        _try(lambda: queue.ack(job_id))
    elif stop.is_set():
        _try(lambda: queue.release(job_id))
    else:  # another live worker holds it: look again in a while
        _try(lambda: queue.extend(job_id, owner, DEFER_PAUSE_S))


def _try(action: Callable[[], object]) -> None:
    try:
        action()
    except StoreUnavailable as error:  # the queue lease expires on its own
        log.warning("queue update failed: %s", error)


def main() -> int:
    """`python -m worker.embedded`: load the model, then work until SIGTERM or SIGINT."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s worker %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings.from_env()
    if not settings.is_embedded:
        log.error("DALLE_FARM_REDIS_URL is set: run `dalle-farm worker` for the distributed farm")
        return 2
    stop = threading.Event()

    def request_stop(signum: int, frame: FrameType | None) -> None:
        log.info("%s: handing back the current job and stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)

    from core.services import build_embedded_queue, build_storage, build_store
    from model.errors import ModelError
    from worker.engine import Engine

    store = build_store(settings)
    queue = build_embedded_queue(settings)
    try:
        storage = build_storage(settings, ensure_bucket=True)
        engine = Engine.load(settings)
    except (ModelError, StorageUnavailable, OSError) as error:
        log.error("the worker cannot start: %s", error)
        return 1

    def report_ready() -> None:
        log.info("worker %s ready (pid %d)", worker_name(), os.getpid())
        ready_file = os.environ.get(READY_FILE_ENV)
        if ready_file:
            Path(ready_file).write_text(worker_name() + "\n")

    try:
        work(
            settings=settings,
            store=store,
            storage=storage,
            queue=queue,
            engine=engine,
            stop=stop,
            on_ready=report_ready,
        )
    finally:
        engine.close()
        queue.close()
        store.close()
    log.info("worker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
