"""The distributed farm's Celery app: one task, `dalle_farm.run_job(job_id)`, over Redis.

    celery -A worker.celery_app worker -Q dalle-farm.mini --pool threads --concurrency 8

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
  other GPUs could take.
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

A run_job outcome of DEFERRED retries the task in a few seconds, forever (the lease holder is
alive, and will finish or die). StorageUnavailable retries with backoff up to
STORAGE_MAX_RETRIES times; then the job fails saying the results could not be stored.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis
from celery import Celery, Task, signals

from worker.job import JobStatus, utc_now
from worker.settings import Settings
from worker.storage import Storage, StorageUnavailable
from worker.store import JobStore, StoreUnavailable

if TYPE_CHECKING:
    from worker.engine import Engine

log = logging.getLogger(__name__)

TASK_NAME = "dalle_farm.run_job"
DEFER_COUNTDOWN_S = 5.0
STORAGE_MAX_RETRIES = 8
STORAGE_MAX_BACKOFF_S = 60.0
STORE_RETRY_COUNTDOWN_S = 5.0
# Seconds between a worker's "alive" heartbeats in the store (workers alive on /metrics).
WORKER_HEARTBEAT_S = 10.0
# The priority lists kombu's Redis transport keeps per queue (its default priority_steps).
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"
# Set by `dalle-farm worker` for each child: a file a pool process writes once its model is loaded.
READY_FILE_ENV = "DALLE_FARM_WORKER_READY_FILE"


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for `settings` (a Redis broker; no result backend: results are in S3)."""
    if settings.redis_url is None:
        raise ValueError("the distributed farm needs DALLE_FARM_REDIS_URL (a Redis URL)")
    visibility_timeout_s = settings.visibility_timeout_s
    app = Celery("dalle_farm", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_default_queue=settings.queue_name(),
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        # A pool process loads the model before it reports for work; Mega takes a while.
        worker_proc_alive_timeout=600.0,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            "visibility_timeout": visibility_timeout_s,
            # kombu sweeps unacknowledged messages every interval × throttle seconds (10 × 10 by
            # default): sweep every interval instead, at most a few seconds after the timeout.
            "unacked_restore_interval": max(1, min(10, visibility_timeout_s // 2)),
            "unacked_restore_throttle": 1,
        },
    )
    app.conf.dalle_farm_settings = settings

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
            from worker.engine import Engine
            from worker.services import build_storage, build_store

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
    pool = getattr(sender, "pool_cls", None)
    name = pool if isinstance(pool, str) else getattr(pool, "__module__", "")
    if _default_app is None or "thread" not in str(name).lower():
        return
    try:
        _load_and_report_ready(_default_app)
    except Exception:
        log.exception("the model could not be loaded; stopping this worker")
        raise SystemExit(1) from None


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
    ready_file = os.environ.get(READY_FILE_ENV)
    if ready_file:
        Path(ready_file).write_text(f"{os.getpid()}\n")


_heartbeat_stop = threading.Event()


@signals.worker_ready.connect
def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Beat the worker's heartbeat in the store (workers alive on /metrics)."""
    app = _default_app
    if app is None:
        return
    hostname = str(getattr(sender, "hostname", None) or "celery")
    settings: Settings = app.conf.dalle_farm_settings
    thread = threading.Thread(
        target=_beat, args=(settings, hostname), name="worker-heartbeat", daemon=True
    )
    thread.start()


@signals.worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    _heartbeat_stop.set()


def _beat(settings: Settings, hostname: str) -> None:
    from worker.services import build_store

    store = build_store(settings)
    try:
        while True:
            try:
                store.worker_heartbeat(hostname)
            except Exception as error:
                log.warning("worker heartbeat failed: %s", error)
            if _heartbeat_stop.wait(WORKER_HEARTBEAT_S):
                return
    finally:
        store.close()


# -- the queue the API enqueues on ------------------------------------------------------------


class CeleryJobQueue:
    """worker.queue.JobQueue over Celery: enqueue sends `dalle_farm.run_job(job_id)` to the
    queue of the job's model (looked up in `store` unless given); depth is the Redis list
    lengths of the model queues."""

    def __init__(self, settings: Settings, store: JobStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.app = create_celery_app(settings)
        assert settings.redis_url is not None
        self._redis = redis.Redis.from_url(
            settings.redis_url, socket_connect_timeout=5, socket_timeout=10
        )

    def enqueue(self, job_id: str, model: str | None = None) -> None:
        """Send the job to its model's queue. Raises StoreUnavailable if Redis is down."""
        if model is None and self.store is not None:
            record = self.store.get_job(job_id)
            if record is not None:
                model = str(record.params.get("model") or self.settings.model)
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id],
                queue=self.settings.queue_name(model),
                retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
            )
        except Exception as error:  # kombu's OperationalError and redis-py's errors alike
            raise StoreUnavailable(f"could not queue job {job_id}: {error}") from error

    def depth(self) -> int:
        """Messages waiting in the model queues (not those a worker holds)."""
        from worker.job import MODELS

        names = [
            self.settings.queue_name(model) + (f"{_PRIORITY_SEP}{step}" if step else "")
            for model in MODELS
            for step in _PRIORITY_STEPS
        ]
        try:
            pipeline = self._redis.pipeline(transaction=False)
            for name in names:
                pipeline.llen(name)
            return sum(int(length) for length in pipeline.execute())
        except redis.RedisError as error:
            raise StoreUnavailable(f"cannot read the queue depth from Redis: {error}") from error

    def check(self) -> None:
        """Raise StoreUnavailable unless the broker's Redis answers."""
        try:
            self._redis.ping()
        except redis.RedisError as error:
            raise StoreUnavailable(f"cannot reach the queue's Redis: {error}") from error

    def close(self) -> None:
        self._redis.close()
        self.app.close()


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
