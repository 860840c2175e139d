"""The SQLite file of the embedded `dalle-farm serve`: its schema and its connections, shared by
SqliteJobStore (core/store_sqlite.py) and SqliteJobQueue (core/queue_sqlite.py).

The API (several threads) and the embedded worker (another process) share the file. Each thread
has its own connection, WAL mode lets readers go on while one connection writes, and every
read-modify-write runs in `BEGIN IMMEDIATE`, which takes SQLite's write lock first, so it is
atomic across threads and processes. A writer waits up to BUSY_TIMEOUT_S for the lock, then gets
StoreUnavailable.

Tables:
    jobs         id (sorts by creation time), owner, status, record (JobRecord, ASCII JSON)
    idempotency  (owner, sha256 of the Idempotency-Key) → job id, request fingerprint
    api_keys     id, name, sha256 of the secret (never the secret), created_at, revoked, and
                 the key's own max_jobs and rate (NULL: the farm's)
    leases       job id → worker, expires_at
    workers      worker → the models it announced (comma-separated; NULL: none yet),
                 expires_at of its heartbeat
    models_last_served  model → when a worker last announced it or stopped serving it
    counters     name → value: duration histogram buckets, duration sum and count, images
    events       the job event log: id (the cursor), job_id, owner, type, data
    queue        SqliteJobQueue: job id, FIFO sequence, leased_by, lease_expires_at, deliveries,
                 and the job's lane, when it entered it and whether it was promoted
                 (core/lanes.py; columns added in place to files that lack them)
    webhook_secrets, webhook_deliveries   core/store_sqlite_webhooks.py

Times that decide expiry (leases, heartbeats) are time.time(), the one clock that two processes
can compare. The file may not be ":memory:" (each connection would see its own database).
(Version 1 files also hold a `heartbeats` table, no longer used.)
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from core.store import StoreUnavailable

BUSY_TIMEOUT_S = 5.0
# Tables are only ever added (CREATE TABLE IF NOT EXISTS), so a version 1 file is upgraded in
# place when it is opened, and an older dalle-farm still reads a newer file.
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
    """CREATE TABLE IF NOT EXISTS workers (
        worker TEXT PRIMARY KEY, models TEXT, expires_at REAL NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS models_last_served (
        model TEXT PRIMARY KEY, seen_at REAL NOT NULL
    ) WITHOUT ROWID""",
    # No type on value: integer counts stay integers, the duration sum is a float.
    "CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value NOT NULL) WITHOUT ROWID",
    """CREATE TABLE IF NOT EXISTS queue (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL UNIQUE, leased_by TEXT,
        lease_expires_at REAL NOT NULL DEFAULT 0, deliveries INTEGER NOT NULL DEFAULT 0
    )""",
    # Webhooks (core/store_sqlite_webhooks.py).
    """CREATE TABLE IF NOT EXISTS webhook_secrets (
        owner TEXT PRIMARY KEY, secret TEXT NOT NULL, created_at TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS webhook_deliveries (
        job_id TEXT PRIMARY KEY, id TEXT NOT NULL, url TEXT NOT NULL, owner TEXT NOT NULL,
        state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_at REAL NOT NULL,
        claim TEXT, claim_until REAL NOT NULL DEFAULT 0, last_error TEXT,
        created_at TEXT NOT NULL, finished_at TEXT
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (state, next_at)",
    # The job event log (core/store_sqlite_events.py): id is the events' cursor.
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, owner TEXT NOT NULL,
        type TEXT NOT NULL, data TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, id)",
    "CREATE INDEX IF NOT EXISTS events_by_owner ON events (owner, id)",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


# Columns added after version 1 files were made: (table, column, definition). Added in place,
# with defaults that read as before (a row without a lane is interactive, oldest first).
_ADDED_COLUMNS = (
    ("queue", "lane", "TEXT NOT NULL DEFAULT 'interactive'"),
    ("queue", "entered_at", "REAL NOT NULL DEFAULT 0"),
    ("queue", "promoted", "INTEGER NOT NULL DEFAULT 0"),
    # A key's own limits (core/limits.py); NULL: the farm's.
    ("api_keys", "max_jobs", "INTEGER"),
    ("api_keys", "rate", "TEXT"),
)


def _add_columns(connection: sqlite3.Connection) -> None:
    for table, column, definition in _ADDED_COLUMNS:
        columns = {row[1] for row in connection.execute(f"PRAGMA table_info({table})")}
        if column not in columns:
            connection.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    connection.execute("CREATE INDEX IF NOT EXISTS queue_by_lane ON queue (lane, entered_at, seq)")
    connection.execute(
        "CREATE INDEX IF NOT EXISTS queue_promoted ON queue (promoted) WHERE promoted = 1"
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
                _add_columns(connection)
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
            # Threads come and go (the server's threads); close the connections of finished ones.
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


class SqliteBackend:
    """An open database file, the base of SqliteJobStore's parts (created with its folder if
    missing)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._db = SqliteDatabase(path)

    @property
    def path(self) -> Path:
        return self._db.path

    def check(self) -> None:
        """Raise StoreUnavailable unless the database can be queried."""
        self._db.fetch_one("SELECT 1 FROM jobs LIMIT 1")

    def close(self) -> None:
        self._db.close()
