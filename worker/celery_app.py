"""The distributed farm's Celery app: one task, `dalle_farm.run_job(job_id)`, over Redis.

    celery -A worker.celery_app worker -Q dalle-farm.mini,dalle-farm.mini.bulk \
        --pool threads --concurrency 8

(`dalle-farm worker` starts one such process per GPU.) The app is built from Settings on first
use, not at import, so importing this module reads no environment and loads no model.

One process per GPU holds the model once; its thread pool runs up to DALLE_FARM_MAX_JOBS tasks
at a time, and each task's run_job hands its job to the process's batching engine
(worker/batching.py), which decodes all of them together. The prefork pool still works (one
model per pool process, one job each), but only the thread pool batches.

Delivery guarantees, and why each setting is what it is:

- acks_late: a job's message is acknowledged only after run_job returns, that is after every
  result object is stored and the job recorded as finished. A worker that dies (kill -9, out
  of memory) takes no message with it: they all come back after the visibility timeout.
- reject_on_worker_lost: with the prefork pool, when a pool process dies mid-job its worker
  requeues the message at once.
- worker_prefetch_multiplier = 1: a worker reserves at most as many messages as it has threads
  (DALLE_FARM_MAX_JOBS), all of them running in the batch, so it never sits on a backlog that
  other GPUs could take, nor on bulk messages reserved before interactive ones arrived.
- priority lanes (core/lanes.py): a worker consumes its model's interactive queue, then its
  bulk queue (`-Q dalle-farm.mini,dalle-farm.mini.bulk`, in that order, with the transport's
  queue_order_strategy "priority"), so a free job slot takes an interactive job whenever one
  waits. A BulkPromoter thread moves the oldest bulk job to the interactive queue once it has
  waited DALLE_FARM_BULK_MAX_WAIT_S (one at a time); its bulk message, taken later, finds the
  job running or finished and is dropped by run_job. A QueueAudit thread sends a message
  again for any unfinished job whose message a Redis failover dropped (core/queue_audit.py).
- visibility_timeout = DALLE_FARM_VISIBILITY_TIMEOUT_S (default 60): when the whole worker is
  killed, its unacknowledged message stays in Redis, and Redis hands it to another worker after
  this many seconds (plus up to `unacked_restore_interval`), so a vanished worker's job is
  running again within about two minutes, not Redis's default hour. A job that runs longer than
  the timeout may be delivered a second time while it runs: harmless, because the second
  delivery finds the first worker's live lease and is deferred (retried every few seconds) until
  the job is finished, and then does nothing. In a batch a job takes longer than alone (every
  step serves all jobs), so long batches make such duplicate deliveries more common, never
  duplicate work. A redelivered job resumes from its last checkpoint (every 32 tokens), so a
  worker's death costs at most 32 steps of each of its jobs, plus the timeout.

Presence: once the worker consumes (with the thread pool, its model is loaded before that), it
announces the model it serves, and only then tells `dalle-farm worker` that it is ready; a
thread goes on announcing it with the worker's heartbeat every WORKER_HEARTBEAT_S, and sweeps
queued jobs whose model no live worker serves (core/presence.py, core/unserved.py), and a
webhook dispatcher sends finished jobs' webhooks (worker/webhooks.py). When a
shutdown begins (SIGTERM: the jobs running are finished first) it stops announcing at once, so
the API refuses new jobs for a model whose last worker is leaving.

A run_job outcome of DEFERRED retries the task in a few seconds, forever (the lease holder is
alive, and will finish or die). StorageUnavailable retries with backoff up to
STORAGE_MAX_RETRIES times; then the job fails saying the results could not be stored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from celery import Celery, Task, signals

from core.job import JobStatus, utc_now
from core.lanes import BULK, INTERACTIVE, BulkPromoter
from core.periodic import Periodic
from core.presence import WorkerPresence
from core.queue_celery import TASK_NAME, lane_queue
from core.queue_celery import create_celery_app as create_queue_app
from core.settings import Settings
from core.storage import Storage, StorageUnavailable
from core.store import JobStore, StoreUnavailable

if TYPE_CHECKING:
    from worker.engine import Engine
    from worker.webhooks import WebhookDispatcher

log = logging.getLogger(__name__)

DEFER_COUNTDOWN_S = 5.0
STORAGE_MAX_RETRIES = 8
STORAGE_MAX_BACKOFF_S = 60.0
STORE_RETRY_COUNTDOWN_S = 5.0
# Set by `dalle-farm worker` for each child: a file a pool process writes once its model is loaded.
READY_FILE_ENV = "DALLE_FARM_WORKER_READY_FILE"


def create_celery_app(settings: Settings) -> Celery:
    """The farm's Celery app (core.queue_celery) with the job task registered."""
    app = create_queue_app(settings)

    @app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True)
    def run_job_task(self: Task, job_id: str, storage_failures: int = 0) -> str:
        return _run_task(self, settings, job_id, storage_failures)

    return app


# -- the task ----------------------------------------------------------------------------------


@dataclass
class WorkerResources:
    """What a pool process keeps for its whole life: the model and the backends."""

    engine: Engine
    store: JobStore
    storage: Storage


# Per process id: a pool process forked from one that had them must build its own.
_resources: dict[int, WorkerResources] = {}
_resources_lock = threading.Lock()


def worker_resources(settings: Settings) -> WorkerResources:
    """This process's resources, built (model loaded) on first use.

    Raises model.errors.ModelError (or OSError) when the model cannot be loaded.
    """
    with _resources_lock:
        resources = _resources.get(os.getpid())
        if resources is None:
            from core.services import build_storage, build_store
            from worker.engine import Engine

            engine = Engine.load(settings)
            log.info("model ready: %s, weights %s", engine.model_name, engine.weights["sha256"])
            resources = WorkerResources(engine, build_store(settings), build_storage(settings))
            _resources[os.getpid()] = resources
        return resources


def _run_task(task: Task, settings: Settings, job_id: str, storage_failures: int) -> str:
    from worker.runner import Outcome, run_job

    try:
        resources = worker_resources(settings)
    except Exception as error:
        # Not the job's fault: leave it for a worker that can load the model.
        log.error("cannot run job %s: the model could not be loaded: %s", job_id, error)
        raise task.retry(exc=error, countdown=STORE_RETRY_COUNTDOWN_S, max_retries=None) from error
    worker_name = str(task.request.hostname or "celery")
    try:
        outcome = run_job(
            job_id,
            store=resources.store,
            storage=resources.storage,
            engine=resources.engine,
            worker_name=worker_name,
            settings=settings,
        )
    except StorageUnavailable as error:
        # Counted apart from task.request.retries, which deferrals increase too.
        failures = storage_failures + 1
        if failures > STORAGE_MAX_RETRIES:
            _fail(
                resources.store,
                job_id,
                f"the results could not be stored after {failures} tries: {error}",
            )
            return Outcome.DONE.value
        # Under the visibility timeout: a held retry must not be redelivered elsewhere too.
        cap = min(STORAGE_MAX_BACKOFF_S, settings.visibility_timeout_s / 2)
        countdown = min(cap, 2.0 * 2 ** (failures - 1))
        raise task.retry(
            args=[job_id],
            kwargs={"storage_failures": failures},
            exc=error,
            countdown=countdown,
            max_retries=None,
        ) from error
    except StoreUnavailable as error:
        log.warning("job %s: the store is unavailable, retrying: %s", job_id, error)
        raise task.retry(exc=error, countdown=STORE_RETRY_COUNTDOWN_S, max_retries=None) from error
    if outcome is Outcome.DEFERRED:
        countdown = min(DEFER_COUNTDOWN_S, settings.visibility_timeout_s / 2)
        raise task.retry(countdown=countdown, max_retries=None)
    return outcome.value


def _fail(store: JobStore, job_id: str, error: str) -> None:
    log.error("job %s failed: %s", job_id, error)
    store.transition(job_id, JobStatus.FAILED, error=error, finished_at=utc_now())


# -- the worker process's signals -------------------------------------------------------------


@signals.worker_init.connect
def _load_model_in_threads_worker(sender: Any = None, **_: Any) -> None:
    """With the thread pool, load the model in the worker process itself before it consumes."""
    global _ready_once_announced
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if _default_app is None or "thread" not in str(name).lower():
        return
    try:
        worker_resources(_default_app.conf.dalle_farm_settings)
    except Exception:
        log.exception("the model could not be loaded; stopping this worker")
        raise SystemExit(1) from None
    # Ready once its model is announced too (at worker_ready): the API then takes its jobs.
    _ready_once_announced = True


@signals.worker_process_init.connect
def _load_model_in_pool_process(**_: Any) -> None:
    """With the prefork pool, load the model as each pool process starts."""
    if _default_app is None:
        return
    try:
        _load_and_report_ready(_default_app)
    except Exception:
        log.exception("the model could not be loaded; stopping this worker")
        os.kill(os.getppid(), signal.SIGTERM)  # a warm shutdown of the main process
        raise


def _load_and_report_ready(app: Celery) -> None:
    """Load the model so that it is resident before the first job; then tell
    `dalle-farm worker` that this worker is ready.

    A worker that cannot load its model must not take jobs (it would fail or bounce every job
    of the farm): the callers stop it instead, and `dalle-farm worker` reports it.
    """
    worker_resources(app.conf.dalle_farm_settings)
    _report_ready()


def _report_ready() -> None:
    ready_file = os.environ.get(READY_FILE_ENV)
    if ready_file:
        Path(ready_file).write_text(f"{os.getpid()}\n")


_presence: WorkerPresence | None = None
_presence_lock = threading.Lock()
_ready_once_announced = False


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Announce the worker's model in the store, with its heartbeat."""
    global _presence
    app = _default_app
    if app is None:
        return
    hostname = str(getattr(sender, "hostname", None) or "celery")
    settings: Settings = app.conf.dalle_farm_settings
    models = models_to_announce(app, settings)
    from core.services import build_store

    with _presence_lock:
        if _presence is not None:
            return
        _presence = WorkerPresence(
            build_store(settings),
            hostname,
            models,
            unserved_timeout_s=settings.unserved_job_timeout_s,
        ).start()
        _start_webhooks(settings, hostname)
        _start_housekeeping(app, settings, models, hostname)
    log.info("worker %s serves %s", hostname, ", ".join(models) or "no model (see --queues)")
    consumed = app.amqp.queues.consume_from
    if models and consumed is not None and lane_queue(settings, lane=BULK) not in consumed:
        log.warning(
            "worker %s does not take bulk jobs (%s is not in --queues): they run here only "
            "once promoted, after DALLE_FARM_BULK_MAX_WAIT_S",
            hostname,
            lane_queue(settings, lane=BULK),
        )
    if _ready_once_announced:
        _report_ready()


def models_to_announce(app: Celery, settings: Settings) -> list[str]:
    """The model this worker renders, if it takes jobs from that model's (interactive) queue.
    A worker of the bulk queue alone does not announce it: the API would accept interactive
    jobs that no worker takes."""
    consumed = app.amqp.queues.consume_from
    return [settings.model] if consumed is None or settings.queue_name() in consumed else []


@signals.worker_shutting_down.connect
def _on_worker_shutting_down(**_: Any) -> None:
    # Sent from a signal handler: only flag it; the presence thread leaves the store itself.
    presence = _presence
    if presence is not None:
        presence.stop(timeout_s=0)


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    global _presence
    with _presence_lock:
        presence, _presence = _presence, None
    if presence is not None:
        presence.stop()
        presence.store.close()
    _stop_webhooks()
    _stop_housekeeping()


# -- housekeeping threads: promoting overdue bulk jobs (core/lanes.py) and the queue audit
# after a Redis failover (core/queue_audit.py) --------------------------------------------------

_housekeeping: list[Periodic] = []
_housekeeping_closers: list[Callable[[], None]] = []


def _start_housekeeping(app: Celery, settings: Settings, models: list[str], name: str) -> None:
    if not models or settings.redis_url is None:
        return
    from core.queue_audit import QueueAudit
    from core.queue_celery import message_lists
    from core.redis_url import redis_client
    from core.store_redis import RedisJobStore

    def send(job_id: str, model: str | None = None, lane: str = INTERACTIVE) -> None:
        app.send_task(TASK_NAME, args=[job_id], queue=lane_queue(settings, model, lane))

    store = RedisJobStore(settings.redis_url)
    broker = redis_client(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)
    _housekeeping.extend(
        [
            BulkPromoter(store, models, settings.bulk_max_wait_s, send).start(),
            QueueAudit(store, broker, message_lists(settings), send, name=name).start(),
        ]
    )
    _housekeeping_closers.extend([store.close, broker.close])


def _stop_housekeeping() -> None:
    while _housekeeping:
        _housekeeping.pop().stop()
    while _housekeeping_closers:
        _housekeeping_closers.pop()()


# -- webhook deliveries (worker/webhooks.py), on threads of their own ---------------------------

_webhooks: WebhookDispatcher | None = None


def _start_webhooks(settings: Settings, hostname: str) -> None:
    global _webhooks
    from core.services import build_storage, build_store
    from worker.webhooks import WebhookDispatcher

    try:
        _webhooks = WebhookDispatcher(
            build_store(settings), build_storage(settings), settings, name=hostname
        ).start()
    except Exception:  # rendering goes on; another worker's dispatcher sends them
        log.exception("the webhook dispatcher could not start")


def _stop_webhooks() -> None:
    global _webhooks
    webhooks, _webhooks = _webhooks, None
    if webhooks is not None:
        webhooks.stop()
        webhooks.store.close()


# -- `celery -A worker.celery_app` ------------------------------------------------------------

_default_app: Celery | None = None


def __getattr__(name: str) -> Any:
    """`app` (what `celery -A worker.celery_app` looks for): built from the environment once."""
    global _default_app
    if name == "app":
        if _default_app is None:
            _default_app = create_celery_app(Settings.from_env())
        return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
