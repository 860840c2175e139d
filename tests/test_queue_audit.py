"""The queue audit (core/queue_audit.py): after Redis changes master, unfinished jobs whose
Celery message is gone are sent again. On a real redis-server, with messages sent by Celery."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.job import JobRecord, JobStatus, new_job_id, utc_now
from core.queue_audit import MARK_KEY, UNACKED_KEY, QueueAudit, message_job_id
from core.queue_celery import CeleryJobQueue, lane_queue, message_lists
from core.settings import Settings
from core.store_redis import RedisJobStore
from tests.servers import RedisServer, free_port, running_redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path, appendonly=False) as server:
        yield server


@pytest.fixture
def farm(server: RedisServer) -> Iterator[tuple[Settings, RedisJobStore, CeleryJobQueue]]:
    settings = Settings(redis_url=server.url)
    store = RedisJobStore(server.url)
    queue = CeleryJobQueue(settings, store)
    yield settings, store, queue
    queue.close()
    store.close()


def job(priority: str = "interactive") -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        owner="alice",
        status=JobStatus.QUEUED,
        params={"text": "a fox", "seed": 1, "model": "mini", "priority": priority},
        created_at=utc_now(),
    )


def test_a_message_celery_stored_names_its_job(
    farm: tuple[Settings, RedisJobStore, CeleryJobQueue],
) -> None:
    settings, store, queue = farm
    created, _ = store.create_job(job())
    queue.enqueue(created.id)
    (raw,) = queue.redis.lrange(lane_queue(settings), 0, -1)
    assert message_job_id(raw) == created.id
    for other in (b"not json", json.dumps({"body": "e30="}), json.dumps([1, 2])):
        assert message_job_id(other) is None


def test_the_audit_sends_again_only_the_jobs_without_a_message(
    farm: tuple[Settings, RedisJobStore, CeleryJobQueue],
) -> None:
    settings, store, queue = farm
    running, waiting, lost, lost_bulk, done = (
        store.create_job(job(priority))[0]
        for priority in ("interactive", "interactive", "interactive", "bulk", "interactive")
    )
    for record in (running, waiting, done):
        queue.enqueue(record.id)
    # A worker took the running job's message: kombu keeps it in its unacknowledged hash
    # ([message, exchange, routing key]) until the job ends.
    taken = queue.redis.rpop(lane_queue(settings))
    assert isinstance(taken, bytes)
    assert message_job_id(taken) == running.id
    entry = json.dumps([json.loads(taken), "", lane_queue(settings)])
    queue.redis.hset(UNACKED_KEY, "delivery-tag", entry)
    store.transition(running.id, JobStatus.RUNNING, worker="w", started_at=utc_now())
    store.transition(done.id, JobStatus.CANCELED, finished_at=utc_now())
    queue.redis.delete(lane_queue(settings))  # the waiting and the done job's messages too
    queue.enqueue(waiting.id)

    sent: list[tuple[str, str, str]] = []
    audit = QueueAudit(
        store, queue.redis, message_lists(settings), lambda *job: sent.append(job), name="w"
    )
    assert sorted(audit.audit()) == sorted([lost.id, lost_bulk.id])
    assert sorted(sent) == sorted(
        [(lost.id, "mini", "interactive"), (lost_bulk.id, "mini", "bulk")]
    )


def test_one_worker_audits_once_the_new_master_has_settled(
    farm: tuple[Settings, RedisJobStore, CeleryJobQueue],
) -> None:
    settings, store, queue = farm
    lost, _ = store.create_job(job())  # no message: as if it was lost
    now = [0.0]
    sent: list[str] = []

    def audit(name: str) -> QueueAudit:
        return QueueAudit(
            store,
            queue.redis,
            message_lists(settings),
            lambda job_id, *_: sent.append(job_id),
            name=name,
            settle_s=10,
            clock=lambda: now[0],
        )

    first, second = audit("a"), audit("b")
    assert first.run_once() == [] and queue.redis.get(MARK_KEY)  # a new farm: marked, no audit
    assert second.run_once() == []
    new_master(queue.redis)
    assert first.run_once() == [] and second.run_once() == []  # not settled yet
    now[0] = 10.0
    assert first.run_once() == [lost.id] and sent == [lost.id]
    assert second.run_once() == []  # audited once
    assert first.run_once() == [] and sent == [lost.id]


def new_master(client: redis.Redis) -> None:
    """Give the Redis a new replication id, as a replica gets when Sentinel promotes it: make
    it a replica of nothing for a moment (it keeps its data: there is no master to sync)."""
    before = client.info("replication")["master_replid"]
    client.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))
    client.execute_command("REPLICAOF", "NO", "ONE")
    assert client.info("replication")["master_replid"] != before
