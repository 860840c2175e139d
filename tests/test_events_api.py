"""Live events over HTTP (api/events.py): the API on its real server (api/server.py) in this
process, on the SQLite store and on a real redis-server; a job's life is driven through the
store as a worker drives it, and read back from the streams as a client reads them."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from api.app import create_app
from api.server import ServerConfig
from client import FarmClient, NotFound
from core.events import Event, parse_stream
from core.job import MODELS, JobStatus, preview_key, utc_now
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import LocalStorage
from core.store import JobStore
from core.store_redis import RedisJobStore
from core.store_sqlite import SqliteJobStore
from tests.servers import api_server, running_redis

TIMEOUT_S = 30  # a hang guard for every read; nothing here waits that long when it works
PROBLEM = "application/problem+json"


@dataclass
class Farm:
    url: str
    store: JobStore
    secret: str
    other_secret: str

    def headers(self, secret: str | None = None, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {secret or self.secret}", **extra}

    def submit(self) -> str:
        response = requests.post(
            f"{self.url}/v1/jobs",
            json={"text": "a fox in the snow", "progressive_outputs": True},
            headers=self.headers(),
            timeout=TIMEOUT_S,
        )
        assert response.status_code == 202, response.text
        job_id: str = response.json()["id"]
        return job_id

    @contextmanager
    def stream(
        self, path: str, last_event_id: str | None = None, secret: str | None = None
    ) -> Iterator[requests.Response]:
        headers = self.headers(secret, Accept="text/event-stream")
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        with requests.get(
            f"{self.url}{path}", headers=headers, stream=True, timeout=TIMEOUT_S
        ) as response:
            yield response


def events(response: requests.Response) -> Iterator[Event]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    return parse_stream(line.decode() for line in response.iter_lines())


@contextmanager
def farm_on(
    store: JobStore, tmp_path: Path, config: ServerConfig, **settings: Any
) -> Iterator[Farm]:
    store.worker_heartbeat("tests", models=list(MODELS), ttl_s=3600)
    queue = SqliteJobQueue(tmp_path / "queue.db")
    storage = LocalStorage(tmp_path / "files")
    storage.ensure_bucket()
    app = create_app(
        Settings(data_dir=tmp_path, **settings), store=store, storage=storage, queue=queue
    )
    secret = store.create_key("alice")[1]
    other = store.create_key("bob")[1]
    try:
        with api_server(app, config) as url:
            yield Farm(url, store, secret, other)
    finally:
        queue.close()


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_redis(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
def farm(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Farm]:
    with ExitStack() as stack:
        if request.param == "sqlite":
            store: JobStore = SqliteJobStore(tmp_path / "farm.db")
        else:
            url = request.getfixturevalue("redis_url")
            store = RedisJobStore(url, prefix=f"t{tmp_path.name[-20:]}")
        stack.callback(store.close)
        yield stack.enter_context(farm_on(store, tmp_path, ServerConfig(threads=4)))


def work(store: JobStore, job_id: str, steps: range) -> None:
    """What a worker's runner writes for `steps`: progress, and a preview each."""
    for step in steps:
        store.update(job_id, progress_step=step, progress_total=256)
        result = {"grid": None, "images": [], "previews": [preview_key(job_id, step)]}
        store.update(job_id, result=result)


def start(store: JobStore, job_id: str) -> None:
    assert store.transition(job_id, JobStatus.RUNNING, worker="w1", started_at=utc_now())


def finish(store: JobStore, job_id: str) -> None:
    done = store.transition(job_id, JobStatus.SUCCEEDED, finished_at=utc_now())
    assert done is not None


def summary(event: Event) -> tuple[str, Any]:
    """What an event says, without its cursor."""
    if event.type in ("status", "done"):
        return event.type, event.data["status"]
    if event.type == "progress":
        return event.type, event.data["step"]
    return event.type, event.data["frame"]


EXPECTED = [
    ("status", "queued"),
    ("status", "running"),
    ("progress", 1),
    ("preview", 1),
    ("progress", 2),
    ("preview", 2),
    ("done", "succeeded"),
]


def test_a_job_stream_sends_its_state_then_each_change_in_order_then_ends(farm: Farm) -> None:
    job_id = farm.submit()
    with farm.stream(f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["Cache-Control"] == "no-cache"
        stream = events(response)
        seen = [next(stream)]  # the job as it is now; then the worker goes on
        start(farm.store, job_id)
        work(farm.store, job_id, range(1, 3))
        finish(farm.store, job_id)
        seen += list(stream)  # ends by itself after done
    assert [summary(event) for event in seen] == EXPECTED
    assert len({event.cursor for event in seen}) == len(seen)
    assert all(event.data["id"] == job_id for event in seen)
    preview = seen[3].data
    assert preview["key"] == preview_key(job_id, 1)
    assert preview["url"].endswith(f"/v1/files/{preview['key']}")
    assert seen[-1].data["finished_at"] is not None  # done carries the final job JSON


def test_a_reconnect_with_last_event_id_resumes_without_loss(farm: Farm) -> None:
    job_id = farm.submit()
    with farm.stream(f"/v1/jobs/{job_id}/events") as response:
        stream = events(response)
        seen = [next(stream)]
        start(farm.store, job_id)
        seen.append(next(stream))
    # Disconnected: the job goes on meanwhile.
    work(farm.store, job_id, range(1, 3))
    finish(farm.store, job_id)
    with farm.stream(f"/v1/jobs/{job_id}/events", last_event_id=seen[-1].cursor) as response:
        seen += list(events(response))
    assert [summary(event) for event in seen] == EXPECTED
    # A finished job's stream, opened afresh, is its final state alone.
    with farm.stream(f"/v1/jobs/{job_id}/events") as response:
        assert [summary(event) for event in events(response)] == [("done", "succeeded")]


def test_a_cancel_shows_as_status_then_done(farm: Farm) -> None:
    job_id = farm.submit()
    start(farm.store, job_id)
    with farm.stream(f"/v1/jobs/{job_id}/events") as response:
        stream = events(response)
        seen = [next(stream)]
        cancel = requests.delete(f"{farm.url}/v1/jobs/{job_id}", headers=farm.headers())
        assert cancel.status_code == 202
        seen.append(next(stream))
        # The worker notices at its next step and ends the job.
        assert farm.store.transition(job_id, JobStatus.CANCELED, finished_at=utc_now())
        seen += list(stream)
    assert [(event.type, event.data["status"]) for event in seen] == [
        ("status", "running"),
        ("status", "running"),
        ("done", "canceled"),
    ]
    assert [event.data["cancel_requested"] for event in seen[:2]] == [False, True]


def test_the_callers_stream_has_only_the_callers_jobs(farm: Farm) -> None:
    with farm.stream("/v1/events") as mine, farm.stream("/v1/events", secret=farm.other_secret):
        stream = events(mine)
        job_id = farm.submit()
        start(farm.store, job_id)
        finish(farm.store, job_id)
        seen = [next(stream) for _ in range(3)]
    assert [summary(event) for event in seen] == [
        ("status", "queued"),
        ("status", "running"),
        ("done", "succeeded"),
    ]
    assert {event.data["id"] for event in seen} == {job_id}


def test_another_keys_job_stream_is_404_and_bad_requests_are_problems(farm: Farm) -> None:
    job_id = farm.submit()
    cases = [
        (f"/v1/jobs/{job_id}/events", {"secret": farm.other_secret}, 404),
        (f"/v1/jobs/{'0' * 32}/events", {}, 404),
        ("/v1/jobs/not-a-job/events", {}, 404),
        (f"/v1/jobs/{job_id}/events", {"last_event_id": "é"}, 400),
        ("/v1/events", {"last_event_id": "x" * 65}, 400),
    ]
    for path, options, status in cases:
        with farm.stream(path, **options) as response:
            assert response.status_code == status, (path, options, response.text)
            assert response.headers["Content-Type"] == PROBLEM
            assert response.json()["detail"]
    response = requests.get(f"{farm.url}/v1/jobs/{job_id}/events", timeout=TIMEOUT_S)
    assert response.status_code == 401


def open_stream(url: str, path: str, secret: str) -> socket.socket:
    """A stream, opened on a raw socket and read up to its headers' end."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
    request = f"GET {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {secret}\r\n\r\n"
    sock.sendall(request.encode())
    assert b" 200 " in read_until(sock, b"\r\n\r\n").split(b"\r\n", 1)[0]
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the socket sends up to and including `marker`; fails if it closes first."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before {marker!r}: {data[-200:]!r}"
        data += chunk
    return data


def test_a_hundred_open_streams_do_not_block_the_api_and_one_more_is_429(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "farm.db")
    config = ServerConfig(threads=2, event_streams=100)
    with ExitStack() as stack:
        stack.callback(store.close)
        farm = stack.enter_context(farm_on(store, tmp_path, config, max_event_streams=100))
        job_id = farm.submit()
        streams = [
            stack.enter_context(closing(open_stream(farm.url, "/v1/events", farm.secret)))
            for _ in range(99)
        ]
        job_stream = stack.enter_context(
            closing(open_stream(farm.url, f"/v1/jobs/{job_id}/events", farm.secret))
        )
        # 100 streams are open on 2 request threads; the API still answers, at once.
        submitted = farm.submit()
        answer = requests.get(f"{farm.url}/v1/jobs/{submitted}", headers=farm.headers(), timeout=5)
        assert answer.status_code == 200
        assert requests.get(f"{farm.url}/healthz", timeout=5).status_code == 200
        # One stream more is refused with a problem that says when to retry.
        with farm.stream("/v1/events") as refused:
            assert refused.status_code == 429
            assert refused.headers["Content-Type"] == PROBLEM
            assert int(refused.headers["Retry-After"]) > 0
            assert "DALLE_FARM_MAX_EVENT_STREAMS" in refused.json()["detail"]
        # A stream that ends (its job is done) gives its place back.
        start(store, job_id)
        finish(store, job_id)
        tail = read_until(job_stream, b"event: done")
        while not tail.endswith(b"\r\n0\r\n\r\n"):  # the last chunk: the stream is over
            chunk = job_stream.recv(65536)
            assert chunk, "the connection closed before the stream's end"
            tail += chunk
        with farm.stream("/v1/events") as accepted:
            assert accepted.status_code == 200
        # Every other stream is still open and gets the new job's events.
        for sock in streams[:3]:
            read_until(sock, b"event: done")


def test_streams_end_when_the_server_stops(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "farm.db")
    store.worker_heartbeat("tests", models=list(MODELS), ttl_s=3600)
    secret = store.create_key("alice")[1]
    queue = SqliteJobQueue(tmp_path / "queue.db")
    app = create_app(
        Settings(data_dir=tmp_path), store=store, storage=LocalStorage(tmp_path), queue=queue
    )
    # A drain that waited for the streams would take a minute and fail api_server's check.
    config = ServerConfig(threads=2, shutdown_timeout_s=60)
    try:
        with api_server(app, config) as url:
            sock = open_stream(url, "/v1/events", secret)
        sock.settimeout(TIMEOUT_S)
        while sock.recv(65536):  # the server ends the stream, then closes the connection
            pass
        sock.close()
    finally:
        queue.close()
        store.close()


def test_the_client_watches_a_job_and_waits_on_its_stream(farm: Farm) -> None:
    job_id = farm.submit()
    with FarmClient(farm.url, api_key=farm.secret) as client:
        watched = client.watch(job_id)
        first = next(watched)
        assert (first.type, first.data["status"]) == ("status", "queued")
        start(farm.store, job_id)
        work(farm.store, job_id, range(1, 3))
        finish(farm.store, job_id)
        assert [summary(event) for event in [first, *watched]] == EXPECTED
        # wait() follows the stream; a job that is done answers at once.
        assert client.wait(job_id).status == "succeeded"
        with pytest.raises(NotFound):
            client.wait("0" * 32)
        with pytest.raises(NotFound):
            next(client.watch("0" * 32))


def test_wait_times_out_on_a_quiet_stream(farm: Farm) -> None:
    from client import WaitTimeout

    job_id = farm.submit()
    with FarmClient(farm.url, api_key=farm.secret) as client, pytest.raises(WaitTimeout) as error:
        client.wait(job_id, timeout_s=0.5)
    assert error.value.job.status == "queued"


def test_event_json_is_one_line(farm: Farm) -> None:
    """A prompt with line breaks and non-ASCII text cannot split an event's data line."""
    response = requests.post(
        f"{farm.url}/v1/jobs",
        json={"text": "two\nlines\r\nand ünïcode \u2028 here"},
        headers=farm.headers(),
        timeout=TIMEOUT_S,
    )
    job_id = response.json()["id"]
    with farm.stream(f"/v1/jobs/{job_id}/events") as stream:
        first = next(events(stream))
    assert json.loads(json.dumps(first.data))["params"]["text"].startswith("two\nlines")
