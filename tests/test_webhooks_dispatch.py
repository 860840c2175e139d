"""worker/webhooks.py: the dispatcher against a real loopback receiver (http.server in a thread),
over a real SQLite store: signed deliveries, retries after a 500 and after a timeout, giving up,
and a hanging receiver that holds only its own delivery."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from core.job import JobRecord, JobStatus, new_job_id, utc_now
from core.job_json import job_json
from core.settings import Settings
from core.storage import LocalStorage
from core.store_sqlite import SqliteJobStore
from core.webhooks import verify
from tests.farm_helpers import wait_for
from tests.servers import http_server
from worker.webhooks import WebhookDispatcher

HANG = -1


@dataclass
class Receiver:
    """What the receiver answers (one entry per request, by path; then 200) and what it saw."""

    url: str = ""
    answers: dict[str, list[int]] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self, path: str) -> list[tuple[str, dict[str, str], bytes]]:
        with self.lock:
            return [entry for entry in self.seen if entry[0] == path]

    def hook(self, path: str, *answers: int) -> str:
        """The URL of `path` here, which answers `answers` first (then 200)."""
        with self.lock:
            self.answers[path] = list(answers)
        return self.url + path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with state.lock:
                state.seen.append((self.path, dict(self.headers), body))
                queue = state.answers.get(self.path, [])
                status = queue.pop(0) if queue else 200
            if status == HANG:
                state.release.wait(30)
                status = 200
            try:
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()
            except OSError:
                pass  # the farm gave up on it

        def log_message(self, format: str, *args: object) -> None:
            pass

    with http_server(Handler) as url:
        state.url = url
        try:
            yield state
        finally:
            state.release.set()


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[tuple[SqliteJobStore, LocalStorage]]:
    store = SqliteJobStore(tmp_path / "farm.db")
    try:
        yield store, LocalStorage(tmp_path / "files")
    finally:
        store.close()


def settings(**changes: object) -> Settings:
    values: dict[str, object] = {
        "webhook_allow": "127.0.0.1",
        "webhook_timeout_s": 1,
        "webhook_backoff_s": 1,
        "webhook_max_attempts": 3,
    }
    values.update(changes)
    return Settings(**values)  # type: ignore[arg-type]


def queued_job(url: str, owner: str = "local") -> JobRecord:
    """A new job's record, with a webhook to `url`."""
    return JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params={"text": "a fox", "seed": 3, "webhook_url": url},
        created_at=utc_now(),
    )


def finished_job(store: SqliteJobStore, url: str, owner: str = "local") -> JobRecord:
    record = queued_job(url, owner)
    store.create_job(record)
    store.transition(record.id, JobStatus.RUNNING, started_at=utc_now())
    done = store.transition(
        record.id,
        JobStatus.SUCCEEDED,
        finished_at=utc_now(),
        result={"grid": f"jobs/{record.id}/grid.png", "images": [f"jobs/{record.id}/0.png"]},
    )
    assert done is not None
    return done


def final_state(store: SqliteJobStore, job_id: str) -> tuple[str, int, str | None]:
    def settled() -> tuple[str, int, str | None] | None:
        delivery = store.webhook_delivery(job_id)
        assert delivery is not None
        if delivery.state == "pending":
            return None
        return delivery.state, delivery.attempts, delivery.last_error

    return wait_for(settled, 30, f"the webhook of job {job_id} to settle", 0.05)


@pytest.fixture
def dispatcher(
    farm: tuple[SqliteJobStore, LocalStorage], request: pytest.FixtureRequest
) -> Iterator[WebhookDispatcher]:
    store, storage = farm
    options = getattr(request, "param", {})
    running = WebhookDispatcher(
        store, storage, settings(**options), name="test", poll_s=0.05, threads=2
    ).start()
    try:
        yield running
    finally:
        running.stop()


def test_a_delivery_is_the_jobs_json_signed_with_the_owners_secret(
    farm: tuple[SqliteJobStore, LocalStorage], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    store, storage = farm
    key, _ = store.create_key("alice")
    job = finished_job(store, f"{receiver.url}/hook?x=1", owner=key.id)
    assert final_state(store, job.id) == ("delivered", 1, None)
    ((_, headers, body),) = receiver.requests("/hook?x=1")
    delivery = store.webhook_delivery(job.id)
    assert delivery is not None and headers["X-Dalle-Farm-Delivery"] == delivery.id
    assert headers["X-Dalle-Farm-Event"] == "job.succeeded"
    assert headers["Content-Type"] == "application/json"
    assert headers["Host"] == receiver.url.removeprefix("http://")
    assert verify(store.webhook_secret(key.id), body, headers["X-Dalle-Farm-Signature"])
    assert not verify(store.webhook_secret("local"), body, headers["X-Dalle-Farm-Signature"])
    record = store.get_job(job.id)
    assert record is not None
    assert json.loads(body) == job_json(record, storage)  # what GET /v1/jobs/{id} answers


def test_a_500_is_tried_again_with_the_same_delivery_id(
    farm: tuple[SqliteJobStore, LocalStorage], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    store, _ = farm
    job = finished_job(store, receiver.hook("/flaky", 500))
    assert final_state(store, job.id) == ("delivered", 2, "the receiver answered 500")
    ids = {headers["X-Dalle-Farm-Delivery"] for _, headers, _ in receiver.requests("/flaky")}
    assert len(receiver.requests("/flaky")) == 2 and len(ids) == 1


def test_a_timeout_is_tried_again(
    farm: tuple[SqliteJobStore, LocalStorage], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    store, _ = farm
    job = finished_job(store, receiver.hook("/slow", HANG))
    state, attempts, error = final_state(store, job.id)
    assert (state, attempts) == ("delivered", 2)
    assert error is not None and "no answer within 1 s" in error


@pytest.mark.parametrize("dispatcher", [{"webhook_max_attempts": 2}], indirect=True)
def test_deliveries_give_up_after_the_last_try_or_a_final_answer(
    farm: tuple[SqliteJobStore, LocalStorage], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    store, _ = farm
    down = finished_job(store, receiver.hook("/down", 503, 503, 503))
    gone = finished_job(store, receiver.hook("/gone", 410))
    assert final_state(store, down.id) == (
        "failed",
        2,
        "gave up after 2 tries; last: the receiver answered 503",
    )
    assert final_state(store, gone.id) == ("failed", 1, "the receiver answered 410, which is final")
    assert len(receiver.requests("/down")) == 2 and len(receiver.requests("/gone")) == 1


@pytest.mark.parametrize("dispatcher", [{"webhook_timeout_s": 30}], indirect=True)
def test_a_hanging_receiver_holds_only_its_own_delivery(
    farm: tuple[SqliteJobStore, LocalStorage], receiver: Receiver, dispatcher: WebhookDispatcher
) -> None:
    store, _ = farm
    hanging = finished_job(store, receiver.hook("/hang", HANG))
    wait_for(lambda: receiver.requests("/hang"), 30, "the hanging delivery to start")
    others = [finished_job(store, f"{receiver.url}/ok") for _ in range(3)]
    for job in others:
        assert final_state(store, job.id) == ("delivered", 1, None)
    # All delivered while the first one still hangs on its receiver.
    still = store.webhook_delivery(hanging.id)
    assert still is not None and still.state == "pending" and still.claim is not None
    receiver.release.set()
    assert final_state(store, hanging.id) == ("delivered", 1, None)


def test_a_url_that_resolves_to_a_private_address_is_never_called(
    farm: tuple[SqliteJobStore, LocalStorage], receiver: Receiver
) -> None:
    store, storage = farm
    strict = WebhookDispatcher(store, storage, settings(webhook_allow=None), name="t", poll_s=0.05)
    strict.start()
    try:
        job = finished_job(store, f"{receiver.url}/private")
        state, attempts, error = final_state(store, job.id)
    finally:
        strict.stop()
    assert (state, attempts) == ("failed", 1)
    assert error is not None and "127.0.0.1, a loopback address" in error
    assert receiver.requests("/private") == []


def test_celery_workers_start_a_dispatcher_over_redis(receiver: Receiver, tmp_path: Path) -> None:
    """The distributed farm's path: the dispatcher a Celery worker starts when it is ready
    (worker/celery_app.py), over RedisJobStore on a real redis-server."""
    from core.store_redis import RedisJobStore
    from tests.servers import running_redis
    from worker import celery_app

    with running_redis(tmp_path / "redis") as server:
        config = settings(redis_url=server.url, data_dir=tmp_path)
        celery_app._start_webhooks(config, "gpu0@test")
        store = RedisJobStore(server.url)
        try:
            key, _ = store.create_key("bob")
            record = queued_job(receiver.hook("/redis", 500), owner=key.id)
            store.create_job(record)
            store.request_cancel(record.id)

            def delivered() -> bool:
                delivery = store.webhook_delivery(record.id)
                assert delivery is not None and delivery.state != "failed", delivery
                return delivery.state == "delivered"

            wait_for(delivered, 30, "the delivery over Redis")
            first, second = receiver.requests("/redis")
            assert first[1]["X-Dalle-Farm-Delivery"] == second[1]["X-Dalle-Farm-Delivery"]
            assert second[1]["X-Dalle-Farm-Event"] == "job.canceled"
            assert verify(
                store.webhook_secret(key.id), second[2], second[1]["X-Dalle-Farm-Signature"]
            )
            assert json.loads(second[2])["status"] == "canceled"
        finally:
            celery_app._stop_webhooks()
            store.close()
