"""core/store_redis_events.py: the job event log on a real redis-server, appended by its Lua."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.job import JobRecord, JobStatus, new_job_id, preview_key, utc_now
from core.store_redis import RedisJobStore
from core.store_redis_events import LOG_EVENT_LUA, read_events
from tests.servers import running_redis

PREFIX = "t:"
# A test script: set the job's status (or fields) and log what the stores' scripts will log.
# KEYS: job. ARGV: prefix, kind, field, value, ... (status/done: fields of the hash to set).
_SCRIPT = (
    LOG_EVENT_LUA
    + """
if ARGV[2] == 'status' or ARGV[2] == 'done' then
    redis.call('HSET', KEYS[1], unpack(ARGV, 3))
    log_record(ARGV[1], KEYS[1], ARGV[2])
else
    log_event(ARGV[1], redis.call('HGET', KEYS[1], 'id'), redis.call('HGET', KEYS[1], 'owner'),
              ARGV[2], unpack(ARGV, 3))
end
return 0
"""
)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[redis.Redis]:
    directory: Path = tmp_path_factory.mktemp("redis-events")
    with running_redis(directory, appendonly=False) as server:
        connection = redis.Redis.from_url(server.url, decode_responses=True)
        yield connection
        connection.close()


def _life(client: redis.Redis, owner: str = "alice") -> JobRecord:
    record = JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params={"text": "a fox", "seed": 7},
        created_at=utc_now(),
        checkpoint="1:AAAA",
    )
    fields = {
        name: value if name in ("id", "owner", "status") else json.dumps(value)
        for name, value in record.to_dict().items()
    }
    script = client.register_script(_SCRIPT)
    job = f"{PREFIX}job:{record.id}"
    steps: list[list[str]] = [
        ["status", *[item for pair in fields.items() for item in pair], "_model", "mini"],
        ["status", "status", "running"],
        ["progress", "step", "32", "total", "256"],
        ["preview", "key", preview_key(record.id, 1)],
        ["done", "status", "succeeded"],
    ]
    for args in steps:
        script(keys=[job], args=[PREFIX, *args])
    return record


def test_events_arrive_in_order_and_resume_without_loss(client: redis.Redis) -> None:
    job = _life(client)
    everything = read_events(client, PREFIX, job_id=job.id, after="0-0")
    kinds = [event.type for event in everything.events]
    assert kinds == ["status", "status", "progress", "preview", "done"]
    first, running, progress, preview, done = everything.events
    assert first.data["status"] == "queued" and "checkpoint" not in first.data
    assert running.data["status"] == "running" and done.data["status"] == "succeeded"
    assert progress.data == {"step": 32, "total": 256}
    assert preview.data == {"key": preview_key(job.id, 1)}
    for i, event in enumerate(everything.events):
        rest = read_events(client, PREFIX, job_id=job.id, after=event.cursor, limit=2)
        assert not rest.gap and rest.events == everything.events[i + 1 : i + 3]


def test_owner_streams_hold_only_their_own_jobs(client: redis.Redis) -> None:
    mine, theirs = _life(client, "carol"), _life(client, "dave")
    carol = read_events(client, PREFIX, owner="carol", after="0-0")
    dave = read_events(client, PREFIX, owner="dave", after="0-0")
    assert {event.job_id for event in carol.events} == {mine.id}
    assert {event.job_id for event in dave.events} == {theirs.id}
    assert [event.type for event in carol.events][-1] == "done"


@pytest.mark.parametrize("cursor", [None, "1-1", "abc", "42"])
def test_no_cursor_or_a_lost_one_resyncs_from_the_job_as_it_is(
    client: redis.Redis, cursor: str | None
) -> None:
    job = _life(client)
    page = read_events(client, PREFIX, job_id=job.id, after=cursor)
    newest = read_events(client, PREFIX, job_id=job.id, after="0-0").events[-1].cursor
    assert page.events == [] and page.cursor == newest and page.gap is (cursor is not None)
    assert page.record is not None and page.record.status is JobStatus.SUCCEEDED
    assert page.record.checkpoint == "1:AAAA"  # the record itself; only events drop it


def test_streams_expire(client: redis.Redis) -> None:
    job = _life(client)
    assert 0 < client.ttl(f"{PREFIX}events:job:{job.id}") <= 7 * 24 * 3600
    assert 0 < client.ttl(f"{PREFIX}events:owner:alice") <= 7 * 24 * 3600


def test_the_stores_scripts_log_every_change(client: redis.Redis) -> None:
    store = RedisJobStore(client, prefix="s")
    record = JobRecord(
        id=new_job_id(),
        owner="erin",
        status=JobStatus.QUEUED,
        params={"text": "a fox", "seed": 7, "progressive_outputs": True},
        created_at=utc_now(),
    )
    store.create_job(record)
    store.transition(record.id, JobStatus.RUNNING, worker="w")
    store.update(record.id, progress_step=32, progress_total=256)
    store.update(record.id, checkpoint="1:AAAA")  # no event
    store.update(record.id, result={"grid": None, "images": [], "previews": ["p/1.png"]})
    store.update(record.id, result={"grid": None, "images": [], "previews": ["p/1.png", "p/2.png"]})
    store.request_cancel(record.id)
    store.request_cancel(record.id)  # already asked: no event
    store.transition(record.id, JobStatus.CANCELED)
    other = JobRecord(
        id=new_job_id(), owner="erin", status=JobStatus.QUEUED, params={}, created_at=utc_now()
    )
    store.create_job(other)
    assert store.fail_queued_jobs("mini", 2**47, "no worker") == [other.id]

    page = store.job_events(record.id, after="0-0")
    assert [(event.type, event.data.get("status")) for event in page.events] == [
        ("status", "queued"),
        ("status", "running"),
        ("progress", None),
        ("preview", None),
        ("preview", None),
        ("status", "running"),
        ("done", "canceled"),
    ]
    assert page.events[5].data["cancel_requested"] is True
    assert [event.data.get("key") for event in page.events[3:5]] == ["p/1.png", "p/2.png"]
    owner = store.owner_events("erin", after="0-0")
    assert store.job_events(record.id).cursor == page.events[-1].cursor
    assert [event.job_id for event in owner.events] == [record.id] * 7 + [other.id] * 2
    assert owner.events[-1].type == "done" and owner.events[-1].data["status"] == "failed"
