"""The webhook outbox and secrets in both stores (SQLite file, real redis-server):
core/store_sqlite_webhooks.py and core/store_redis_webhooks.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.job import JobRecord, JobStatus, new_job_id, utc_now
from core.store import JobStore
from core.store_redis import RedisJobStore
from core.store_sqlite import SqliteJobStore
from core.webhooks import DeliveryState
from tests.servers import RedisServer, running_redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


def open_store(kind: str, tmp_path: Path, server: RedisServer | None) -> JobStore:
    if kind == "sqlite":
        return SqliteJobStore(tmp_path / "farm.db")
    assert server is not None
    return RedisJobStore(server.url)


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    server = None
    if kind == "redis":
        server = request.getfixturevalue("redis_server")
        with redis.Redis.from_url(server.url) as client:
            client.flushall()
    backend = open_store(kind, tmp_path, server)
    try:
        yield backend
    finally:
        backend.close()


def new_job(store: JobStore, webhook_url: str | None = "https://hooks.example/x") -> JobRecord:
    params: dict[str, object] = {"text": "a cat", "seed": 7}
    if webhook_url is not None:
        params["webhook_url"] = webhook_url
    record = JobRecord(
        id=new_job_id(),
        owner="key-a",
        status=JobStatus.QUEUED,
        params=params,
        created_at=utc_now(),
    )
    created, _ = store.create_job(record)
    return created


def test_each_key_has_a_retrievable_secret_and_old_owners_get_one(store: JobStore) -> None:
    key, _ = store.create_key("alice")
    secret = store.webhook_secret(key.id)
    assert secret.startswith("whsec_") and len(secret) > 40
    assert store.webhook_secret(key.id) == secret  # kept, not re-made
    rotated = store.rotate_webhook_secret(key.id)
    assert rotated != secret and store.webhook_secret(key.id) == rotated
    # An owner with no secret yet (a key from before webhooks, the embedded `local`).
    local = store.webhook_secret("local")
    assert local.startswith("whsec_") and store.webhook_secret("local") == local != rotated


def test_a_delivery_is_claimed_only_once_its_job_is_final(store: JobStore) -> None:
    plain = new_job(store, webhook_url=None)
    job = new_job(store)
    assert store.webhook_delivery(plain.id) is None
    pending = store.webhook_delivery(job.id)
    assert pending is not None
    assert (pending.state, pending.attempts) == ("pending", 0)
    assert pending.url == job.params["webhook_url"]
    assert pending.id.startswith("whd_")
    assert store.claim_webhook_deliveries("d1", 10, 60) == []  # not due: the job runs

    store.transition(job.id, JobStatus.RUNNING)
    store.transition(plain.id, JobStatus.RUNNING)
    assert store.claim_webhook_deliveries("d1", 10, 60) == []
    store.transition(plain.id, JobStatus.SUCCEEDED)
    store.transition(job.id, JobStatus.SUCCEEDED)  # the hook: due now
    (claimed,) = store.claim_webhook_deliveries("d1", 10, 60)
    assert (claimed.id, claimed.job_id, claimed.owner) == (pending.id, job.id, "key-a")
    assert claimed.claim
    # Another dispatcher does not get it while it is claimed, nor does a new "final" mark.
    store.transition(job.id, JobStatus.FAILED)  # refused: final already
    assert store.claim_webhook_deliveries("d2", 10, 60) == []

    stale = type(claimed)(**{**claimed.__dict__, "claim": "d9:1"})
    assert not store.complete_webhook_delivery(stale, DeliveryState.DELIVERED, None)
    assert store.complete_webhook_delivery(claimed, DeliveryState.PENDING, "answered 500", 0.0)
    (again,) = store.claim_webhook_deliveries("d2", 10, 60)
    assert (again.id, again.attempts) == (pending.id, 1)
    assert store.complete_webhook_delivery(again, DeliveryState.DELIVERED, None)
    done = store.webhook_delivery(job.id)
    assert done is not None and (done.state, done.attempts, done.claim) == ("delivered", 2, None)
    assert store.claim_webhook_deliveries("d1", 10, 60) == []


def test_cancel_and_unserved_failures_make_deliveries_due(store: JobStore) -> None:
    canceled = new_job(store)
    unserved = new_job(store)
    store.request_cancel(canceled.id)
    ids = store.fail_queued_jobs("mini", int(time.time() * 1000) + 1000, "no worker")
    assert unserved.id in ids
    claimed = store.claim_webhook_deliveries("d1", 10, 60)
    assert sorted(d.job_id for d in claimed) == sorted([canceled.id, unserved.id])
    given_up = claimed[0]
    assert store.complete_webhook_delivery(given_up, DeliveryState.FAILED, "gave up after 3 tries")
    record = store.webhook_delivery(given_up.job_id)
    assert record is not None
    assert (record.state, record.last_error) == ("failed", "gave up after 3 tries")


def test_a_claim_that_is_never_completed_is_claimed_again(store: JobStore) -> None:
    job = new_job(store)
    store.request_cancel(job.id)
    (first,) = store.claim_webhook_deliveries("dies", 10, 0.3)
    deadline = time.monotonic() + 10
    while not (again := store.claim_webhook_deliveries("lives", 10, 60)):
        assert time.monotonic() < deadline, "the expired claim was never claimed again"
        time.sleep(0.05)
    assert again[0].id == first.id and again[0].claim != first.claim
    assert not store.complete_webhook_delivery(first, DeliveryState.DELIVERED, None)
    assert store.complete_webhook_delivery(again[0], DeliveryState.DELIVERED, None)


def test_the_outbox_survives_reopening_the_store(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, store: JobStore
) -> None:
    job = new_job(store)
    store.transition(job.id, JobStatus.RUNNING)
    store.transition(job.id, JobStatus.SUCCEEDED)
    store.close()
    server = request.getfixturevalue("redis_server") if kind == "redis" else None
    reopened = open_store(kind, tmp_path, server)
    try:
        (claimed,) = reopened.claim_webhook_deliveries("after-restart", 10, 60)
        assert claimed.job_id == job.id
    finally:
        reopened.close()
