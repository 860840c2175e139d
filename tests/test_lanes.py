"""Priority lanes (core/lanes.py): the embedded queue's take order and promotion, the API's
priority field and queue_position, and the Redis store's lane indexes and promotion (a real
redis-server). The distributed farm end to end is tests/test_lanes_farm.py."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from api.app import create_app
from core.job import InvalidParams, JobRecord, JobStatus, new_job_id, parse_params, utc_now
from core.lanes import BulkPromoter
from core.queue_celery import CeleryJobQueue, lane_queues
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import LocalStorage
from core.store import JobStore
from core.store_redis import RedisJobStore
from core.store_sqlite import SqliteJobStore
from tests.servers import RedisServer, running_redis
from worker.celery_app import create_celery_app, models_to_announce


def add_job(store: JobStore, priority: str | None = None, model: str = "mini") -> JobRecord:
    params: dict[str, Any] = {"text": "a fox", "model": model}
    if priority is not None:
        params["priority"] = priority
    record = JobRecord(
        id=new_job_id(),
        owner="owner",
        status=JobStatus.QUEUED,
        params=parse_params(params).to_dict(),
        created_at=utc_now(),
    )
    created, _ = store.create_job(record)
    return created


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[tuple[SqliteJobStore, SqliteJobQueue]]:
    path = tmp_path / "farm.db"
    with SqliteJobStore(path) as store, SqliteJobQueue(path, bulk_max_wait_s=60) as queue:
        yield store, queue


def queue_jobs(store: SqliteJobStore, queue: SqliteJobQueue, *priorities: str) -> list[JobRecord]:
    jobs = []
    for priority in priorities:
        job = add_job(store, priority)
        queue.enqueue(job.id)
        jobs.append(job)
    return jobs


def take_all(queue: SqliteJobQueue) -> list[str]:
    taken = []
    while (job_id := queue.lease("w", 60)) is not None:
        taken.append(job_id)
    return taken


def age_bulk_rows(store: SqliteJobStore, seconds: float) -> None:
    """As if the bulk rows had entered their lane `seconds` earlier."""
    with sqlite3.connect(store.path) as connection:
        connection.execute(
            "UPDATE queue SET entered_at = entered_at - ? WHERE lane = 'bulk'", (seconds,)
        )
    connection.close()


# -- the embedded queue ------------------------------------------------------------------------


def test_the_embedded_queue_takes_interactive_jobs_first_each_lane_oldest_first(
    embedded: tuple[SqliteJobStore, SqliteJobQueue],
) -> None:
    store, queue = embedded
    b1, b2, i1, b3, i2 = queue_jobs(
        store, queue, "bulk", "bulk", "interactive", "bulk", "interactive"
    )
    assert take_all(queue) == [i1.id, i2.id, b1.id, b2.id, b3.id]


def test_a_job_without_a_priority_and_a_row_from_before_lanes_are_interactive(
    embedded: tuple[SqliteJobStore, SqliteJobQueue],
) -> None:
    store, queue = embedded
    (bulk,) = queue_jobs(store, queue, "bulk")
    # A record stored before lanes existed: no priority in its params.
    old = add_job(store)
    assert old.params["priority"] == "interactive"
    with sqlite3.connect(store.path) as connection:
        record = json.loads(
            connection.execute("SELECT record FROM jobs WHERE id = ?", (old.id,)).fetchone()[0]
        )
        del record["params"]["priority"]
        connection.execute("UPDATE jobs SET record = ? WHERE id = ?", (json.dumps(record), old.id))
        # A queue row written before lanes: the columns' defaults.
        connection.execute("INSERT INTO queue (job_id) VALUES ('row-from-before-lanes')")
    connection.close()
    queue.enqueue(old.id)
    assert take_all(queue) == ["row-from-before-lanes", old.id, bulk.id]


def test_an_overdue_bulk_job_is_promoted_to_the_back_of_the_interactive_lane_one_at_a_time(
    embedded: tuple[SqliteJobStore, SqliteJobQueue],
) -> None:
    store, queue = embedded
    b1, b2, b3 = queue_jobs(store, queue, "bulk", "bulk", "bulk")
    age_bulk_rows(store, 120)  # past bulk_max_wait_s (60)
    i1, i2 = queue_jobs(store, queue, "interactive", "interactive")
    # b1 is promoted at the first take, behind i1 and i2, which came before; b2 waits until b1
    # has started, although it is overdue too.
    assert queue.lease("w", 60) == i1.id
    assert queue.lease("w", 60) == i2.id
    assert queue.lease("w", 60) == b1.id
    (i3,) = queue_jobs(store, queue, "interactive")
    # b2 is promoted now, after i3 came: i3 first.
    assert take_all(queue) == [i3.id, b2.id, b3.id]


def test_a_bulk_job_that_has_not_waited_the_bound_stays_behind(
    embedded: tuple[SqliteJobStore, SqliteJobQueue],
) -> None:
    store, queue = embedded
    (bulk,) = queue_jobs(store, queue, "bulk")
    age_bulk_rows(store, 30)  # under bulk_max_wait_s (60)
    (interactive,) = queue_jobs(store, queue, "interactive")
    assert take_all(queue) == [interactive.id, bulk.id]


def test_queue_positions_count_the_queued_jobs_ahead_in_the_lane(
    embedded: tuple[SqliteJobStore, SqliteJobQueue],
) -> None:
    store, queue = embedded
    b1, i1, b2, i2 = queue_jobs(store, queue, "bulk", "interactive", "bulk", "interactive")
    positions = {job.id: store.get_job(job.id).queue_position for job in (b1, i1, b2, i2)}  # type: ignore[union-attr]
    assert positions == {i1.id: 1, i2.id: 2, b1.id: 1, b2.id: 2}
    assert queue.lease("w", 60) == i1.id
    store.transition(i1.id, JobStatus.RUNNING)
    assert store.get_job(i1.id).queue_position is None  # type: ignore[union-attr]
    assert store.get_job(i2.id).queue_position == 1  # type: ignore[union-attr]
    store.request_cancel(b1.id)  # a canceled job's row is still there; it counts for nothing
    assert store.get_job(b2.id).queue_position == 1  # type: ignore[union-attr]
    page, _ = store.list_jobs("owner", status=JobStatus.QUEUED)
    assert {job.id: job.queue_position for job in page} == {i2.id: 1, b2.id: 1}


# -- the API -------------------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FlaskClient, dict[str, str], SqliteJobQueue]]:
    store = SqliteJobStore(tmp_path / "farm.db")
    store.worker_heartbeat("tests", models=["mini", "mega"], ttl_s=3600)
    queue = SqliteJobQueue(tmp_path / "farm.db")
    storage = LocalStorage(tmp_path / "files")
    storage.ensure_bucket()
    app = create_app(Settings(data_dir=tmp_path), store=store, storage=storage, queue=queue)
    _, secret = store.create_key("alice")
    yield app.test_client(), {"Authorization": f"Bearer {secret}"}, queue
    store.close()
    queue.close()


def test_a_bad_priority_is_a_422_naming_the_field(
    api: tuple[FlaskClient, dict[str, str], SqliteJobQueue],
) -> None:
    client, auth, _ = api
    for bad in ("urgent", "BULK", 1, None, ["bulk"]):
        response = client.post("/v1/jobs", json={"text": "a fox", "priority": bad}, headers=auth)
        assert response.status_code == 422, response.get_data(as_text=True)
        errors = response.get_json()["errors"]
        assert [error["field"] for error in errors] == ["priority"]
        assert errors[0]["message"].startswith('priority must be "interactive" or "bulk", got')
    with pytest.raises(InvalidParams, match='priority must be "interactive" or "bulk", got "x"'):
        parse_params({"text": "a", "priority": "x"})


def test_the_document_shows_the_lanes_and_the_position(
    api: tuple[FlaskClient, dict[str, str], SqliteJobQueue],
) -> None:
    client, _, _ = api
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    priority = schemas["JobParams"]["properties"]["priority"]
    assert priority["enum"] == ["interactive", "bulk"] and priority["default"] == "interactive"
    assert "queue_position" in schemas["Job"]["properties"]


def test_a_job_shows_its_lane_and_its_position_while_queued(
    api: tuple[FlaskClient, dict[str, str], SqliteJobQueue],
) -> None:
    client, auth, queue = api

    def submit(body: dict[str, Any]) -> str:
        response = client.post("/v1/jobs", json={"text": "a fox", **body}, headers=auth)
        assert response.status_code == 202, response.get_data(as_text=True)
        job_id: str = response.get_json()["id"]
        return job_id

    def job(job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = client.get(f"/v1/jobs/{job_id}", headers=auth).get_json()
        return body

    bulk = [submit({"priority": "bulk"}) for _ in range(2)]
    interactive = submit({})
    assert [job(job_id)["params"]["priority"] for job_id in (*bulk, interactive)] == [
        "bulk",
        "bulk",
        "interactive",
    ]
    assert [job(job_id)["queue_position"] for job_id in (*bulk, interactive)] == [1, 2, 1]
    listed = client.get("/v1/jobs", headers=auth).get_json()["jobs"]
    assert {item["id"]: item["queue_position"] for item in listed} == {
        bulk[0]: 1,
        bulk[1]: 2,
        interactive: 1,
    }
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'dalle_farm_queue_depth_by_lane{lane="interactive"} 1.0' in metrics
    assert 'dalle_farm_queue_depth_by_lane{lane="bulk"} 2.0' in metrics
    assert queue.lease("w", 60) == interactive
    canceled = client.delete(f"/v1/jobs/{bulk[0]}", headers=auth).get_json()
    assert canceled["status"] == "canceled" and canceled["queue_position"] is None
    assert job(bulk[1])["queue_position"] == 1


# -- Redis: the lane indexes and promotion -----------------------------------------------------


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server


@pytest.fixture
def redis_store(redis_server: RedisServer) -> Iterator[RedisJobStore]:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    with RedisJobStore(redis_server.url) as store:
        yield store


def positions(store: JobStore, jobs: list[JobRecord]) -> list[int | None]:
    found = [store.get_job(job.id) for job in jobs]
    return [job.queue_position if job is not None else None for job in found]


def test_redis_positions_follow_each_lane_and_model(redis_store: RedisJobStore) -> None:
    b1 = add_job(redis_store, "bulk")
    i1 = add_job(redis_store, "interactive")
    mega = add_job(redis_store, "interactive", model="mega")
    b2 = add_job(redis_store, "bulk")
    i2 = add_job(redis_store)
    assert (b1.queue_position, i1.queue_position, b2.queue_position) == (1, 1, 2)
    assert positions(redis_store, [b1, i1, mega, b2, i2]) == [1, 1, 1, 2, 2]
    assert redis_store.count_queued_by_lane() == {"interactive": 3, "bulk": 2}
    redis_store.transition(i1.id, JobStatus.RUNNING)
    redis_store.request_cancel(b1.id)
    assert positions(redis_store, [b1, i1, b2, i2]) == [None, None, 1, 1]
    page, _ = redis_store.list_jobs("owner")
    assert {job.id: job.queue_position for job in page} == {
        b1.id: None,
        i1.id: None,
        mega.id: 1,
        b2.id: 1,
        i2.id: 1,
    }
    # Requeued (a worker handed it back): the back of its lane.
    redis_store.transition(i1.id, JobStatus.QUEUED)
    assert positions(redis_store, [i2, i1]) == [1, 2]
    redis_store.fail_queued_jobs("mini", 2**47, "no worker")
    assert positions(redis_store, [i2, i1, b2, mega]) == [None, None, None, 1]


def test_redis_promotes_the_oldest_overdue_bulk_job_one_at_a_time(
    redis_store: RedisJobStore,
) -> None:
    b1, b2 = add_job(redis_store, "bulk"), add_job(redis_store, "bulk")
    i1 = add_job(redis_store, "interactive")
    assert redis_store.promote_bulk_job("mini", max_wait_s=3600) == []
    time.sleep(0.01)  # the jobs' lane times (Redis' ms clock) are now in the past
    assert redis_store.promote_bulk_job("mini", max_wait_s=0.001) == [b1.id]
    # b1 joined the back of the interactive lane; b2 waits while b1 does.
    assert positions(redis_store, [i1, b1, b2]) == [1, 2, 1]
    assert redis_store.promote_bulk_job("mini", max_wait_s=3600) == []
    assert redis_store.get_job(b1.id).params["priority"] == "bulk"  # type: ignore[union-attr]
    redis_store.transition(b1.id, JobStatus.RUNNING)
    assert redis_store.promote_bulk_job("mini", max_wait_s=0.001) == [b2.id]
    # A promoted job still waiting after another bound is returned again (to send again).
    time.sleep(0.01)
    assert redis_store.promote_bulk_job("mini", max_wait_s=0.001) == [b2.id]
    redis_store.request_cancel(b2.id)
    assert redis_store.promote_bulk_job("mini", max_wait_s=0.001) == []
    assert redis_store.promote_bulk_job("mega", max_wait_s=0.001) == []


def test_the_celery_queue_sends_each_job_to_its_lane(redis_server: RedisServer) -> None:
    with redis.Redis.from_url(redis_server.url) as client:
        client.flushall()
    settings = Settings(redis_url=redis_server.url)
    assert lane_queues(settings) == ["dalle-farm.mini", "dalle-farm.mini.bulk"]
    with RedisJobStore(redis_server.url) as store:
        queue = CeleryJobQueue(settings, store=store)
        try:
            for priority in ("bulk", "bulk", "interactive"):
                queue.enqueue(add_job(store, priority).id, model="mini")
            queue.enqueue(add_job(store, "bulk").id, model="mini", priority="bulk")  # no lookup
            assert queue.depth() == 4
            assert queue.depth_by_lane() == {"interactive": 1, "bulk": 3}
            assert queue.app.conf.broker_transport_options["queue_order_strategy"] == "priority"
            with redis.Redis.from_url(redis_server.url) as client:
                assert client.llen("dalle-farm.mini") == 1
                assert client.llen("dalle-farm.mini.bulk") == 3
        finally:
            queue.close()


def test_the_promoter_sends_each_promoted_job_and_sends_again_what_failed(
    redis_store: RedisJobStore,
) -> None:
    bulk = add_job(redis_store, "bulk")
    sent: list[str] = []
    failing = True

    def send(job_id: str) -> None:
        if failing:
            raise ConnectionError("the broker is down")
        sent.append(job_id)

    promoter = BulkPromoter(redis_store, ["mini", "mega"], 0.001, send, interval_s=3600)
    time.sleep(0.01)
    assert promoter.promote_once() == []  # promoted, but not sent: logged
    failing = False
    time.sleep(0.01)  # another bound: the promoted job, still queued, is sent again
    assert promoter.promote_once() == [bulk.id] and sent == [bulk.id]


def test_a_worker_takes_both_lanes_and_announces_its_model_only_with_the_interactive_one(
    redis_server: RedisServer,
) -> None:
    settings = Settings(redis_url=redis_server.url)
    for queues, announced in (
        (lane_queues(settings), ["mini"]),
        (["dalle-farm.mini"], ["mini"]),
        (["dalle-farm.mini.bulk"], []),  # the API would accept interactive jobs none takes
    ):
        app = create_celery_app(settings)
        try:
            app.amqp.queues.select(queues)
            assert list(app.amqp.queues.consume_from) == queues  # read in this order
            assert models_to_announce(app, settings) == announced
        finally:
            app.close()
