"""The JobStore of the embedded `dalle-farm serve`, in one SQLite file with its queue
(core/queue_sqlite.py).

SqliteJobStore is built of parts, one concept each:
    core/store_sqlite_db.py       the file: schema, connections per thread, transactions
    core/store_sqlite_keys.py     API keys
    core/store_sqlite_workers.py  heartbeats and the models workers serve
    core/store_sqlite_webhooks.py webhook secrets and the outbox of webhook deliveries
    this module                   jobs, leases and the /metrics counters

Records are stored as ASCII JSON (non-ASCII escaped), so any string a record holds, a lone
surrogate included, is written and read back unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import time
from typing import Any

from core.job import JobRecord, JobStatus, can_move, utc_now
from core.queue_sqlite import queue_position
from core.store import (
    DEFAULT_MODEL,
    DURATION_BUCKETS_S,
    IDEMPOTENCY_CONFLICT,
    IdempotencyConflict,
    JobNotFound,
    MetricsSnapshot,
    StoreError,
    TooManyJobs,
    check_cursor,
    check_job_fields,
    check_limit,
    check_models,
    check_observation,
    check_ttl,
    cumulative_buckets,
    duration_bucket,
    hash_idempotency_key,
    job_id_bound,
)
from core.store_sqlite_db import BUSY_TIMEOUT_S, SCHEMA_VERSION, SqliteBackend, SqliteDatabase
from core.store_sqlite_events import SqliteEventLog, log_change
from core.store_sqlite_keys import SqliteKeyStore
from core.store_sqlite_webhooks import SqliteWebhookStore, register_webhook
from core.store_sqlite_workers import SqliteWorkerRegistry

log = logging.getLogger(__name__)

__all__ = ["BUSY_TIMEOUT_S", "SCHEMA_VERSION", "SqliteBackend", "SqliteDatabase", "SqliteJobStore"]


class SqliteJobStore(SqliteKeyStore, SqliteWorkerRegistry, SqliteWebhookStore, SqliteEventLog):
    """The JobStore (core/store.py) over one SQLite file, created with its folder if missing.

    `worker_alive_s`: how long a worker's heartbeat lives when it gives no ttl_s.
    """

    # -- jobs --------------------------------------------------------------------------------
    def create_job(
        self,
        record: JobRecord,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        max_active: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new job; with an Idempotency-Key or max_active, see JobStore.create_job."""
        with self._db.transaction() as connection:
            if idempotency_key is not None:
                key_hash = hash_idempotency_key(idempotency_key)
                found = connection.execute(
                    "SELECT job_id, fingerprint FROM idempotency WHERE owner = ? AND key_hash = ?",
                    (record.owner, key_hash),
                ).fetchone()
                if found is not None:
                    if found[1] != (fingerprint or ""):
                        raise IdempotencyConflict(IDEMPOTENCY_CONFLICT)
                    return _with_position(connection, _load(connection, found[0])), False
            if connection.execute("SELECT 1 FROM jobs WHERE id = ?", (record.id,)).fetchone():
                raise ValueError(f"a job with id {record.id} already exists")
            if max_active:
                (active,) = connection.execute(
                    "SELECT COUNT(*) FROM jobs WHERE owner = ? AND status IN ('queued', 'running')",
                    (record.owner,),
                ).fetchone()
                if active >= max_active:
                    raise TooManyJobs(active, max_active)
            connection.execute(
                "INSERT INTO jobs (id, owner, status, record) VALUES (?, ?, ?, ?)",
                (record.id, record.owner, record.status.value, record.to_json()),
            )
            if idempotency_key is not None:
                connection.execute(
                    "INSERT INTO idempotency (owner, key_hash, job_id, fingerprint)"
                    " VALUES (?, ?, ?, ?)",
                    (record.owner, key_hash, record.id, fingerprint or ""),
                )
            register_webhook(connection, record)  # in the job's own transaction
            log_change(connection, None, record)  # its first event, in the same transaction
            created = JobRecord.from_json(record.to_json())
            return _with_position(connection, created), True

    def get_job(self, job_id: str) -> JobRecord | None:
        """The job, with its queue_position while it is queued."""
        with self._db.transaction(immediate=False) as connection:
            row = connection.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            return _with_position(connection, JobRecord.from_json(row[0]))

    def list_jobs(
        self,
        owner: str,
        status: JobStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs, newest first; pass the returned cursor back for the next page."""
        check_limit(limit)
        sql = "SELECT record FROM jobs WHERE owner = ?"
        parameters: list[Any] = [owner]
        if status is not None:
            sql += " AND status = ?"
            parameters.append(JobStatus(status).value)
        if check_cursor(cursor) is not None:
            sql += " AND id < ?"
            parameters.append(cursor)
        sql += " ORDER BY id DESC LIMIT ?"
        parameters.append(limit + 1)  # one more tells whether there is a next page
        with self._db.transaction(immediate=False) as connection:
            rows = connection.execute(sql, tuple(parameters)).fetchall()
            records = [
                _with_position(connection, JobRecord.from_json(row[0])) for row in rows[:limit]
            ]
        return records, records[-1].id if len(rows) > limit else None

    def transition(self, job_id: str, to: JobStatus, **fields: Any) -> JobRecord | None:
        """Move the job to `to` and set `fields` if core.job.can_move allows; else None."""
        changes = check_job_fields(fields)
        target = JobStatus(to)
        with self._db.transaction() as connection:
            record = _load(connection, job_id)
            if not can_move(record.status, target):
                return None
            record = dataclasses.replace(record, status=target, **changes)
            _save(connection, record)
        _job_final(self, record)
        return record

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set JobRecord attributes other than id, owner and status."""
        changes = check_job_fields(fields)
        with self._db.transaction() as connection:
            record = dataclasses.replace(_load(connection, job_id), **changes)
            _save(connection, record)
        return record

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, ask a running one to stop; terminal jobs stay as they are."""
        with self._db.transaction() as connection:
            record = _load(connection, job_id)
            if record.status is JobStatus.QUEUED:
                record = dataclasses.replace(
                    record, status=JobStatus.CANCELED, finished_at=utc_now()
                )
                _save(connection, record)
            elif record.status is JobStatus.RUNNING and not record.cancel_requested:
                record = dataclasses.replace(record, cancel_requested=True)
                _save(connection, record)
        _job_final(self, record)
        return record

    def fail_queued_jobs(
        self, model: str, created_before_ms: int, error: str, limit: int = 100
    ) -> list[str]:
        """Fail the model's queued jobs created before `created_before_ms`, oldest first."""
        (name,) = check_models([model])
        check_limit(limit)
        failed: list[str] = []
        with self._db.transaction() as connection:
            rows = connection.execute(
                "SELECT record FROM jobs WHERE status = ? AND id < ? ORDER BY id",
                (JobStatus.QUEUED.value, job_id_bound(created_before_ms)),
            )
            # The embedded farm's queue is short: the model is read from each record.
            for (text,) in rows.fetchall():
                record = JobRecord.from_json(text)
                if (record.params.get("model") or DEFAULT_MODEL) != name:
                    continue
                finished = dataclasses.replace(
                    record, status=JobStatus.FAILED, error=error, finished_at=utc_now()
                )
                _save(connection, finished)
                failed.append(record.id)
                if len(failed) == limit:
                    break
        _jobs_final(self, failed)
        return failed

    def count_queued(self) -> int:
        row = self._db.fetch_one("SELECT COUNT(*) FROM jobs WHERE status = ?", ("queued",))
        return 0 if row is None else int(row[0])

    # -- leases ------------------------------------------------------------------------------
    def renew_lease(self, job_id: str, worker: str, ttl_s: float) -> bool:
        """Take the job's lease if free or expired, or extend it if `worker` holds it."""
        check_ttl(ttl_s)
        now = time.time()
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "INSERT INTO leases (job_id, worker, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (job_id) DO UPDATE"
                " SET worker = excluded.worker, expires_at = excluded.expires_at"
                " WHERE leases.worker = excluded.worker OR leases.expires_at <= ?",
                (job_id, worker, now + ttl_s, now),
            )
            return cursor.rowcount > 0

    def release_lease(self, job_id: str, worker: str) -> None:
        """Give up the lease, if `worker` holds it."""
        with self._db.transaction() as connection:
            connection.execute(
                "DELETE FROM leases WHERE job_id = ? AND worker = ?", (job_id, worker)
            )

    def lease_holder(self, job_id: str) -> str | None:
        row = self._db.fetch_one(
            "SELECT worker FROM leases WHERE job_id = ? AND expires_at > ?", (job_id, time.time())
        )
        return None if row is None else str(row[0])

    # -- metrics -----------------------------------------------------------------------------
    def observe_finished(self, status: JobStatus, duration_s: float, images: int) -> None:
        """Count a finished job's duration in the histogram and its images."""
        check_observation(status, duration_s, images)
        increments = (
            (f"duration_bucket_{duration_bucket(duration_s)}", 1),
            ("duration_sum_s", float(duration_s)),
            ("duration_count", 1),
            ("images_generated", images),
        )
        with self._db.transaction() as connection:
            connection.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                increments,
            )

    def metrics(self) -> MetricsSnapshot:
        with self._db.transaction(immediate=False) as connection:
            by_status = dict(
                connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
            )
            counters = dict(connection.execute("SELECT name, value FROM counters").fetchall())
        return MetricsSnapshot(
            jobs_by_status={status.value: by_status.get(status.value, 0) for status in JobStatus},
            duration_bucket_counts=cumulative_buckets(
                counters.get(f"duration_bucket_{i}", 0) for i in range(len(DURATION_BUCKETS_S) + 1)
            ),
            duration_sum_s=float(counters.get("duration_sum_s", 0.0)),
            duration_count=int(counters.get("duration_count", 0)),
            images_generated=int(counters.get("images_generated", 0)),
            workers_alive=self._workers_alive(),
        )

    def __enter__(self) -> SqliteJobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _job_final(store: SqliteJobStore, record: JobRecord) -> None:
    """A job that has a webhook and is final: its delivery is due now (webhooks)."""
    if record.status.is_terminal and record.params.get("webhook_url"):
        _jobs_final(store, [record.id])


def _jobs_final(store: SqliteJobStore, job_ids: list[str]) -> None:
    # The change is made; a failure here only delays the delivery until the outbox's safety
    # net looks at it (WAITING_RECHECK_S).
    try:
        store._webhooks_job_final(job_ids)
    except StoreError as error:
        log.warning("could not mark the webhooks of %d job(s) due: %s", len(job_ids), error)


def _with_position(connection: sqlite3.Connection, record: JobRecord) -> JobRecord:
    if record.status is JobStatus.QUEUED:
        record.queue_position = queue_position(connection, record.id, record.params)
    return record


def _load(connection: sqlite3.Connection, job_id: str) -> JobRecord:
    row = connection.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(f"no job has the id {job_id!r}")
    return JobRecord.from_json(row[0])


def _save(connection: sqlite3.Connection, record: JobRecord) -> None:
    # The events of the change are logged in the same transaction (core/store_sqlite_events.py).
    before = _load(connection, record.id)
    connection.execute(
        "UPDATE jobs SET status = ?, record = ? WHERE id = ?",
        (record.status.value, record.to_json(), record.id),
    )
    log_change(connection, before, record)
