"""The JobQueue of the embedded `dalle-farm serve`: a table in the store's SQLite file
(core/store_sqlite_db.py explains the file, its connections and its locking)."""

from __future__ import annotations

import os
import time

from core.job import TERMINAL_STATUSES
from core.store import check_ttl
from core.store_sqlite_db import SqliteDatabase

_TERMINAL = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL_STATUSES))


class SqliteJobQueue:
    """The embedded farm's queue: job ids in the store's SQLite file, leased by workers.

    A worker `lease`s the oldest job id whose lease is free or expired, then `ack`s it when the
    job is finished or `release`s it to hand it back at once (on SIGTERM). A lease that runs out
    (the worker died) makes the job available again; `extend` keeps a long job's lease. Rows
    persist, so queued jobs survive a restart of `dalle-farm serve`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = SqliteDatabase(path)

    def enqueue(self, job_id: str, model: str | None = None) -> None:
        """Add the job id at the back; an id already in the queue stays where it is. The embedded
        farm has one worker and one model, so `model` is not needed."""
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO queue (job_id) VALUES (?) ON CONFLICT (job_id) DO NOTHING", (job_id,)
            )

    def lease(self, worker: str, lease_s: float) -> str | None:
        """The oldest available job id, leased to `worker` for `lease_s`; None if none waits."""
        check_ttl(lease_s)
        now = time.time()
        with self._db.transaction() as connection:
            row = connection.execute(
                "SELECT seq, job_id FROM queue WHERE lease_expires_at <= ? ORDER BY seq LIMIT 1",
                (now,),
            ).fetchone()
            if row is None:
                return None
            connection.execute(
                "UPDATE queue SET leased_by = ?, lease_expires_at = ?, deliveries = deliveries + 1"
                " WHERE seq = ?",
                (worker, now + lease_s, row[0]),
            )
        return str(row[1])

    def extend(self, job_id: str, worker: str, lease_s: float) -> bool:
        """Extend `worker`'s lease to `lease_s` from now; False if the worker no longer holds it."""
        check_ttl(lease_s)
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE queue SET lease_expires_at = ? WHERE job_id = ? AND leased_by = ?",
                (time.time() + lease_s, job_id, worker),
            )
            return cursor.rowcount > 0

    def ack(self, job_id: str) -> None:
        """The job is done with (finished, failed or skipped): remove it from the queue."""
        with self._db.transaction() as connection:
            connection.execute("DELETE FROM queue WHERE job_id = ?", (job_id,))

    def release(self, job_id: str) -> None:
        """Hand a leased job back at once; it keeps its place at the front of the queue."""
        with self._db.transaction() as connection:
            connection.execute(
                "UPDATE queue SET leased_by = NULL, lease_expires_at = 0 WHERE job_id = ?",
                (job_id,),
            )

    def deliveries(self, job_id: str) -> int:
        """How many times the job id was leased (0 when it is not in the queue)."""
        row = self._db.fetch_one("SELECT deliveries FROM queue WHERE job_id = ?", (job_id,))
        return 0 if row is None else int(row[0])

    def depth(self) -> int:
        """Job ids waiting to be leased, including those whose lease ran out, but not those of
        jobs already finished (canceled or failed while queued): a worker drops their rows
        when it leases them, and until then they wait for nothing."""
        row = self._db.fetch_one(
            "SELECT COUNT(*) FROM queue WHERE lease_expires_at <= ? AND NOT EXISTS"
            f" (SELECT 1 FROM jobs WHERE jobs.id = queue.job_id AND jobs.status IN ({_TERMINAL}))",
            (time.time(),),
        )
        return 0 if row is None else int(row[0])

    def check(self) -> None:
        """Raise StoreUnavailable unless the queue table can be queried."""
        self._db.fetch_one("SELECT 1 FROM queue LIMIT 1")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteJobQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
