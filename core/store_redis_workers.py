"""Workers on Redis, a part of RedisJobStore (core/store_redis.py): heartbeats, the models
each worker serves, and when each model was last served.

    {p}:workers             sorted set worker → when its heartbeat expires (Redis' clock)
    {p}:worker-models       hash worker → the models it announced, comma-separated
    {p}:models-last-served  hash model → when a worker last announced it or stopped serving it

A worker is alive while its expiry is in the future. Entries long expired
(HEARTBEAT_RETENTION_S) are deleted by the next heartbeat of any worker.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from core.store import (
    HEARTBEAT_RETENTION_S,
    WORKER_ALIVE_S,
    check_heartbeat_ttl,
    check_models,
    check_worker,
)
from core.store_redis_base import RedisBackend, text
from core.store_redis_lua import HEARTBEAT, SERVED_MODELS, WORKER_GONE, WORKERS_ALIVE


class RedisWorkerRegistry(RedisBackend):
    """The workers' half of the JobStore protocol on Redis.

    `worker_alive_s`: how long a heartbeat lives when the worker gives no ttl_s.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        prefix: str = "dalle-farm",
        *,
        worker_alive_s: float = WORKER_ALIVE_S,
        confirm_replicas: int = 0,
    ) -> None:
        super().__init__(url_or_client, prefix, confirm_replicas=confirm_replicas)
        self._worker_alive_s = check_heartbeat_ttl(worker_alive_s, WORKER_ALIVE_S)

    @property
    def _worker_keys(self) -> list[str]:
        return [self._key("workers"), self._key("worker-models"), self._key("models-last-served")]

    def worker_heartbeat(
        self, worker: str, models: Iterable[str] | None = None, ttl_s: float | None = None
    ) -> None:
        """`worker` is alive for `ttl_s` more seconds; with `models`, it serves those."""
        name = check_worker(worker)
        ttl = check_heartbeat_ttl(ttl_s, self._worker_alive_s)
        announced = None if models is None else ",".join(check_models(models))
        with self._errors():
            self._script(HEARTBEAT)(
                keys=self._worker_keys,
                args=[
                    name,
                    ttl,
                    HEARTBEAT_RETENTION_S,
                    "0" if announced is None else "1",
                    announced or "",
                ],
            )

    def worker_gone(self, worker: str) -> None:
        """Remove the worker at once: not alive, serving nothing."""
        with self._errors():
            self._script(WORKER_GONE)(keys=self._worker_keys, args=[check_worker(worker)])

    def served_models(self) -> frozenset[str]:
        """The models some live worker announced."""
        with self._errors():
            lists = self._script(SERVED_MODELS)(keys=self._worker_keys[:2])
        return frozenset(
            model for models in lists if models for model in text(models).split(",") if model
        )

    def models_last_served(self) -> dict[str, float]:
        """Per model: when a worker last announced it, or stopped serving it (Redis' clock)."""
        with self._errors():
            seen = self._client.hgetall(self._key("models-last-served"))
        return {text(model): float(text(at)) for model, at in seen.items()}

    def _workers_alive(self, client: redis.Redis | None = None) -> object:
        """ZCOUNT of the live workers (queued on `client` when it is a pipeline)."""
        return self._script(WORKERS_ALIVE)(keys=[self._key("workers")], client=client)
