"""The job event log in the embedded farm's SQLite file (core/events.py says what events are).

    events   id (INTEGER PRIMARY KEY AUTOINCREMENT: the cursor, increasing), job_id, owner,
             type, data (ASCII JSON)

`log_change(connection, before, after)` appends the events a change of a job record makes, in
the caller's transaction, so an event exists exactly when its change does. Readers page
through a job's or an owner's events after a cursor (`read_events`); a cursor that is no longer
in the log (pruned: only the newest RETAINED_EVENTS rows are kept) is reported as a gap, with
the job's record and the newest cursor, so the caller can resynchronise from a snapshot.

SqliteJobStore logs through create_job and `_save` (every change of a job goes through it);
the table is in store_sqlite_db's schema.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from core.events import PREVIEW, PROGRESS, EventPage, StoredEvent, event_type_of_status
from core.job import JobRecord
from core.store_sqlite_db import SqliteBackend

# Rows kept in all; older ones are deleted as new ones are appended.
RETAINED_EVENTS = 100_000


def changes(before: JobRecord | None, after: JobRecord) -> list[tuple[str, dict[str, Any]]]:
    """The events (type, data) that turning `before` (None: a new job) into `after` makes."""
    events: list[tuple[str, dict[str, Any]]] = []
    if (
        before is None
        or before.status is not after.status
        or (after.cancel_requested and not before.cancel_requested)
    ):
        snapshot = after.to_dict()
        snapshot.pop("checkpoint", None)
        events.append((event_type_of_status(after.status.value), snapshot))
        return events
    if (before.progress_step, before.progress_total) != (after.progress_step, after.progress_total):
        events.append((PROGRESS, {"step": after.progress_step, "total": after.progress_total}))
    old = list((before.result or {}).get("previews") or ())
    new = list((after.result or {}).get("previews") or ())
    events.extend((PREVIEW, {"key": key}) for key in new if key not in old)
    return events


def log_change(connection: sqlite3.Connection, before: JobRecord | None, after: JobRecord) -> None:
    """Append the events of a change, in the caller's transaction."""
    for kind, data in changes(before, after):
        cursor = connection.execute(
            "INSERT INTO events (job_id, owner, type, data) VALUES (?, ?, ?, ?)",
            (after.id, after.owner, kind, json.dumps(data, sort_keys=True)),
        )
        newest = cursor.lastrowid or 0
        if newest > RETAINED_EVENTS and newest % 1000 == 0:  # prune now and then
            connection.execute("DELETE FROM events WHERE id <= ?", (newest - RETAINED_EVENTS,))


def read_events(
    connection: sqlite3.Connection,
    *,
    job_id: str | None = None,
    owner: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> EventPage:
    """One job's (`job_id`) or one owner's events after `after` (None: from now on). Call it
    in one read transaction, so the record and the cursor of a gap agree."""
    column, value = ("job_id", job_id) if job_id is not None else ("owner", owner)
    if value is None:
        raise ValueError("read_events needs a job_id or an owner")
    start = _cursor_number(after)
    if start is not None and start > 0:
        found = connection.execute(
            f"SELECT 1 FROM events WHERE id = ? AND {column} = ?", (start, value)
        ).fetchone()
        if found is None:
            start = None  # not in the log: a gap
    if start is None:
        newest = connection.execute(
            f"SELECT MAX(id) FROM events WHERE {column} = ?", (value,)
        ).fetchone()[0]
        record = _record(connection, job_id) if job_id is not None else None
        return EventPage([], str(newest or 0), gap=after is not None, record=record)
    rows = connection.execute(
        f"SELECT id, job_id, type, data FROM events WHERE {column} = ? AND id > ?"
        " ORDER BY id LIMIT ?",
        (value, start, limit),
    ).fetchall()
    events = [StoredEvent(str(row[0]), row[1], row[2], json.loads(row[3])) for row in rows]
    return EventPage(events, events[-1].cursor if events else str(start))


def _cursor_number(cursor: str | None) -> int | None:
    if cursor is None or not cursor.isascii() or not cursor.isdigit() or len(cursor) > 19:
        return None
    return int(cursor)


def _record(connection: sqlite3.Connection, job_id: str) -> JobRecord | None:
    row = connection.execute("SELECT record FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else JobRecord.from_json(row[0])


class SqliteEventLog(SqliteBackend):
    """The event half of the JobStore protocol on SQLite: job_events and owner_events."""

    def job_events(self, job_id: str, after: str | None = None, limit: int = 100) -> EventPage:
        """The job's events after cursor `after`; see read_events."""
        with self._db.transaction(immediate=False) as connection:
            return read_events(connection, job_id=job_id, after=after, limit=limit)

    def owner_events(self, owner: str, after: str | None = None, limit: int = 100) -> EventPage:
        """Every event of the owner's jobs after cursor `after`; see read_events."""
        with self._db.transaction(immediate=False) as connection:
            return read_events(connection, owner=owner, after=after, limit=limit)
