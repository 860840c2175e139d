"""core/store_sqlite_events.py: the job event log in a real SQLite file."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from core.job import JobRecord, JobStatus, new_job_id, preview_key, utc_now
from core.store_sqlite import SqliteJobStore
from core.store_sqlite_db import SqliteDatabase
from core.store_sqlite_events import changes, log_change, read_events


@pytest.fixture
def db(tmp_path: Path) -> Iterator[SqliteDatabase]:
    database = SqliteDatabase(tmp_path / "farm.db")
    yield database
    database.close()


def _job(owner: str = "alice") -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params={"text": "a fox", "seed": 7},
        created_at=utc_now(),
    )


def _save(db: SqliteDatabase, before: JobRecord | None, after: JobRecord) -> None:
    with db.transaction() as connection:
        connection.execute(
            "INSERT OR REPLACE INTO jobs (id, owner, status, record) VALUES (?, ?, ?, ?)",
            (after.id, after.owner, after.status.value, after.to_json()),
        )
        log_change(connection, before, after)


def _life(db: SqliteDatabase, job: JobRecord) -> list[JobRecord]:
    """Create, run, advance, preview and finish `job`; the records in order."""
    running = dataclasses.replace(job, status=JobStatus.RUNNING, checkpoint="1:AAAA")
    step = dataclasses.replace(running, progress_step=32)
    preview = dataclasses.replace(step, result={"previews": [preview_key(job.id, 1)]})
    done = dataclasses.replace(preview, status=JobStatus.SUCCEEDED, progress_step=256)
    records = [job, running, step, preview, done]
    for before, after in zip([None, *records], records, strict=False):
        _save(db, before, after)
    return records


def test_changes_make_the_events_of_the_format() -> None:
    job = _job()
    assert [kind for kind, _ in changes(None, job)] == ["status"]
    running = dataclasses.replace(job, status=JobStatus.RUNNING, checkpoint="x")
    ((kind, data),) = changes(job, running)
    assert kind == "status" and data["status"] == "running" and "checkpoint" not in data
    assert changes(running, dataclasses.replace(running, progress_step=9)) == [
        ("progress", {"step": 9, "total": running.progress_total})
    ]
    asked = dataclasses.replace(running, cancel_requested=True)
    assert [kind for kind, _ in changes(running, asked)] == ["status"]
    for status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED):
        ((kind, _),) = changes(running, dataclasses.replace(running, status=status))
        assert kind == "done"
    assert changes(running, dataclasses.replace(running, checkpoint="y")) == []


def test_a_job_reads_its_events_in_order_and_resumes_without_loss(db: SqliteDatabase) -> None:
    job = _job()
    _life(db, job)
    with db.transaction(immediate=False) as connection:
        start = read_events(connection, job_id=job.id, after="0")
    assert [event.type for event in start.events] == [
        "status",
        "status",
        "progress",
        "preview",
        "done",
    ]
    cursors = [int(event.cursor) for event in start.events]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    assert start.events[3].data == {"key": preview_key(job.id, 1)}
    # Resuming after each event gives exactly the rest, page by page.
    for i, event in enumerate(start.events):
        with db.transaction(immediate=False) as connection:
            rest = read_events(connection, job_id=job.id, after=event.cursor, limit=2)
        assert not rest.gap
        assert rest.events == start.events[i + 1 : i + 3]


def test_owner_streams_hold_only_their_own_jobs(db: SqliteDatabase) -> None:
    mine, theirs = _job("alice"), _job("bob")
    _life(db, mine)
    _life(db, theirs)
    with db.transaction(immediate=False) as connection:
        alice = read_events(connection, owner="alice", after="0")
        bob = read_events(connection, owner="bob", after="0")
    assert {event.job_id for event in alice.events} == {mine.id}
    assert {event.job_id for event in bob.events} == {theirs.id}
    assert len(alice.events) == len(bob.events) == 5


def test_no_cursor_starts_from_now_with_the_job_as_it_is(db: SqliteDatabase) -> None:
    job = _job()
    records = _life(db, job)
    with db.transaction(immediate=False) as connection:
        now = read_events(connection, job_id=job.id)
        everything = read_events(connection, job_id=job.id, after="0")
    assert not now.gap and now.events == []
    assert now.cursor == everything.events[-1].cursor
    assert now.record == records[-1]


@pytest.mark.parametrize("cursor", ["999999", "abc", "1-0", "-1", "9" * 40])
def test_a_cursor_not_in_the_log_is_a_gap_with_a_snapshot(db: SqliteDatabase, cursor: str) -> None:
    job = _job()
    records = _life(db, job)
    with db.transaction(immediate=False) as connection:
        page = read_events(connection, job_id=job.id, after=cursor)
        newest = read_events(connection, job_id=job.id).cursor
    assert page.gap and page.events == [] and page.cursor == newest
    assert page.record == records[-1]


def test_another_jobs_cursor_is_a_gap(db: SqliteDatabase) -> None:
    one, other = _job(), _job()
    _life(db, one)
    _life(db, other)
    with db.transaction(immediate=False) as connection:
        cursor = read_events(connection, job_id=other.id, after="0").events[0].cursor
        page = read_events(connection, job_id=one.id, after=cursor)
    assert page.gap


def test_the_stores_writes_log_every_change(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "store.db")
    try:
        record = dataclasses.replace(_job("erin"), params={"text": "a fox", "model": "mini"})
        store.create_job(record)
        store.transition(record.id, JobStatus.RUNNING, worker="w")
        store.update(record.id, progress_step=32, progress_total=256)
        store.update(record.id, checkpoint="1:AAAA")  # no event
        store.update(record.id, result={"grid": None, "images": [], "previews": ["p/1.png"]})
        store.request_cancel(record.id)
        store.request_cancel(record.id)  # already asked: no event
        store.transition(record.id, JobStatus.CANCELED)
        other = _job("erin")
        store.create_job(other)
        assert store.fail_queued_jobs("mini", 2**47, "no worker") == [other.id]
        page = store.job_events(record.id, after="0")
        owner = store.owner_events("erin", after="0")
        assert store.job_events(record.id).cursor == page.events[-1].cursor
    finally:
        store.close()
    assert [(event.type, event.data.get("status")) for event in page.events] == [
        ("status", "queued"),
        ("status", "running"),
        ("progress", None),
        ("preview", None),
        ("status", "running"),
        ("done", "canceled"),
    ]
    assert page.events[4].data["cancel_requested"] is True
    assert [event.job_id for event in owner.events] == [record.id] * 6 + [other.id] * 2
    assert owner.events[-1].type == "done" and owner.events[-1].data["status"] == "failed"
