"""The distributed farm's queue: Celery task messages in Redis, one queue per model.

CeleryJobQueue   what the API enqueues on: `dalle_farm.run_job(job_id)` by task name
create_celery_app(settings)   the Celery app and its delivery settings, shared with the
                              workers (worker/celery_app.py registers the task and explains
                              why each setting is what it is)
"""

from __future__ import annotations

import redis
from celery import Celery

from core.job import MODELS
from core.settings import Settings
from core.store import JobStore, StoreUnavailable

TASK_NAME = "dalle_farm.run_job"
# The priority lists kombu's Redis transport keeps per queue (its default priority_steps).
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for `settings` (a Redis broker; no result backend: results are in S3).

    The API sends tasks by name with it; worker.celery_app registers the task on it."""
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
    return app


class CeleryJobQueue:
    """core.queue.JobQueue over Celery: enqueue sends `dalle_farm.run_job(job_id)` to the
    queue of the job's model (looked up in `store` unless given); depth is the number of
    queued jobs in `store` (without a store: the Redis list lengths of the model queues)."""

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
        """Jobs waiting for a worker: the store's queued jobs.

        Not the queues' lengths: a job canceled or failed while queued leaves its message in
        its model's list until a worker takes and drops it (never, for a model that no worker
        serves), and such a job waits for nothing. Without a store, the messages waiting in
        the model queues (not those a worker holds)."""
        if self.store is not None:
            return self.store.count_queued()
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
