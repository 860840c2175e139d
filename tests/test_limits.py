"""Per-key limits (core/limits.py, api/limits.py): the rules, the 429s through the API on both
stores, a key's own limits from the CLI, and the rate shared by two real `dalle-farm api`
processes on one redis-server, across a restart of one of them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from api.app import create_app
from core.job import MODELS
from core.limits import Rate, limits_for, parse_rate
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings, SettingsError
from core.storage import LocalStorage
from core.store import JobStore
from core.store_redis import RedisJobStore
from core.store_sqlite import SqliteJobStore
from tests.farm_helpers import FarmProcess, http, subprocess_env, wait_for
from tests.servers import free_port, running_redis

PROBLEM = "application/problem+json"


# -- the rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [("10/s", Rate(10, "s")), (" 3 / m ", Rate(3, "m")), ("1/h", Rate(1, "h")), ("none", None)],
)
def test_rates_are_read_as_written(text: str, rate: Rate | None) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["0/s", "10/d", "1.5/s", "ten/s", "10", "-1/s", "2000000/s"])
def test_a_bad_rate_says_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="R/s, R/m or R/h"):
        parse_rate(text)
    with pytest.raises(SettingsError, match="DALLE_FARM_KEY_RATE"):
        Settings.from_env({"DALLE_FARM_KEY_RATE": text})


def test_a_keys_own_limits_replace_the_farms() -> None:
    farm = limits_for(None, None, 1000, Rate(50, "s"))
    assert (farm.max_jobs, farm.rate, farm.own_max_jobs, farm.own_rate) == (
        1000,
        Rate(50, "s"),
        False,
        False,
    )
    own = limits_for(5, "2/m", 1000, Rate(50, "s"))
    assert (own.max_jobs, own.rate, own.own_max_jobs, own.own_rate) == (5, Rate(2, "m"), True, True)
    lifted = limits_for(0, "none", 1000, Rate(50, "s"))  # a key's 0 and none lift the farm's
    assert (lifted.max_jobs, lifted.rate) == (None, None)


# -- through the API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_redis(tmp_path_factory.mktemp("redis"), appendonly=False) as server:
        yield server.url


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        store: JobStore = SqliteJobStore(tmp_path / "farm.db")
    else:
        store = RedisJobStore(request.getfixturevalue("redis_url"), prefix=f"t{tmp_path.name}")
    store.worker_heartbeat("tests", models=list(MODELS), ttl_s=3600)
    yield store
    store.close()


def api(store: JobStore, tmp_path: Path, **settings: Any) -> Flask:
    """The API on `store`; its request counter in memory (the embedded farm's; a farm with
    Redis counts there: see the two-process test)."""
    storage = LocalStorage(tmp_path / "files")
    storage.ensure_bucket()
    queue = SqliteJobQueue(tmp_path / "queue.db")
    return create_app(
        Settings(data_dir=tmp_path, **settings), store=store, storage=storage, queue=queue
    )


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def test_past_a_keys_rate_requests_get_429_with_retry_after(
    store: JobStore, tmp_path: Path
) -> None:
    client = api(store, tmp_path, key_rate="100/s").test_client()
    slow = store.create_key("slow", {"rate": "3/m"})[1]
    fast = store.create_key("fast")[1]  # the farm's 100/s
    for _ in range(3):  # within the limit: never refused
        assert client.get("/v1/jobs", headers=bearer(slow)).status_code == 200
    refused = client.get("/v1/jobs", headers=bearer(slow))
    assert refused.status_code == 429
    assert refused.mimetype == PROBLEM
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    detail = refused.get_json()["detail"]
    assert "3 requests per minute" in detail and "own" in detail
    # Another key is not held back by this one.
    for _ in range(10):
        assert client.get("/v1/jobs", headers=bearer(fast)).status_code == 200


def test_the_farms_rate_holds_for_keys_without_their_own(store: JobStore, tmp_path: Path) -> None:
    client = api(store, tmp_path, key_rate="2/h").test_client()
    secret = store.create_key("someone")[1]
    statuses = [client.get("/v1/jobs", headers=bearer(secret)).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = client.get("/v1/jobs", headers=bearer(secret)).get_json()
    assert "DALLE_FARM_KEY_RATE" in refused["detail"]
    # Lifting the key's rate takes effect at its next request.
    store.set_key_limits("someone", {"rate": "none"})
    assert client.get("/v1/jobs", headers=bearer(secret)).status_code == 200


def submit(client: Any, secret: str, key: str) -> Any:
    return client.post(
        "/v1/jobs",
        json={"text": "a fox"},
        headers={**bearer(secret), "Idempotency-Key": key},
    )


def test_past_a_keys_job_limit_a_submit_gets_429_until_a_job_ends(
    store: JobStore, tmp_path: Path
) -> None:
    client = api(store, tmp_path, key_max_jobs=1000).test_client()
    secret = store.create_key("two-at-a-time", {"max_jobs": 2})[1]
    first = submit(client, secret, "k1")
    assert first.status_code == 202
    assert submit(client, secret, "k2").status_code == 202
    refused = submit(client, secret, "k3")
    assert refused.status_code == 429 and refused.mimetype == PROBLEM
    assert int(refused.headers["Retry-After"]) > 0
    detail = refused.get_json()["detail"]
    assert "2 jobs queued or running" in detail and "limit is 2" in detail
    # A replay of a job the key made is answered as before, limit or not.
    replay = submit(client, secret, "k1")
    assert replay.status_code == 200 and replay.get_json()["id"] == first.get_json()["id"]
    # Once a job ends, there is room again.
    job_id = first.get_json()["id"]
    assert client.delete(f"/v1/jobs/{job_id}", headers=bearer(secret)).status_code == 202
    assert submit(client, secret, "k3").status_code == 202


def test_concurrent_submits_never_pass_the_job_limit_together(
    store: JobStore, tmp_path: Path
) -> None:
    app = api(store, tmp_path)
    secret = store.create_key("racer", {"max_jobs": 3})[1]

    def one(i: int) -> int:
        return int(submit(app.test_client(), secret, f"race-{i}").status_code)

    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = sorted(pool.map(one, range(16)))
    assert statuses == [202] * 3 + [429] * 13


def test_key_limits_are_set_and_shown_by_the_cli(tmp_path: Path) -> None:
    from cli.main import main

    env = {"DALLE_FARM_DATA_DIR": str(tmp_path)}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        patch.delenv("DALLE_FARM_REDIS_URL", raising=False)
        assert main(["keys", "create", "bot", "--max-jobs", "3", "--rate", "5/s"]) == 0
        assert main(["keys", "set", "bot", "--rate", "default", "--max-jobs", "0"]) == 0
        assert main(["keys", "set", "bot", "--rate", "5/d"]) == 1
        assert main(["keys", "set", "nobody", "--rate", "1/s"]) == 1
    store = SqliteJobStore(tmp_path / "farm.db")
    try:
        (key,) = store.list_keys()
        assert (key.name, key.max_jobs, key.rate) == ("bot", 0, None)
    finally:
        store.close()


# -- two API processes on one Redis ------------------------------------------------------------


def test_the_rate_holds_across_two_api_processes_and_a_restart(
    redis_url: str, tmp_path: Path
) -> None:
    env = subprocess_env(
        {
            "DALLE_FARM_REDIS_URL": redis_url,
            "DALLE_FARM_DATA_DIR": str(tmp_path / "data"),
            "DALLE_FARM_KEY_RATE": "4/h",
        }
    )
    store = RedisJobStore(redis_url)
    secret = store.create_key("shared")[1]
    store.close()
    ports = [free_port(), free_port()]
    apis = [
        FarmProcess(["api", "--port", str(port), "--workers", "1"], env, tmp_path / f"api{i}.log")
        for i, port in enumerate(ports)
    ]

    def get(port: int) -> int:
        status, _, _ = http("GET", f"http://127.0.0.1:{port}/v1/jobs", headers=bearer(secret))
        return status

    try:
        for process, port in zip(apis, ports, strict=True):
            process.start()
            wait_for(partial(answers, port), 60, "the API to answer", 0.2)
        # 4 an hour for the key, whichever process answers.
        assert [get(ports[0]), get(ports[1]), get(ports[0]), get(ports[1])] == [200] * 4
        assert get(ports[0]) == 429
        assert get(ports[1]) == 429
        # A restarted process still knows.
        assert apis[1].terminate() == 0
        apis[1].start()
        wait_for(lambda: answers(ports[1]), 60, "the API to answer again", 0.2)
        status, headers, body = http(
            "GET", f"http://127.0.0.1:{ports[1]}/v1/jobs", headers=bearer(secret)
        )
        assert status == 429, body
        assert int(headers["Retry-After"]) > 60
        assert "4 requests per hour" in json.loads(body)["detail"]
    finally:
        for process in apis:
            process.kill_group()


def answers(port: int) -> bool:
    try:
        return http("GET", f"http://127.0.0.1:{port}/healthz", timeout_s=5)[0] == 200
    except OSError:
        return False
