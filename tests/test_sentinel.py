"""Redis with Sentinel (core/redis_url.py): the URL; the job store and the request counter
following a failover; new jobs confirmed on a replica; a lost message sent again by the queue
audit. On a real master, replica and sentinel (redis-server --sentinel)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from api.app import create_app
from api.limits import RequestLimiter
from core.job import JobRecord, JobStatus, grid_key, new_job_id, utc_now
from core.limits import Rate
from core.queue_sqlite import SqliteJobQueue
from core.redis_url import celery_broker, parse_sentinel_url
from core.services import FarmServices, build_services
from core.settings import Settings
from core.storage import LocalStorage
from core.store_redis import RedisJobStore
from core.store_redis_base import redact_url
from tests.farm_helpers import (
    S3Server,
    subprocess_env,
    use_test_aws_credentials,
    wait_for,
    worker_process,
)
from tests.servers import SentinelRedis, sentinel_redis


def test_a_sentinel_url_names_the_sentinels_and_the_service() -> None:
    url = "redis+sentinel://:s%40cret@10.0.0.1:26379,[::1]:26380,sentinel-c/farm"
    target = parse_sentinel_url(url)
    assert target.sentinels == (("10.0.0.1", 26379), ("::1", 26380), ("sentinel-c", 26379))
    assert (target.service, target.password) == ("farm", "s@cret")
    broker, options = celery_broker(url)
    assert broker.split(";")[0] == "sentinel://:s%40cret@10.0.0.1:26379/0"
    assert options == {"master_name": "farm", "sentinel_kwargs": {"password": "s@cret"}}
    assert "s%40cret" not in redact_url(url) and "***" in redact_url(url)
    assert celery_broker("redis://h:6379/0") == ("redis://h:6379/0", {})


@pytest.mark.parametrize(
    "url", ["redis+sentinel://h1:26379", "redis+sentinel:///farm", "redis+sentinel://h:x/farm"]
)
def test_a_bad_sentinel_url_says_what_is_missing(url: str) -> None:
    with pytest.raises(ValueError, match="sentinel"):
        parse_sentinel_url(url)


@pytest.fixture
def redis_ha(tmp_path: Path) -> Iterator[SentinelRedis]:
    with sentinel_redis(tmp_path) as setup:
        yield setup


def queued(owner: str = "alice") -> JobRecord:
    return JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params={"text": "a fox", "seed": 7, "model": "mini"},
        created_at=utc_now(),
    )


def test_the_store_and_the_rate_counter_follow_a_failover(redis_ha: SentinelRedis) -> None:
    store = RedisJobStore(redis_ha.url)
    limiter = RequestLimiter.from_settings(Settings(redis_url=redis_ha.url))
    try:
        before = [store.create_job(queued())[0] for _ in range(3)]
        assert limiter.hit("alice", Rate(3, "h")) is None
        first_master = redis_ha.master_port()
        redis_ha.failover()
        assert redis_ha.master_port() != first_master
        # The same clients go on, now on the new master: nothing written before is lost, and
        # writes work.
        assert [store.get_job(job.id) for job in before] == before
        after, created = store.create_job(queued())
        assert created
        running = store.transition(after.id, JobStatus.RUNNING, worker="w", started_at=utc_now())
        assert running is not None and running.status is JobStatus.RUNNING
        assert limiter.hit("alice", Rate(3, "h")) is None
        assert limiter.hit("alice", Rate(3, "h")) is None
        assert limiter.hit("alice", Rate(3, "h")) is not None  # the count survived
    finally:
        store.close()


def test_a_failover_in_the_middle_of_a_run_loses_no_job(
    redis_ha: SentinelRedis, small_models_root: Path, tmp_path: Path
) -> None:
    """A real worker renders jobs from the Celery queue on a redis+sentinel:// URL; the master
    fails over while jobs are queued and running; every job still succeeds, once."""
    s3 = S3Server()
    s3.start()
    env = {
        "DALLE_FARM_REDIS_URL": redis_ha.url,
        "DALLE_FARM_S3_ENDPOINT_URL": s3.url,
        "DALLE_FARM_S3_BUCKET": "sentinel-results",
        "DALLE_FARM_MODELS_ROOT": str(small_models_root),
        "DALLE_FARM_VISIBILITY_TIMEOUT_S": "10",
    }
    worker = worker_process(subprocess_env(env), tmp_path, "ha")
    with pytest.MonkeyPatch.context() as patch:
        use_test_aws_credentials(patch)
        services = build_services(Settings.from_env(env), ensure_bucket=True)
    try:
        worker.start()
        worker.wait_for_log("ready", 120)
        jobs = []
        for seed in range(6):
            job, _ = services.store.create_job(queued_seed(seed))
            services.queue.enqueue(job.id, model="mini")
            jobs.append(job.id)
        # A job whose message is lost, as it may be when sent to the old master in the moment
        # before it is demoted: the worker's queue audit sends it again after the failover.
        jobs.append(services.store.create_job(queued_seed(6))[0].id)

        def started() -> bool:
            return any(_status(services, job_id) != "queued" for job_id in jobs)

        wait_for(started, 120, "a job to start")
        redis_ha.failover()

        def all_finished() -> bool:
            return all(_status(services, job_id) in ("succeeded", "failed") for job_id in jobs)

        wait_for(all_finished, 240, "every job to finish after the failover", 0.2)
        records = [services.store.get_job(job_id) for job_id in jobs]
        assert [record.status.value for record in records if record] == ["succeeded"] * 7, [
            (record.status, record.error) for record in records if record
        ]
        assert all(services.storage.exists(grid_key(job_id)) for job_id in jobs)
    finally:
        worker.kill_group()
        services.close()
        s3.stop()


def test_a_job_no_replica_confirms_is_answered_503_and_a_retry_finds_it(
    redis_ha: SentinelRedis, tmp_path: Path
) -> None:
    """With sentinels, a new job is confirmed on a replica before the 202 (Redis WAIT): a
    job written to a master that is failing over would otherwise be lost after its 202."""
    store = RedisJobStore(redis_ha.url, confirm_replicas=1)
    store.worker_heartbeat("tests", models=["mini"], ttl_s=3600)
    storage = LocalStorage(tmp_path / "files")
    storage.ensure_bucket()
    queue = SqliteJobQueue(tmp_path / "queue.db")
    app = create_app(Settings(data_dir=tmp_path), store=store, storage=storage, queue=queue)
    client = app.test_client()
    owner, secret = store.create_key("alice")

    def submit(key: str) -> Any:
        headers = {"Authorization": f"Bearer {secret}", "Idempotency-Key": key}
        return client.post("/v1/jobs", json={"text": "a fox"}, headers=headers)

    try:
        first = submit("first")
        assert first.status_code == 202, first.get_json()  # the replica confirmed it
        redis_ha.nodes[1].kill()  # now nothing can
        answer = submit("second")
        assert answer.status_code == 503 and answer.mimetype == "application/problem+json"
        assert int(answer.headers["Retry-After"]) > 0
        detail = answer.get_json()["detail"]
        assert "replica" in detail and "same Idempotency-Key" in detail
        # No failover came, so the job was kept, and queued in case it would be.
        kept = [job for job in store.list_jobs(owner.id)[0] if job.id in detail]
        assert [job.status for job in kept] == [JobStatus.QUEUED]
        assert queue.depth() == 2
        # Nor is a replay answered from it while unconfirmed: a failover now would drop it.
        assert submit("second").status_code == 503
        redis_ha.nodes[1].start()
        replay = submit("second")  # the client's retry
        assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.get_json()["id"] == kept[0].id
    finally:
        queue.close()
        store.close()


def queued_seed(seed: int) -> JobRecord:
    record = queued()
    record.params["seed"] = seed
    record.params["grid_size"] = 1
    return record


def _status(services: FarmServices, job_id: str) -> str:
    record = services.store.get_job(job_id)
    return "missing" if record is None else record.status.value
