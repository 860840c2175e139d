"""The JobQueue of the embedded `dalle-farm serve`: a table in the store's SQLite file
(core/store_sqlite_db.py explains the file, its connections and its locking).

Priority lanes (core/lanes.py has the rule): each row has its job's lane and the time it entered
it. A worker takes the row that comes first by lane (interactive first), then by that time,
then by arrival; in the same transaction, the oldest bulk row that has waited bulk_max_wait_s
is promoted first (it moves to the interactive lane, entering it now), unless a promoted row
still waits. queue_position counts the queued jobs ahead of a job in its lane.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

from core.job import TERMINAL_STATUSES, JobRecord, JobStatus
from core.lanes import BULK, INTERACTIVE, lane_of
from core.store import check_ttl
from core.store_sqlite_db import SqliteDatabase

_TERMINAL = ", ".join(f"'{status.value}'" for status in sorted(TERMINAL_STATUSES))


class SqliteJobQueue:
    """The embedded farm's queue: job ids in the store's SQLite file, leased by workers.

    A worker `lease`s the first job id (by lane, then age) whose lease is free or expired, then
    `ack`s it when the job is finished or `release`s it to hand it back at once (on SIGTERM). A
    lease that runs out (the worker died) makes the job available again; `extend` keeps a long
    job's lease. Rows persist, so queued jobs survive a restart of `dalle-farm serve`.
    `bulk_max_wait_s`: DALLE_FARM_BULK_MAX_WAIT_S (core/lanes.py).
    """

    def __init__(self, path: str | os.PathLike[str], *, bulk_max_wait_s: float = 300.0) -> None:
        check_ttl(bulk_max_wait_s)
        self.bulk_max_wait_s = float(bulk_max_wait_s)
        self._db = SqliteDatabase(path)

    def enqueue(self, job_id: str, model: str | None = None, priority: str | None = None) -> None:
        """Add the job id at the back of its lane (`priority`; None: the job record's); an id
        already in the queue stays where it is. The embedded farm has one worker and one model,
        so `model` is not needed."""
        with self._db.transaction() as connection:
            if priority is None:
                row = connection.execute("SELECT record FROM jobs WHERE id = ?", (job_id,))
                found = row.fetchone()
                priority = lane_of(JobRecord.from_json(found[0]).params) if found else INTERACTIVE
            connection.execute(
                "INSERT INTO queue (job_id, lane, entered_at) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id) DO NOTHING",
                (job_id, lane_of({"priority": priority}), time.time()),
            )

    def lease(self, worker: str, lease_s: float) -> str | None:
        """The first available job id by lane and age, leased to `worker` for `lease_s`; None
        if none waits. An overdue bulk job is promoted first (see the module docstring)."""
        check_ttl(lease_s)
        now = time.time()
        with self._db.transaction() as connection:
            self._promote(connection, now)
            for lane in (INTERACTIVE, BULK):  # each lane in its index's order
                row = connection.execute(
                    "SELECT seq, job_id FROM queue WHERE lane = ? AND lease_expires_at <= ?"
                    " ORDER BY entered_at, seq LIMIT 1",
                    (lane, now),
                ).fetchone()
                if row is not None:
                    break
            if row is None:
                return None
            connection.execute(
                "UPDATE queue SET leased_by = ?, lease_expires_at = ?, deliveries = deliveries + 1"
                " WHERE seq = ?",
                (worker, now + lease_s, row[0]),
            )
        return str(row[1])

    def _promote(self, connection: sqlite3.Connection, now: float) -> None:
        """Promote the oldest bulk row that waited bulk_max_wait_s, unless a promoted row
        still waits (one at a time)."""
        waiting = connection.execute(
            "SELECT 1 FROM queue WHERE promoted = 1 AND lease_expires_at <= ? LIMIT 1", (now,)
        ).fetchone()
        if waiting is not None:
            return
        connection.execute(
            "UPDATE queue SET lane = ?, entered_at = ?, promoted = 1 WHERE seq = (SELECT seq"
            " FROM queue WHERE lane = ? AND lease_expires_at <= ? AND entered_at <= ?"
            " ORDER BY entered_at, seq LIMIT 1)",
            (INTERACTIVE, now, BULK, now, now - self.bulk_max_wait_s),
        )

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

    def depth_by_lane(self) -> dict[str, int]:
        """depth() per lane (interactive includes promoted bulk jobs)."""
        rows = self._db.fetch_all(
            "SELECT lane, COUNT(*) FROM queue WHERE lease_expires_at <= ? AND NOT EXISTS"
            f" (SELECT 1 FROM jobs WHERE jobs.id = queue.job_id AND jobs.status IN ({_TERMINAL}))"
            " GROUP BY lane",
            (time.time(),),
        )
        counts = {str(lane): int(count) for lane, count in rows}
        return {lane: counts.get(lane, 0) for lane in (INTERACTIVE, BULK)}

    def check(self) -> None:
        """Raise StoreUnavailable unless the queue table can be queried."""
        self._db.fetch_one("SELECT 1 FROM queue LIMIT 1")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteJobQueue:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def queue_position(connection: sqlite3.Connection, job_id: str, params: Mapping[str, Any]) -> int:
    """The queued job's 1-based place in its lane among queued jobs. A job not in the queue
    yet (the API enqueues it right after creating it) is given the place it is about to take,
    at the back of the lane of its `params`."""
    row = connection.execute(
        "SELECT lane, entered_at, seq FROM queue WHERE job_id = ?", (job_id,)
    ).fetchone()
    if row is None:
        behind = connection.execute(
            "SELECT COUNT(*) FROM queue JOIN jobs ON jobs.id = queue.job_id"
            " WHERE jobs.status = ? AND queue.lane = ?",
            (JobStatus.QUEUED.value, lane_of(params)),
        ).fetchone()
        return int(behind[0]) + 1
    ahead = connection.execute(
        "SELECT COUNT(*) FROM queue JOIN jobs ON jobs.id = queue.job_id WHERE jobs.status = ?"
        " AND queue.lane = ? AND (queue.entered_at < ? OR (queue.entered_at = ? AND"
        " queue.seq < ?))",
        (JobStatus.QUEUED.value, row[0], row[1], row[1], row[2]),
    ).fetchone()
    return int(ahead[0]) + 1
