"""Workers in the embedded farm's SQLite file, a part of SqliteJobStore (core/store_sqlite.py):
heartbeats (the `workers` table), the models each worker serves, and when each model was last
served (`models_last_served`).

A worker is alive while its expires_at is in the future. Entries long expired
(HEARTBEAT_RETENTION_S) are deleted by the next heartbeat of any worker.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from core.store import (
    HEARTBEAT_RETENTION_S,
    WORKER_ALIVE_S,
    check_heartbeat_ttl,
    check_models,
    check_worker,
)
from core.store_sqlite_db import SqliteBackend

_MARK_SERVED = (
    "INSERT INTO models_last_served (model, seen_at) VALUES (?, ?)"
    " ON CONFLICT (model) DO UPDATE SET seen_at = excluded.seen_at"
)


class SqliteWorkerRegistry(SqliteBackend):
    """The workers' half of the JobStore protocol on SQLite.

    `worker_alive_s`: how long a heartbeat lives when the worker gives no ttl_s.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, worker_alive_s: float = WORKER_ALIVE_S
    ) -> None:
        super().__init__(path)
        self._worker_alive_s = check_heartbeat_ttl(worker_alive_s, WORKER_ALIVE_S)

    def worker_heartbeat(
        self, worker: str, models: Iterable[str] | None = None, ttl_s: float | None = None
    ) -> None:
        """`worker` is alive for `ttl_s` more seconds; with `models`, it serves those."""
        name = check_worker(worker)
        ttl = check_heartbeat_ttl(ttl_s, self._worker_alive_s)
        announced = None if models is None else check_models(models)
        now = time.time()
        with self._db.transaction() as connection:
            if announced is None:
                connection.execute(
                    "INSERT INTO workers (worker, expires_at) VALUES (?, ?)"
                    " ON CONFLICT (worker) DO UPDATE SET expires_at = excluded.expires_at",
                    (name, now + ttl),
                )
            else:
                connection.execute(
                    "INSERT INTO workers (worker, models, expires_at) VALUES (?, ?, ?)"
                    " ON CONFLICT (worker) DO UPDATE"
                    " SET models = excluded.models, expires_at = excluded.expires_at",
                    (name, ",".join(announced), now + ttl),
                )
                connection.executemany(_MARK_SERVED, [(model, now) for model in announced])
            connection.execute(
                "DELETE FROM workers WHERE expires_at < ?", (now - HEARTBEAT_RETENTION_S,)
            )

    def worker_gone(self, worker: str) -> None:
        """Remove the worker at once: not alive, serving nothing."""
        name = check_worker(worker)
        now = time.time()
        with self._db.transaction() as connection:
            row = connection.execute(
                "SELECT models FROM workers WHERE worker = ?", (name,)
            ).fetchone()
            if row is not None and row[0]:
                connection.executemany(_MARK_SERVED, [(m, now) for m in row[0].split(",")])
            connection.execute("DELETE FROM workers WHERE worker = ?", (name,))

    def served_models(self) -> frozenset[str]:
        """The models some live worker announced."""
        rows = self._db.fetch_all(
            "SELECT models FROM workers WHERE expires_at > ? AND models IS NOT NULL",
            (time.time(),),
        )
        return frozenset(model for (models,) in rows for model in models.split(",") if model)

    def models_last_served(self) -> dict[str, float]:
        """Per model: when a worker last announced it, or stopped serving it."""
        rows = self._db.fetch_all("SELECT model, seen_at FROM models_last_served")
        return {str(model): float(seen_at) for model, seen_at in rows}

    def _workers_alive(self) -> int:
        row = self._db.fetch_one(
            "SELECT COUNT(*) FROM workers WHERE expires_at > ?", (time.time(),)
        )
        return 0 if row is None else int(row[0])
