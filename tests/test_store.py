"""The JobStore contract on both backends (SQLite file, real redis-server), and SqliteJobQueue."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from core.job import JobRecord, JobStatus, new_job_id, utc_now
from core.queue import JobQueue
from core.queue_celery import CeleryJobQueue
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.store import (
    DURATION_BUCKETS_S,
    IdempotencyConflict,
    JobNotFound,
    JobStore,
    StoreUnavailable,
)
from core.store_redis import RedisJobStore, redact_url
from core.store_sqlite import SqliteJobStore
from core.unserved import UnservedJobSweeper, fail_unserved_jobs
from tests.servers import RedisServer, free_port, running_redis

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER_ALIVE_S = 0.5
T0_MS = 1_700_000_000_000  # a fixed creation time, so test jobs sort by the offsets given


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    backend: JobStore
    if request.param == "sqlite":
        backend = SqliteJobStore(tmp_path / "farm.db", worker_alive_s=WORKER_ALIVE_S)
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        if server.process is None:  # a test killed it and failed before restarting it
            server.start()
        with redis.Redis.from_url(server.url) as client:
            client.flushall()
        backend = RedisJobStore(server.url, worker_alive_s=WORKER_ALIVE_S)
    try:
        yield backend
    finally:
        backend.close()


def raw_contents(store: JobStore) -> str:
    """Everything the backend holds, as text, to look for secrets in."""
    if isinstance(store, SqliteJobStore):
        with sqlite3.connect(store.path) as connection:
            dump = "\n".join(connection.iterdump())
        connection.close()
        files = [store.path, store.path.with_name(store.path.name + "-wal")]
        raw = b"".join(path.read_bytes() for path in files if path.exists())
        return dump + raw.decode("latin-1")
    assert isinstance(store, RedisJobStore)
    parts: list[str] = []
    with redis.Redis.from_url(store.url, decode_responses=True) as client:
        for key in client.scan_iter():
            parts.append(key)
            kind = client.type(key)
            if kind == "string":
                parts.append(client.get(key) or "")
            elif kind == "hash":
                parts.extend(f"{k}={v}" for k, v in client.hgetall(key).items())
            elif kind == "set":
                parts.extend(client.smembers(key))
            elif kind == "zset":
                parts.extend(client.zrange(key, 0, -1))
            elif kind == "list":
                parts.extend(client.lrange(key, 0, -1))
    return "\n".join(parts)


def make_job(
    owner: str = "key-a", offset_ms: int = 0, text: str = "a cat", model: str | None = None
) -> JobRecord:
    params: dict[str, object] = {"text": text, "seed": 7, "temperature": 1.0}
    if model is not None:
        params["model"] = model
    return JobRecord(
        id=new_job_id(T0_MS + offset_ms),
        owner=owner,
        status=JobStatus.QUEUED,
        params=params,
        created_at=utc_now(),
    )


def add_job(store: JobStore, owner: str = "key-a", offset_ms: int = 0) -> JobRecord:
    record, created = store.create_job(make_job(owner, offset_ms))
    assert created
    return record


def move(store: JobStore, job_id: str, *statuses: JobStatus) -> JobRecord:
    record = None
    for status in statuses:
        record = store.transition(job_id, status)
        assert record is not None, f"refused to move {job_id} to {status.value}"
    assert record is not None
    return record


# -- API keys -------------------------------------------------------------------------------------


def test_keys_authenticate_list_and_revoke(store: JobStore) -> None:
    alice, alice_secret = store.create_key("alice")
    bob, bob_secret = store.create_key("bob")
    assert alice_secret.startswith(f"dfk_{alice.id}_")
    assert alice.id != bob.id and alice_secret != bob_secret
    assert store.authenticate(alice_secret) == alice
    assert store.authenticate(bob_secret) == bob
    last_changed = alice_secret[:-1] + ("B" if alice_secret.endswith("A") else "A")
    for wrong in ("", "dfk_", last_changed, alice_secret + "x", bob_secret[::-1]):
        assert store.authenticate(wrong) is None
    # Bob's random part with Alice's id.
    assert store.authenticate(f"dfk_{alice.id}_{bob_secret.split('_', 2)[2]}") is None
    assert store.list_keys() == [alice, bob]

    assert store.revoke_key(alice.id) is True
    assert store.authenticate(alice_secret) is None
    assert store.authenticate(bob_secret) == bob
    assert [key.revoked for key in store.list_keys()] == [True, False]
    assert store.revoke_key("nobody") is False


def test_revoke_by_name_revokes_every_key_of_that_name(store: JobStore) -> None:
    first, first_secret = store.create_key("ci")
    second, second_secret = store.create_key("ci")
    other, other_secret = store.create_key("laptop")
    assert store.revoke_key("ci") is True
    assert store.authenticate(first_secret) is None
    assert store.authenticate(second_secret) is None
    assert store.authenticate(other_secret) == other
    revoked = {key.id: key.revoked for key in store.list_keys()}
    assert revoked == {first.id: True, second.id: True, other.id: False}


def test_key_secrets_are_not_stored(store: JobStore) -> None:
    secrets = [store.create_key(f"key-{i}")[1] for i in range(3)]
    contents = raw_contents(store)
    assert store.list_keys()[0].id in contents  # the dump does hold the keys
    for secret in secrets:
        assert secret not in contents
        assert secret.split("_", 2)[2] not in contents
    with pytest.raises(ValueError, match="name"):
        store.create_key("  ")


# -- jobs: create, get, list ----------------------------------------------------------------------


def test_create_and_get(store: JobStore) -> None:
    job = make_job()
    stored, created = store.create_job(job)
    assert created and stored == job
    assert store.get_job(job.id) == job
    assert store.get_job(new_job_id()) is None
    with pytest.raises(ValueError, match="already exists"):
        store.create_job(job)


def test_list_newest_first_in_pages(store: JobStore) -> None:
    jobs = [add_job(store, offset_ms=i) for i in range(7)]
    add_job(store, owner="key-b", offset_ms=100)
    newest_first = [job.id for job in reversed(jobs)]

    pages: list[list[str]] = []
    cursor = None
    while True:
        page, cursor = store.list_jobs("key-a", cursor=cursor, limit=3)
        pages.append([job.id for job in page])
        if cursor is None:
            break
    assert pages == [newest_first[0:3], newest_first[3:6], newest_first[6:]]
    # A page that ends exactly at the last job has no next cursor.
    page, cursor = store.list_jobs("key-a", limit=7)
    assert [job.id for job in page] == newest_first and cursor is None
    assert store.list_jobs("key-c") == ([], None)
    with pytest.raises(ValueError, match="limit"):
        store.list_jobs("key-a", limit=0)


def test_list_by_status_and_owner(store: JobStore) -> None:
    jobs = [add_job(store, offset_ms=i) for i in range(8)]
    for job in jobs[::2]:
        move(store, job.id, JobStatus.RUNNING)
    others = [add_job(store, owner="key-b", offset_ms=50 + i) for i in range(2)]
    move(store, others[0].id, JobStatus.RUNNING)

    running = [job.id for job in reversed(jobs[::2])]
    page, cursor = store.list_jobs("key-a", status=JobStatus.RUNNING, limit=3)
    assert [job.id for job in page] == running[:3] and cursor is not None
    assert all(job.status is JobStatus.RUNNING for job in page)
    page, cursor = store.list_jobs("key-a", status=JobStatus.RUNNING, cursor=cursor, limit=3)
    assert [job.id for job in page] == running[3:] and cursor is None

    queued, _ = store.list_jobs("key-a", status=JobStatus.QUEUED)
    assert [job.id for job in queued] == [job.id for job in reversed(jobs[1::2])]
    assert store.list_jobs("key-a", status=JobStatus.FAILED) == ([], None)
    mine, _ = store.list_jobs("key-b")
    assert [job.id for job in mine] == [others[1].id, others[0].id]


# -- idempotency ----------------------------------------------------------------------------------


def test_idempotency_key_returns_the_first_job(store: JobStore) -> None:
    first, created = store.create_job(make_job(), "retry-1", "fingerprint-1")
    assert created
    again, created = store.create_job(make_job(offset_ms=1), "retry-1", "fingerprint-1")
    assert not created and again == first
    with pytest.raises(IdempotencyConflict) as conflict:
        store.create_job(make_job(offset_ms=2), "retry-1", "fingerprint-2")
    assert "retry-1" not in str(conflict.value)
    assert "different request body" in str(conflict.value)
    # Keys are scoped to the owner.
    other, created = store.create_job(make_job("key-b", 3), "retry-1", "fingerprint-2")
    assert created and other.owner == "key-b"
    assert len(store.list_jobs("key-a")[0]) == 1


def test_idempotency_key_under_concurrent_requests(store: JobStore) -> None:
    thread_count = 20
    barrier = threading.Barrier(thread_count)
    results: list[tuple[str, bool]] = []
    errors: list[BaseException] = []

    def submit(i: int) -> None:
        try:
            barrier.wait()
            record, created = store.create_job(make_job(offset_ms=i), "same-key", "same-body")
            results.append((record.id, created))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({job_id for job_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert len(store.list_jobs("key-a")[0]) == 1


# -- transitions and updates ----------------------------------------------------------------------


def test_transition_moves_forward_only(store: JobStore) -> None:
    job = add_job(store)
    started = store.transition(job.id, JobStatus.RUNNING, worker="w1", started_at="t1", attempts=1)
    assert started is not None
    assert (started.status, started.worker, started.attempts) == (JobStatus.RUNNING, "w1", 1)
    assert store.get_job(job.id) == started
    assert store.transition(job.id, JobStatus.RUNNING, worker="w2") is None  # not to itself
    requeued = store.transition(job.id, JobStatus.QUEUED, worker=None)
    assert requeued is not None and requeued.worker is None
    move(store, job.id, JobStatus.RUNNING)
    result = {"grid": f"jobs/{job.id}/grid.png", "images": [], "previews": []}
    done = store.transition(job.id, JobStatus.SUCCEEDED, result=result, progress_step=256)
    assert done is not None and done.result == result
    # A duplicate delivery finishing the job again changes nothing.
    assert store.transition(job.id, JobStatus.SUCCEEDED, error="again") is None
    for status in JobStatus:
        assert store.transition(job.id, status) is None
    assert store.get_job(job.id) == done

    with pytest.raises(JobNotFound):
        store.transition(new_job_id(), JobStatus.RUNNING)
    with pytest.raises(ValueError, match="status"):
        store.transition(job.id, JobStatus.FAILED, status="failed")
    with pytest.raises(ValueError, match="colour"):
        store.transition(job.id, JobStatus.FAILED, colour="red")


def test_transition_is_a_compare_and_set_under_concurrency(store: JobStore) -> None:
    """Two deliveries of one job race to start it: exactly one worker wins."""
    job = add_job(store)
    thread_count = 10
    barrier = threading.Barrier(thread_count)
    winners: list[str] = []

    def start(worker: str) -> None:
        barrier.wait()
        if store.transition(job.id, JobStatus.RUNNING, worker=worker) is not None:
            winners.append(worker)

    threads = [threading.Thread(target=start, args=(f"w{i}",)) for i in range(thread_count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(winners) == 1
    stored = store.get_job(job.id)
    assert stored is not None and stored.worker == winners[0]
    assert store.metrics().jobs_by_status["running"] == 1


def test_update_sets_fields_but_not_identity(store: JobStore) -> None:
    job = add_job(store)
    updated = store.update(job.id, progress_step=12, worker="w1", result={"previews": ["p0"]})
    assert (updated.progress_step, updated.worker, updated.status) == (12, "w1", JobStatus.QUEUED)
    assert updated.result == {"previews": ["p0"]}
    assert store.get_job(job.id) == updated
    for name in ("id", "owner", "status", "nonsense"):
        with pytest.raises(ValueError, match=name):
            store.update(job.id, **{name: "x"})
    with pytest.raises(JobNotFound):
        store.update(new_job_id(), progress_step=1)
    assert store.get_job(job.id) == updated


def test_request_cancel_in_each_state(store: JobStore) -> None:
    queued = add_job(store, offset_ms=0)
    canceled = store.request_cancel(queued.id)
    assert canceled.status is JobStatus.CANCELED and canceled.finished_at is not None
    assert store.get_job(queued.id) == canceled

    running = add_job(store, offset_ms=1)
    move(store, running.id, JobStatus.RUNNING)
    asked = store.request_cancel(running.id)
    assert asked.status is JobStatus.RUNNING and asked.cancel_requested
    assert store.get_job(running.id) == asked
    assert store.request_cancel(running.id) == asked

    for i, terminal in enumerate((JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)):
        job = add_job(store, offset_ms=2 + i)
        final = move(store, job.id, JobStatus.RUNNING, terminal)
        assert store.request_cancel(job.id) == final
    with pytest.raises(JobNotFound):
        store.request_cancel(new_job_id())

    assert [job.id for job in store.list_jobs("key-a", status=JobStatus.CANCELED)[0]] == [
        store.list_jobs("key-a")[0][0].id,
        queued.id,
    ]
    assert store.metrics().jobs_by_status == {
        "queued": 0,
        "running": 1,
        "succeeded": 1,
        "failed": 1,
        "canceled": 2,
    }


# -- leases ---------------------------------------------------------------------------------------


def test_leases(store: JobStore) -> None:
    job_id = new_job_id()
    assert store.lease_holder(job_id) is None
    assert store.renew_lease(job_id, "w1", 10.0)
    assert store.renew_lease(job_id, "w1", 10.0)  # the holder extends it
    assert not store.renew_lease(job_id, "w2", 10.0)
    assert store.lease_holder(job_id) == "w1"
    store.release_lease(job_id, "w2")  # not the holder: nothing happens
    assert store.lease_holder(job_id) == "w1"
    store.release_lease(job_id, "w1")
    assert store.lease_holder(job_id) is None
    assert store.renew_lease(job_id, "w2", 0.2)
    assert not store.renew_lease(job_id, "w1", 10.0)
    time.sleep(0.3)
    assert store.lease_holder(job_id) is None  # w2 died
    assert store.renew_lease(job_id, "w1", 10.0)
    assert store.lease_holder(job_id) == "w1"
    with pytest.raises(ValueError, match="lease time"):
        store.renew_lease(job_id, "w1", 0)


# -- metrics --------------------------------------------------------------------------------------


def test_metrics(store: JobStore) -> None:
    empty = store.metrics()
    assert empty.jobs_by_status == {status.value: 0 for status in JobStatus}
    assert empty.duration_bucket_counts == [0] * (len(DURATION_BUCKETS_S) + 1)
    assert (empty.duration_sum_s, empty.duration_count) == (0.0, 0)
    assert (empty.images_generated, empty.workers_alive) == (0, 0)

    jobs = [add_job(store, offset_ms=i) for i in range(4)]
    move(store, jobs[0].id, JobStatus.RUNNING, JobStatus.SUCCEEDED)
    move(store, jobs[1].id, JobStatus.RUNNING)
    move(store, jobs[2].id, JobStatus.FAILED)
    # A bound is inclusive (Prometheus `le`): 1.0 goes in the first bucket.
    durations = (0.5, 1.0, 3.0, 700.0, 5000.0)
    for duration in durations:
        store.observe_finished(JobStatus.SUCCEEDED, duration, 4)
    store.observe_finished(JobStatus.FAILED, 2.0, 0)
    store.worker_heartbeat("w1")
    store.worker_heartbeat("w2")
    store.worker_heartbeat("w1")

    snapshot = store.metrics()
    assert snapshot.jobs_by_status == {
        "queued": 1,
        "running": 1,
        "succeeded": 1,
        "failed": 1,
        "canceled": 0,
    }
    # Bounds: 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, +Inf.
    assert snapshot.duration_bucket_counts == [2, 3, 4, 4, 4, 4, 4, 4, 4, 5, 6]
    assert snapshot.duration_sum_s == pytest.approx(sum(durations) + 2.0)
    assert snapshot.duration_count == 6
    assert snapshot.images_generated == 20
    assert snapshot.workers_alive == 2

    time.sleep(WORKER_ALIVE_S + 0.1)
    assert store.metrics().workers_alive == 0
    store.worker_heartbeat("w2")
    assert store.metrics().workers_alive == 1
    with pytest.raises(ValueError):
        store.observe_finished(JobStatus.SUCCEEDED, -1.0, 1)


# -- workers and the models they serve -------------------------------------------------------------


def test_workers_announce_the_models_they_serve_and_leave(store: JobStore) -> None:
    assert store.served_models() == frozenset()
    assert store.models_last_served() == {}
    store.worker_heartbeat("gpu0@a", models=["mini"])
    store.worker_heartbeat("gpu1@a", models=("mega", "mini"))
    assert store.served_models() == {"mini", "mega"}
    assert set(store.models_last_served()) == {"mini", "mega"}
    assert store.metrics().workers_alive == 2

    # A heartbeat without models (a running job's) keeps what the worker announced.
    store.worker_heartbeat("gpu1@a")
    assert store.served_models() == {"mini", "mega"}
    # A new announcement replaces the old one.
    store.worker_heartbeat("gpu1@a", models=["mini"])
    assert store.served_models() == {"mini"}
    store.worker_heartbeat("gpu1@a", models=["mega"])

    before = store.models_last_served()["mega"]
    store.worker_gone("gpu1@a")  # a clean shutdown: gone at once
    assert store.served_models() == {"mini"}
    assert store.metrics().workers_alive == 1
    assert store.models_last_served()["mega"] >= before
    store.worker_gone("gpu1@a")  # twice is harmless
    store.worker_gone("never-seen")

    # A worker that dies is gone when its heartbeat expires.
    store.worker_heartbeat("gpu2@b", models=["mega"], ttl_s=0.2)
    assert store.served_models() == {"mini", "mega"}
    time.sleep(0.3)
    assert store.served_models() == {"mini"}
    time.sleep(WORKER_ALIVE_S)  # the store's default lifetime of a heartbeat
    assert store.served_models() == frozenset()
    assert store.metrics().workers_alive == 0

    for bad in (["mi,ni"], [""], ["mini", 7], "mini"):
        with pytest.raises(ValueError, match="model"):
            store.worker_heartbeat("gpu0@a", models=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="worker"):
        store.worker_heartbeat(" ")
    with pytest.raises(ValueError, match="lease time"):
        store.worker_heartbeat("gpu0@a", ttl_s=0)


def add_model_job(
    store: JobStore, model: str | None, offset_ms: int, *statuses: JobStatus
) -> JobRecord:
    record, _ = store.create_job(make_job(offset_ms=offset_ms, model=model))
    return move(store, record.id, *statuses) if statuses else record


def test_queued_jobs_of_an_unserved_model_fail_after_the_bound(store: JobStore) -> None:
    """The jobs were created in 2023 (T0_MS): long past any bound."""
    waiting = add_model_job(store, "mega", 0)
    requeued = add_model_job(store, "mega", 1, JobStatus.RUNNING, JobStatus.QUEUED)
    running = add_model_job(store, "mega", 2, JobStatus.RUNNING)
    canceled = add_model_job(store, "mega", 3, JobStatus.CANCELED)
    served = add_model_job(store, "mini", 4)
    default_model = add_model_job(store, None, 5)  # no model in its params: Mini's
    store.worker_heartbeat("gpu0@a", models=["mini"])

    failed = fail_unserved_jobs(store, timeout_s=60)
    assert failed == [waiting.id, requeued.id]
    for job_id in failed:
        record = store.get_job(job_id)
        assert record is not None and record.status is JobStatus.FAILED
        assert record.finished_at is not None
        assert (record.error or "").startswith("no worker serves model 'mega'; ")
        assert "DALLE_FARM_UNSERVED_JOB_TIMEOUT_S" in (record.error or "")
        assert "the farm serves mini now" in (record.error or "")
    for untouched in (running, canceled, served, default_model):
        assert store.get_job(untouched.id) == untouched
    assert fail_unserved_jobs(store, timeout_s=60) == []
    metrics = store.metrics()
    assert metrics.jobs_by_status["failed"] == 2
    assert metrics.duration_count == 2  # counted as finished, with their time in the queue
    assert store.count_queued() == 2

    # Once no worker is alive at all, Mini's jobs fail too, the bound after its last worker left.
    store.worker_gone("gpu0@a")
    assert fail_unserved_jobs(store, timeout_s=60) == []
    failed = fail_unserved_jobs(store, timeout_s=60, now=time.time() + 61)
    assert failed == [served.id, default_model.id]
    record = store.get_job(served.id)
    assert record is not None and "no worker is alive at all now" in (record.error or "")
    assert store.count_queued() == 0


def test_the_bound_counts_from_creation_and_from_the_last_worker_of_the_model(
    store: JobStore,
) -> None:
    now = time.time()
    job, _ = store.create_job(
        JobRecord(
            id=new_job_id(int(now * 1000)),
            owner="key-a",
            status=JobStatus.QUEUED,
            params={"text": "a cat", "model": "mega"},
            created_at=utc_now(),
        )
    )
    assert fail_unserved_jobs(store, timeout_s=60, now=now + 30) == []  # created 30 s ago
    old = add_model_job(store, "mega", 0)  # created long ago, but Mega was served until now
    store.worker_heartbeat("gpu1@a", models=["mega"])
    store.worker_gone("gpu1@a")
    assert fail_unserved_jobs(store, timeout_s=60, now=now + 30) == []
    assert fail_unserved_jobs(store, timeout_s=60, now=now + 120) == [old.id, job.id]


def test_failing_queued_jobs_goes_in_batches(store: JobStore) -> None:
    jobs = [add_model_job(store, "mega", i) for i in range(3)]
    newer = add_model_job(store, "mega", 10)
    bound_ms = T0_MS + 5
    error = "no worker serves model 'mega'"
    assert store.fail_queued_jobs("mega", bound_ms, error, limit=2) == [jobs[0].id, jobs[1].id]
    assert store.fail_queued_jobs("mega", bound_ms, error, limit=2) == [jobs[2].id]
    assert store.fail_queued_jobs("mega", bound_ms, error, limit=2) == []
    assert store.fail_queued_jobs("mini", T0_MS + 100, error) == []
    assert store.get_job(newer.id) == newer
    with pytest.raises(ValueError, match="model"):
        store.fail_queued_jobs("mi,ni", bound_ms, error)


def test_the_sweeper_sweeps_at_most_once_per_interval(store: JobStore) -> None:
    now = [100.0]
    sweeper = UnservedJobSweeper(store, timeout_s=60, interval_s=10, clock=lambda: now[0])
    first = add_model_job(store, "mega", 0)
    assert sweeper.maybe() == [first.id]
    second = add_model_job(store, "mega", 1)
    now[0] += 9
    assert sweeper.maybe() == []  # within the interval: no sweep
    now[0] += 1
    assert sweeper.maybe() == [second.id]
    assert UnservedJobSweeper(store, timeout_s=8).interval_s == 2  # a quarter of a short bound
    with pytest.raises(ValueError, match="timeout_s"):
        UnservedJobSweeper(store, timeout_s=0)


# -- odd text -------------------------------------------------------------------------------------


def test_lone_surrogates_are_stored_or_refused_clearly(store: JobStore) -> None:
    odd = "a cat \ud800 and \udcff, caf\u00e9 \U0001f408"
    job, _ = store.create_job(make_job(text=odd), idempotency_key="key \udc80", fingerprint="f")
    assert store.get_job(job.id) == job and job.params["text"] == odd
    again, created = store.create_job(make_job(offset_ms=1), "key \udc80", "f")
    assert not created and again == job
    failed = store.transition(job.id, JobStatus.FAILED, error=f"could not open {odd}")
    assert failed is not None and failed.error == f"could not open {odd}"
    assert store.list_jobs("key-a") == ([failed], None)
    with pytest.raises(ValueError, match="lone surrogate"):
        store.create_key("ops \ud800")
    with pytest.raises(ValueError, match="cursor"):
        store.list_jobs("key-a", cursor="\ud800")
    assert store.revoke_key("ops \ud800") is False


# -- availability ---------------------------------------------------------------------------------


def test_check_when_redis_goes_away_and_comes_back(redis_server: RedisServer) -> None:
    with RedisJobStore(redis_server.url) as store:
        try:
            store.check()
            job = add_job(store)
            redis_server.kill()
            with pytest.raises(StoreUnavailable, match=f"Redis at {redis_server.url}"):
                store.check()
            with pytest.raises(StoreUnavailable):
                store.get_job(job.id)
            redis_server.restart()
            store.check()
            assert store.get_job(job.id) == job  # appendonly: the data survived
            # Redis forgot the loaded scripts; they are loaded again.
            assert store.transition(job.id, JobStatus.RUNNING) is not None
        finally:
            if redis_server.process is None:
                redis_server.start()


def test_redis_errors_do_not_show_the_password() -> None:
    assert redact_url("redis://user:hunter2@redis:6380/1") == "redis://user:***@redis:6380/1"
    assert redact_url("rediss://:hunter2@[::1]/0") == "rediss://:***@[::1]/0"
    assert redact_url("redis://redis:6379/0") == "redis://redis:6379/0"
    store = RedisJobStore(f"redis://:hunter2@127.0.0.1:{free_port()}/0")
    with store, pytest.raises(StoreUnavailable) as unavailable:
        store.check()
    assert "hunter2" not in str(unavailable.value)
    assert ":***@127.0.0.1" in str(unavailable.value)


def test_redis_store_on_a_client_of_the_caller(redis_server: RedisServer) -> None:
    """A redis.Redis without decode_responses (bytes replies), which the store must not close."""
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
        store = RedisJobStore(client, prefix="farm-b")
        key, secret = store.create_key("ci")
        assert store.authenticate(secret) == key and store.list_keys() == [key]
        job = add_job(store, owner=key.id)
        assert store.list_jobs(key.id) == ([job], None)
        running = move(store, job.id, JobStatus.RUNNING)
        assert store.get_job(job.id) == running
        assert store.renew_lease(job.id, "w1", 10) and store.lease_holder(job.id) == "w1"
        assert store.metrics().jobs_by_status["running"] == 1
        store.worker_heartbeat("gpu0@a", models=["mini", "mega"])
        assert store.served_models() == {"mini", "mega"}
        assert set(store.models_last_served()) == {"mini", "mega"}
        store.close()
        assert client.ping()
        assert all(name.startswith(b"farm-b:") for name in client.scan_iter())


def test_sqlite_check_and_unusable_files(tmp_path: Path) -> None:
    with SqliteJobStore(tmp_path / "nested" / "farm.db") as store:
        store.check()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, just some bytes " * 200)
    with pytest.raises(StoreUnavailable, match=r"garbage\.db"):
        SqliteJobStore(garbage)
    with pytest.raises(StoreUnavailable, match="closed"):
        store.check()


def test_sqlite_store_is_shared_across_instances(tmp_path: Path) -> None:
    """The API and the embedded worker open the same file."""
    with (
        SqliteJobStore(tmp_path / "farm.db") as api,
        SqliteJobStore(tmp_path / "farm.db") as worker,
    ):
        job = add_job(api)
        move(worker, job.id, JobStatus.RUNNING)
        assert api.request_cancel(job.id).cancel_requested
        assert worker.get_job(job.id) == api.get_job(job.id)


# -- SqliteJobQueue -------------------------------------------------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> Iterator[SqliteJobQueue]:
    with SqliteJobQueue(tmp_path / "farm.db") as job_queue:
        _contract: JobQueue = job_queue  # mypy checks that it meets the JobQueue protocol
        yield job_queue


def test_queue_is_fifo_with_ack_and_release(queue: SqliteJobQueue) -> None:
    for job_id in ("a", "b", "c"):
        queue.enqueue(job_id)
    queue.enqueue("a")  # already waiting: stays first, not added twice
    assert queue.depth() == 3
    assert queue.lease("w1", 60) == "a"
    assert queue.lease("w1", 60) == "b"
    assert queue.depth() == 1
    queue.ack("a")
    queue.release("b")  # e.g. on SIGTERM: back at once, ahead of c
    assert queue.depth() == 2
    assert queue.lease("w2", 60) == "b"
    assert queue.deliveries("b") == 2
    assert queue.lease("w2", 60) == "c"
    assert queue.lease("w2", 60) is None
    queue.ack("b")
    queue.ack("c")
    assert queue.depth() == 0 and queue.deliveries("c") == 0
    queue.check()


def test_queue_expired_lease_is_leased_again(queue: SqliteJobQueue) -> None:
    queue.enqueue("a")
    queue.enqueue("b")
    assert queue.lease("w1", 0.2) == "a"
    assert queue.lease("w1", 10.0) == "b"
    assert queue.extend("b", "w1", 0.2)
    assert queue.depth() == 0
    time.sleep(0.3)  # w1 died
    assert queue.depth() == 2
    assert queue.lease("w2", 10.0) == "a"
    assert queue.deliveries("a") == 2
    assert not queue.extend("a", "w1", 10.0)
    assert queue.extend("a", "w2", 10.0)


def test_queue_survives_reopening(tmp_path: Path) -> None:
    with SqliteJobQueue(tmp_path / "farm.db") as queue:
        for job_id in ("a", "b", "c"):
            queue.enqueue(job_id)
        assert queue.lease("w1", 60) == "a"
        queue.release("a")
    with SqliteJobQueue(tmp_path / "farm.db") as queue:
        assert queue.depth() == 3
        assert [queue.lease("w1", 60) for _ in range(4)] == ["a", "b", "c", None]


_LEASE_ALL = """
import os, sys, time
from core.queue_sqlite import SqliteJobQueue
path, worker, go = sys.argv[1], sys.argv[2], sys.argv[3]
with SqliteJobQueue(path) as queue:
    print("ready", flush=True)
    while not os.path.exists(go):  # all processes start leasing together
        time.sleep(0.001)
    while (job_id := queue.lease(worker, 60.0)) is not None:
        print(job_id, flush=True)
        time.sleep(0.005)  # "work", so that the others get the lock in between
"""


def test_queue_processes_never_lease_the_same_job(tmp_path: Path) -> None:
    path = tmp_path / "farm.db"
    go = tmp_path / "go"
    job_ids = [f"job-{i:04d}" for i in range(200)]
    with SqliteJobQueue(path) as queue:
        for job_id in job_ids:
            queue.enqueue(job_id)
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _LEASE_ALL, str(path), f"w{i}", str(go)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(3)
    ]
    for process in processes:  # however long their imports take on a busy machine
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    go.touch()
    leased: list[list[str]] = []
    for process in processes:
        stdout, _ = process.communicate(timeout=60)
        assert process.returncode == 0
        leased.append(stdout.split())
    everything = [job_id for ids in leased for job_id in ids]
    assert sorted(everything) == job_ids  # each job exactly once
    assert all(leased), "some process leased nothing: they did not run together"


def test_queue_depth_leaves_out_jobs_canceled_or_failed_while_queued(tmp_path: Path) -> None:
    with (
        SqliteJobStore(tmp_path / "farm.db") as store,
        SqliteJobQueue(tmp_path / "farm.db") as queue,
    ):
        jobs = [add_job(store, offset_ms=i) for i in range(4)]
        for job in jobs:
            queue.enqueue(job.id)
        assert queue.depth() == 4
        store.request_cancel(jobs[0].id)
        store.fail_queued_jobs("mini", T0_MS + 2, "no worker serves model 'mini'")
        assert queue.depth() == 2  # their rows stay until a worker drops them
        assert queue.lease("w1", 60) == jobs[0].id
        queue.ack(jobs[0].id)
        move(store, jobs[2].id, JobStatus.RUNNING)  # running, its row free again: it waits
        assert queue.depth() == 2


def test_celery_queue_depth_counts_the_jobs_waiting(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    settings = Settings(redis_url=redis_server.url)
    with RedisJobStore(redis_server.url) as store:
        queue = CeleryJobQueue(settings, store=store)
        _contract: JobQueue = queue
        try:
            jobs = [add_job(store, offset_ms=i) for i in range(3)]
            for job in jobs:
                queue.enqueue(job.id)
            assert queue.depth() == 3
            store.request_cancel(jobs[0].id)
            store.fail_queued_jobs("mini", T0_MS + 2, "no worker serves model 'mini'")
            assert queue.depth() == 1
            # The canceled and failed jobs' messages are still there, for a worker to drop.
            with redis.Redis.from_url(redis_server.url) as client:
                assert client.llen(settings.queue_name("mini")) == 3
        finally:
            queue.close()
