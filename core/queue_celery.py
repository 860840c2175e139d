"""The distributed farm's queue: Celery task messages in Redis, two queues per model, one per
priority lane: `dalle-farm.mini` (interactive) and `dalle-farm.mini.bulk` (bulk).

CeleryJobQueue   what the API enqueues on: `dalle_farm.run_job(job_id)` by task name
create_celery_app(settings)   the Celery app and its delivery settings, shared with the
                              workers (worker/celery_app.py registers the task and explains
                              why each setting is what it is)
lane_queues(settings)         the queues a worker of settings.model consumes, interactive first

Workers read the lanes in a fixed order (the Redis transport's queue_order_strategy
"priority": one BRPOP on the interactive list, then the bulk list), so a bulk message is taken
only when no interactive one waits; core/lanes.py has the whole rule (bulk jobs that waited
DALLE_FARM_BULK_MAX_WAIT_S are promoted), and why not Celery's numeric priorities.
"""

from __future__ import annotations

import redis
from celery import Celery

from core.job import MODELS
from core.lanes import BULK, INTERACTIVE, lane_of
from core.redis_url import celery_broker, redis_client
from core.settings import Settings
from core.store import JobStore, StoreUnavailable

TASK_NAME = "dalle_farm.run_job"
# The priority lists kombu's Redis transport keeps per queue (its default priority_steps).
_PRIORITY_STEPS = (0, 3, 6, 9)
_PRIORITY_SEP = "\x06\x16"


def lane_queue(settings: Settings, model: str | None = None, lane: str = INTERACTIVE) -> str:
    """The Celery queue of a model's lane: dalle-farm.mini, or dalle-farm.mini.bulk."""
    name = settings.queue_name(model)
    return f"{name}.{BULK}" if lane == BULK else name


def lane_queues(settings: Settings, model: str | None = None) -> list[str]:
    """The queues a worker of `model` (default settings.model) consumes, in the order it reads
    them: interactive first."""
    return [lane_queue(settings, model, INTERACTIVE), lane_queue(settings, model, BULK)]


def message_lists(settings: Settings) -> list[str]:
    """The Redis lists that hold the messages waiting in every model's lane queues (kombu's
    Redis transport keeps one list per queue and priority step)."""
    return [
        queue + (f"{_PRIORITY_SEP}{step}" if step else "")
        for model in MODELS
        for queue in lane_queues(settings, model)
        for step in _PRIORITY_STEPS
    ]


def create_celery_app(settings: Settings) -> Celery:
    """A Celery app for `settings` (a Redis broker; no result backend: results are in S3).

    The API sends tasks by name with it; worker.celery_app registers the task on it."""
    if settings.redis_url is None:
        raise ValueError("the distributed farm needs DALLE_FARM_REDIS_URL (a Redis URL)")
    visibility_timeout_s = settings.visibility_timeout_s
    # With sentinels, kombu's sentinel:// transport finds the master again after a failover.
    broker, sentinel_options = celery_broker(settings.redis_url)
    app = Celery("dalle_farm", broker=broker, set_as_current=False)
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
            # Read the consumed queues in the order given (interactive, then bulk), not round
            # robin: the priority lanes (core/lanes.py).
            "queue_order_strategy": "priority",
            **sentinel_options,
        },
    )
    app.conf.dalle_farm_settings = settings
    return app


class CeleryJobQueue:
    """core.queue.JobQueue over Celery: enqueue sends `dalle_farm.run_job(job_id)` to the
    queue of the job's model and lane (looked up in `store` unless given); depth is the number
    of queued jobs in `store` (without a store: the Redis list lengths of the model queues)."""

    def __init__(self, settings: Settings, store: JobStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self.app = create_celery_app(settings)
        assert settings.redis_url is not None
        self.redis = redis_client(settings.redis_url, socket_connect_timeout=5, socket_timeout=10)

    def enqueue(self, job_id: str, model: str | None = None, priority: str | None = None) -> None:
        """Send the job to its model's queue in its lane (`priority`). What is not given is read
        from the job's record in the store. Raises StoreUnavailable if Redis is down."""
        if (model is None or priority is None) and self.store is not None:
            record = self.store.get_job(job_id)
            if record is not None:
                model = model or str(record.params.get("model") or self.settings.model)
                priority = priority or lane_of(record.params)
        self.send(job_id, lane_queue(self.settings, model, priority or INTERACTIVE))

    def send(self, job_id: str, queue: str) -> None:
        """Send `dalle_farm.run_job(job_id)` to `queue`. Raises StoreUnavailable if Redis is
        down."""
        try:
            self.app.send_task(
                TASK_NAME,
                args=[job_id],
                queue=queue,
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
        try:
            pipeline = self.redis.pipeline(transaction=False)
            for name in message_lists(self.settings):
                pipeline.llen(name)
            return sum(int(length) for length in pipeline.execute())
        except redis.RedisError as error:
            raise StoreUnavailable(f"cannot read the queue depth from Redis: {error}") from error

    def depth_by_lane(self) -> dict[str, int]:
        """Jobs waiting per lane: the store's lane indexes (without a store that keeps them,
        the messages waiting in the lane queues)."""
        count = getattr(self.store, "count_queued_by_lane", None)
        if count is not None:
            counts: dict[str, int] = count()
            return counts
        names = {
            lane: [lane_queue(self.settings, model, lane) for model in MODELS]
            for lane in (INTERACTIVE, BULK)
        }
        try:
            pipeline = self.redis.pipeline(transaction=False)
            for lane in names:
                for name in names[lane]:
                    pipeline.llen(name)
            lengths = iter(int(length) for length in pipeline.execute())
        except redis.RedisError as error:
            raise StoreUnavailable(f"cannot read the queue depth from Redis: {error}") from error
        return {lane: sum(next(lengths) for _ in names[lane]) for lane in names}

    def check(self) -> None:
        """Raise StoreUnavailable unless the broker's Redis answers."""
        try:
            self.redis.ping()
        except redis.RedisError as error:
            raise StoreUnavailable(f"cannot reach the queue's Redis: {error}") from error

    def close(self) -> None:
        self.redis.close()
        self.app.close()
