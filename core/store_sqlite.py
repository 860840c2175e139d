"""The JobStore of the embedded `dalle-farm serve`, in one SQLite file with its queue
(core/queue_sqlite.py).

The API (several threads) and the embedded worker (another process) share the file. Each thread
has its own connection, WAL mode lets readers go on while one connection writes, and every
read-modify-write runs in `BEGIN IMMEDIATE`, which takes SQLite's write lock first, so it is
atomic across threads and processes. A writer waits up to BUSY_TIMEOUT_S for the lock, then gets
StoreUnavailable.

Tables:
    jobs         id (sorts by creation time), owner, status, record (JobRecord JSON)
    idempotency  (owner, sha256 of the Idempotency-Key) → job id, request fingerprint
    api_keys     id, name, sha256 of the secret (never the secret), created_at, revoked
    leases       job id → worker, expires_at
    heartbeats   worker → seen_at
    counters     name → value: duration histogram buckets, duration sum and count, images
    queue        SqliteJobQueue: job id, FIFO sequence, leased_by, lease_expires_at, deliveries

Times that decide expiry (leases, heartbeats) are time.time(), the one clock that two processes
can compare. The file may not be ":memory:" (each connection would see its own database).

"""

from __future__ import annotations

import dataclasses
import hmac
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.job import JobRecord, JobStatus, can_move, utc_now
from core.store import (
    DURATION_BUCKETS_S,
    HEARTBEAT_RETENTION_S,
    IDEMPOTENCY_CONFLICT,
    WORKER_ALIVE_S,
    ApiKey,
    IdempotencyConflict,
    JobNotFound,
    MetricsSnapshot,
    StoreUnavailable,
    check_job_fields,
    check_key_name,
    check_limit,
    check_observation,
    check_ttl,
    cumulative_buckets,
    duration_bucket,
    hash_idempotency_key,
    hash_secret,
    key_id_from_secret,
    new_key_secret,
)

BUSY_TIMEOUT_S = 5.0
SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS jobs (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, record TEXT NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_owner_status ON jobs (owner, status, id)",
    "CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status)",
    """CREATE TABLE IF NOT EXISTS idempotency (
        owner TEXT NOT NULL, key_hash TEXT NOT NULL, job_id TEXT NOT NULL,
        fingerprint TEXT NOT NULL, PRIMARY KEY (owner, key_hash)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS api_keys (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, secret_hash TEXT NOT NULL,
        created_at TEXT NOT NULL, revoked INTEGER NOT NULL DEFAULT 0
    )""",
    """CREATE TABLE IF NOT EXISTS leases (
        job_id TEXT PRIMARY KEY, worker TEXT NOT NULL, expires_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS heartbeats (
        worker TEXT PRIMARY KEY, seen_at REAL NOT NULL
    ) WITHOUT ROWID""",
    # No type on value: integer counts stay integers, the duration sum is a float.
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE, leased_by TEXT,
        lease_expires_at REAL NOT NULL DEFAULT 0, deliveries INTEGER NOT NULL DEFAULT 0
    )""",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class SqliteDatabase:
    """Connections to one SQLite file: one per thread, all closed by close()."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if str(path) == ":memory:":
            raise ValueError("the SQLite store needs a file; ':memory:' is one database per thread")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._inherited: list[tuple[threading.Thread, sqlite3.Connection]] = []
        self._pid = os.getpid()
        self._closed = False
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unavailable(err) from err
        try:
            with self.transaction() as connection:
                version = connection.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreUnavailable(
                        f"the SQLite database {self.path} has schema version {version}, newer "
                        f"than this dalle-farm's ({SCHEMA_VERSION}); upgrade dalle-farm"
                    )
                for statement in _SCHEMA:
                    connection.execute(statement)
        except BaseException:
            self.close()
            raise

    def _unavailable(self, err: Exception) -> StoreUnavailable:
        return StoreUnavailable(
            f"the SQLite database {self.path} cannot be used ({err}); check that its folder "
            "is writable, that the disk is not full and that the file is a dalle-farm database"
        )

    def connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StoreUnavailable(f"the SQLite store on {self.path} was closed")
        if os.getpid() != self._pid:
            # A forked child must not use its parent's connections, nor close them (SQLite
            # forbids both): keep them aside and start afresh.
            self._inherited = self._connections
            self._local = threading.local()
            self._lock = threading.Lock()
            self._connections = []
            self._pid = os.getpid()
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._open()
            self._local.connection = connection
        return connection

    def _open(self) -> sqlite3.Connection:
        try:
            # isolation_level=None: no implicit transactions; we BEGIN and COMMIT ourselves.
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as err:
            raise self._unavailable(err) from err
        try:
            connection.execute("PRAGMA journal_mode = WAL")
            # In WAL mode NORMAL survives a crash of the process; only power loss can drop
            # the last commits.
            connection.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as err:
            connection.close()
            raise self._unavailable(err) from err
        with self._lock:
            # Threads come and go (gunicorn); close the connections of finished ones.
            for thread, old in self._connections:
                if not thread.is_alive():
                    old.close()
            self._connections = [
                (thread, old) for thread, old in self._connections if thread.is_alive()
            ]
            self._connections.append((threading.current_thread(), connection))
        return connection

    @contextmanager
    def errors(self) -> Iterator[None]:
        """SQLite's operational failures (locked, unreadable, disk full) as StoreUnavailable."""
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
            raise  # bugs, not outages
        except sqlite3.DatabaseError as err:
            raise self._unavailable(err) from err

    @contextmanager
    def transaction(self, immediate: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction: IMMEDIATE takes the write lock at once (read-modify-write); a deferred
        one only reads, from one snapshot."""
        connection = self.connection()
        with self.errors():
            connection.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            try:
                yield connection
                connection.execute("COMMIT")
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise

    def fetch_one(self, sql: str, parameters: tuple[Any, ...] = ()) -> tuple[Any, ...] | None:
        with self.errors():
            row: tuple[Any, ...] | None = self.connection().execute(sql, parameters).fetchone()
            return row

    def fetch_all(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self.errors():
            return self.connection().execute(sql, parameters).fetchall()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for _, connection in self._connections:
                connection.close()
            self._connections = []


class SqliteJobStore:
    """The JobStore (core/store.py) over one SQLite file, created with its folder if missing.

    `worker_alive_s`: how recent a heartbeat must be for metrics() to count the worker alive.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, worker_alive_s: float = WORKER_ALIVE_S
    ) -> None:
        self._db = SqliteDatabase(path)
        self._worker_alive_s = worker_alive_s

    @property
    def path(self) -> Path:
        return self._db.path

    # -- API keys ----------------------------------------------------------------------------
    def create_key(self, name: str) -> tuple[ApiKey, str]:
        """A new key named `name` and its secret, which is shown only this once."""
        key_id, secret = new_key_secret()
        key = ApiKey(id=key_id, name=check_key_name(name), created_at=utc_now())
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO api_keys (id, name, secret_hash, created_at) VALUES (?, ?, ?, ?)",
                (key.id, key.name, hash_secret(secret), key.created_at),
            )
        return key, secret

    def list_keys(self) -> list[ApiKey]:
        rows = self._db.fetch_all(
            # rowid: creation order (keys are never deleted), even within one millisecond.
            "SELECT id, name, created_at, revoked FROM api_keys ORDER BY rowid"
        )
        return [
            ApiKey(id=key_id, name=name, created_at=created_at, revoked=bool(revoked))
            for key_id, name, created_at, revoked in rows
        ]

    def revoke_key(self, id_or_name: str) -> bool:
        """Revoke the key with this id, or every key with this name; False if none matches."""
        with self._db.transaction() as connection:
            cursor = connection.execute(
                "UPDATE api_keys SET revoked = 1 WHERE id = ? OR name = ?", (id_or_name, id_or_name)
            )
            return cursor.rowcount > 0

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, unless unknown or revoked."""
        key_id = key_id_from_secret(secret)
        if key_id is None:
            return None
        presented = hash_secret(secret)
        row = self._db.fetch_one(
            "SELECT name, created_at, revoked, secret_hash FROM api_keys WHERE id = ?", (key_id,)
        )
        if row is None:
            return None
        name, created_at, revoked, secret_hash = row
        if not hmac.compare_digest(secret_hash, presented) or revoked:
            return None
        return ApiKey(id=key_id, name=name, created_at=created_at)

    # -- jobs --------------------------------------------------------------------------------
    def create_job(
        self, record: JobRecord, idempotency_key: str | None = None, fingerprint: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a new job; with an Idempotency-Key, see JobStore.create_job."""
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
                    return _load(connection, found[0]), False
            if connection.execute("SELECT 1 FROM jobs WHERE id = ?", (record.id,)).fetchone():
                raise ValueError(f"a job with id {record.id} already exists")
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
        return JobRecord.from_json(record.to_json()), True

    def get_job(self, job_id: str) -> JobRecord | None:
        row = self._db.fetch_one("SELECT record FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else JobRecord.from_json(row[0])

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
        if cursor is not None:
            sql += " AND id < ?"
            parameters.append(cursor)
        sql += " ORDER BY id DESC LIMIT ?"
        parameters.append(limit + 1)  # one more tells whether there is a next page
        rows = self._db.fetch_all(sql, tuple(parameters))
        records = [JobRecord.from_json(row[0]) for row in rows[:limit]]
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
        return record

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

    def worker_heartbeat(self, worker: str) -> None:
        now = time.time()
        with self._db.transaction() as connection:
            connection.execute(
                "INSERT INTO heartbeats (worker, seen_at) VALUES (?, ?)"
                " ON CONFLICT (worker) DO UPDATE SET seen_at = excluded.seen_at",
                (worker, now),
            )
            connection.execute(
                "DELETE FROM heartbeats WHERE seen_at < ?", (now - HEARTBEAT_RETENTION_S,)
            )

    def metrics(self) -> MetricsSnapshot:
        with self._db.transaction(immediate=False) as connection:
            by_status = dict(
                connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
            )
            counters = dict(connection.execute("SELECT name, value FROM counters").fetchall())
            (workers_alive,) = connection.execute(
                "SELECT COUNT(*) FROM heartbeats WHERE seen_at >= ?",
                (time.time() - self._worker_alive_s,),
            ).fetchone()
        return MetricsSnapshot(
            jobs_by_status={status.value: by_status.get(status.value, 0) for status in JobStatus},
            duration_bucket_counts=cumulative_buckets(
                counters.get(f"duration_bucket_{i}", 0) for i in range(len(DURATION_BUCKETS_S) + 1)
            ),
            duration_sum_s=float(counters.get("duration_sum_s", 0.0)),
            duration_count=int(counters.get("duration_count", 0)),
            images_generated=int(counters.get("images_generated", 0)),
            workers_alive=workers_alive,
        )

    def check(self) -> None:
        """Raise StoreUnavailable unless the database can be queried."""
        self._db.fetch_one("SELECT 1 FROM jobs LIMIT 1")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> SqliteJobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _load(connection: sqlite3.Connection, job_id: str) -> JobRecord:
    row = connection.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise JobNotFound(f"no job has the id {job_id!r}")
    return JobRecord.from_json(row[0])


def _save(connection: sqlite3.Connection, record: JobRecord) -> None:
    connection.execute(
        "UPDATE jobs SET status = ?, record = ? WHERE id = ?",
        (record.status.value, record.to_json(), record.id),
    )
