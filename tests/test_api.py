"""The REST API (api/) through Flask's test client, with real collaborators: the SQLite store and
queue on a temp file, and results in a temp folder."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.test import TestResponse

from api.app import create_app, create_app_from_env
from api.services import Services, load_tokenizer, services_from_settings
from core.job import (
    MODELS,
    PROGRESS_TOTAL,
    SEED_MAX,
    JobParams,
    JobStatus,
    grid_key,
    image_key,
    is_job_id,
    preview_key,
    utc_now,
)
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import LocalStorage, S3Storage
from core.store import DURATION_BUCKETS_S, JobStore, StoreUnavailable
from core.store_sqlite import SqliteJobStore
from model.tokenizer import TextTokenizer

PROBLEM = "application/problem+json"
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(range(64))


@dataclass
class Farm:
    app: Flask
    client: FlaskClient
    store: SqliteJobStore
    queue: SqliteJobQueue
    storage: LocalStorage
    key_id: str
    secret: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def submit(self, body: object, headers: dict[str, str] | None = None) -> TestResponse:
        return self.client.post(
            "/v1/jobs",
            data=json.dumps(body),
            content_type="application/json",
            headers={**self.auth, **(headers or {})},
        )

    def submit_ok(self, body: object | None = None) -> dict[str, Any]:
        response = self.submit(body if body is not None else {"text": "a fox in the snow"})
        assert response.status_code == 202, response.get_data(as_text=True)
        job: dict[str, Any] = response.get_json()
        return job

    def get(self, path: str, secret: str | None = None) -> TestResponse:
        headers = {"Authorization": f"Bearer {secret}"} if secret else self.auth
        return self.client.get(path, headers=headers)

    def new_key(self, name: str) -> str:
        return self.store.create_key(name)[1]


def serve_every_model(store: JobStore) -> None:
    """Announce a stand-in worker for every model: the API refuses jobs no live worker serves."""
    store.worker_heartbeat("tests", models=list(MODELS), ttl_s=3600)


def make_app(tmp_path: Path, **kwargs: Any) -> tuple[Flask, SqliteJobStore, SqliteJobQueue]:
    store = SqliteJobStore(tmp_path / "farm.db")
    serve_every_model(store)
    queue = SqliteJobQueue(tmp_path / "farm.db")
    storage = kwargs.pop("storage", None) or LocalStorage(tmp_path / "files")
    storage.ensure_bucket()
    app = create_app(
        Settings(data_dir=tmp_path), store=store, storage=storage, queue=queue, **kwargs
    )
    return app, store, queue


@pytest.fixture
def farm(tmp_path: Path) -> Iterator[Farm]:
    app, store, queue = make_app(tmp_path)
    key, secret = store.create_key("alice")
    storage = app.extensions["dalle_farm"].storage
    yield Farm(app, app.test_client(), store, queue, storage, key.id, secret)
    store.close()
    queue.close()


def assert_problem(response: TestResponse, status: int, field: str | None = None) -> dict[str, Any]:
    """The response is an RFC 9457 problem with `status`, naming `field` among its errors."""
    text = response.get_data(as_text=True)
    assert response.status_code == status, text
    assert response.mimetype == PROBLEM, text
    body: dict[str, Any] = json.loads(text)
    assert body["status"] == status
    assert body["type"] and body["title"] and body["detail"]
    if field is not None:
        fields = [error["field"] for error in body["errors"]]
        assert field in fields, body
        assert all(error["message"] for error in body["errors"])
    return body


# -- submit and read -------------------------------------------------------------------------


def test_submit_answers_202_with_location_defaults_and_the_seed_used(farm: Farm) -> None:
    response = farm.submit({"text": "a fox in the snow", "grid_size": 2})
    assert response.status_code == 202
    job = response.get_json()
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert is_job_id(job["id"])
    assert job["status"] == "queued"
    assert job["progress"] == {"step": 0, "total": PROGRESS_TOTAL}
    assert job["result"] is None and job["error"] is None and job["attempts"] == 0
    assert "warnings" not in job
    seed = job["params"].pop("seed")
    assert 1 <= seed <= SEED_MAX
    defaults = JobParams(text="a fox in the snow", grid_size=2).to_dict()
    del defaults["seed"]
    assert job["params"] == defaults
    record = farm.store.get_job(job["id"])
    assert record is not None and record.owner == farm.key_id
    assert record.params["seed"] == seed
    assert farm.queue.depth() == 1


def test_submit_keeps_a_fixed_seed(farm: Farm) -> None:
    assert farm.submit_ok({"text": "fox", "seed": 7})["params"]["seed"] == 7


def test_get_job_answers_the_same_job(farm: Farm) -> None:
    job = farm.submit_ok()
    response = farm.get(f"/v1/jobs/{job['id']}")
    assert response.status_code == 200
    assert response.get_json() == job


def test_unknown_and_malformed_job_ids_are_404(farm: Farm) -> None:
    assert_problem(farm.get("/v1/jobs/" + "0" * 32), 404)
    body = assert_problem(farm.get("/v1/jobs/not-an-id"), 404)
    assert "not a job id" in body["detail"]


def test_list_pages_newest_first_and_filters_by_status(farm: Farm) -> None:
    ids = []
    for i in range(5):
        ids.append(farm.submit_ok({"text": f"fox {i}"})["id"])
        time.sleep(0.002)  # ids made in the same millisecond sort in random order
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        query = f"?limit=2&cursor={cursor}" if cursor else "?limit=2"
        response = farm.get("/v1/jobs" + query)
        assert response.status_code == 200
        page = response.get_json()
        seen += [job["id"] for job in page["jobs"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    assert pages == 3

    assert farm.client.delete(f"/v1/jobs/{ids[1]}", headers=farm.auth).status_code == 202
    canceled = farm.get("/v1/jobs?status=canceled").get_json()
    assert [job["id"] for job in canceled["jobs"]] == [ids[1]]
    assert canceled["next_cursor"] is None
    queued = farm.get("/v1/jobs?status=queued").get_json()
    assert [job["id"] for job in queued["jobs"]] == [ids[4], ids[3], ids[2], ids[0]]


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=done", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("limit=" + "9" * 5000, "limit"),
        ("cursor=", "cursor"),
        ("cursor=not-a-cursor", "cursor"),
        ("cursor=W10", "cursor"),  # base64 of "[]"
        ("stauts=queued", "stauts"),
        ("limit=1&limit=2", "limit"),
    ],
)
def test_list_rejects_bad_queries(farm: Farm, query: str, field: str) -> None:
    assert_problem(farm.get(f"/v1/jobs?{query}"), 400, field)


def test_list_suggests_a_misspelled_query_parameter(farm: Farm) -> None:
    body = assert_problem(farm.get("/v1/jobs?stauts=queued"), 400, "stauts")
    assert "did you mean 'status'" in body["detail"]


# -- keys and owners -------------------------------------------------------------------------


def test_another_keys_job_is_invisible(farm: Farm) -> None:
    job = farm.submit_ok()
    farm.storage.put(grid_key(job["id"]), PNG_BYTES, "image/png")
    bob = farm.new_key("bob")

    assert_problem(farm.get(f"/v1/jobs/{job['id']}", bob), 404)
    assert_problem(
        farm.client.delete(f"/v1/jobs/{job['id']}", headers={"Authorization": f"Bearer {bob}"}),
        404,
    )
    assert_problem(farm.get(f"/v1/files/{grid_key(job['id'])}", bob), 404)
    assert farm.get("/v1/jobs", bob).get_json() == {"jobs": [], "next_cursor": None}
    # Unknown and someone else's answer alike.
    unknown = assert_problem(farm.get("/v1/jobs/" + "f" * 32, bob), 404)
    other = assert_problem(farm.get(f"/v1/jobs/{job['id']}", bob), 404)
    assert other["detail"] == unknown["detail"].replace("f" * 32, job["id"])

    record = farm.store.get_job(job["id"])
    assert record is not None and record.status is JobStatus.QUEUED
    assert farm.get(f"/v1/files/{grid_key(job['id'])}").status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Basic YWxpY2U6c2VjcmV0",
        "Bearer not-a-key",
        "Bearer dfk_000000000000_" + "A" * 32,
    ],
)
def test_requests_without_a_valid_key_are_401(farm: Farm, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for response in (
        farm.client.get("/v1/jobs", headers=headers),
        farm.client.post("/v1/jobs", json={"text": "fox"}, headers=headers),
        farm.client.get("/v1/jobs/" + "0" * 32, headers=headers),
        farm.client.delete("/v1/jobs/" + "0" * 32, headers=headers),
        farm.client.get("/v1/files/jobs/x/grid.png", headers=headers),
    ):
        assert_problem(response, 401)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert farm.queue.depth() == 0


def test_a_revoked_key_is_401(farm: Farm) -> None:
    farm.submit_ok()
    assert farm.store.revoke_key(farm.key_id)
    body = assert_problem(farm.get("/v1/jobs"), 401)
    assert "revoked" in body["detail"]


def test_the_scheme_is_case_insensitive(farm: Farm) -> None:
    response = farm.client.get("/v1/jobs", headers={"Authorization": f"bearer {farm.secret}"})
    assert response.status_code == 200


def test_anonymous_owner_needs_no_key(tmp_path: Path) -> None:
    app, store, queue = make_app(tmp_path, anonymous_owner="local")
    client = app.test_client()
    response = client.post("/v1/jobs", json={"text": "fox"})
    assert response.status_code == 202
    job_id = response.get_json()["id"]
    record = store.get_job(job_id)
    assert record is not None and record.owner == "local"
    assert client.get(f"/v1/jobs/{job_id}").status_code == 200
    assert [job["id"] for job in client.get("/v1/jobs").get_json()["jobs"]] == [job_id]
    # A key sent anyway changes nothing: every job belongs to the anonymous owner.
    _, secret = store.create_key("someone")
    headers = {"Authorization": f"Bearer {secret}"}
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 200
    document = app.test_client().get("/openapi.json").get_json()
    assert "security" not in document and "securitySchemes" not in document["components"]
    assert "401" not in json.dumps(document["paths"])
    store.close()
    queue.close()


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "text"),
        ({"text": 5}, "text"),
        ({"text": None}, "text"),
        ({"text": "   "}, "text"),
        ({"text": "x" * 1001}, "text"),
        ({"text": "fox", "grid_size": 0}, "grid_size"),
        ({"text": "fox", "grid_size": 9}, "grid_size"),
        ({"text": "fox", "grid_size": "2"}, "grid_size"),
        ({"text": "fox", "grid_size": 2.5}, "grid_size"),
        ({"text": "fox", "grid_size": True}, "grid_size"),
        ({"text": "fox", "temperature": 0}, "temperature"),
        ({"text": "fox", "temperature": -1}, "temperature"),
        ({"text": "fox", "temperature": "x"}, "temperature"),
        ({"text": "fox", "top_k": 0}, "top_k"),
        ({"text": "fox", "top_k": 16385}, "top_k"),
        ({"text": "fox", "supercondition_factor": -0.5}, "supercondition_factor"),
        ({"text": "fox", "supercondition_factor": 129}, "supercondition_factor"),
        ({"text": "fox", "seed": -2}, "seed"),
        ({"text": "fox", "seed": 2**31}, "seed"),
        ({"text": "fox", "seed": 10**400}, "seed"),
        ({"text": "fox", "model": "huge"}, "model"),
        ({"text": "fox", "is_seamless": "yes"}, "is_seamless"),
        ({"text": "fox", "grid-size": 2}, "grid-size"),
        ([], "body"),
        ("a fox", "body"),
        (None, "body"),
    ],
)
def test_invalid_params_are_422_naming_the_field(farm: Farm, body: object, field: str) -> None:
    assert_problem(farm.submit(body), 422, field)
    assert farm.queue.depth() == 0
    assert farm.get("/v1/jobs").get_json()["jobs"] == []


def test_every_field_error_is_listed_and_unknown_fields_get_a_suggestion(farm: Farm) -> None:
    body = assert_problem(farm.submit({"text": "", "grid-size": 2, "top_k": 0}), 422)
    assert {error["field"] for error in body["errors"]} == {"text", "grid-size", "top_k"}
    messages = {error["field"]: error["message"] for error in body["errors"]}
    assert "did you mean 'grid_size'" in messages["grid-size"]


def test_the_grid_size_limit_comes_from_settings(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "farm.db")
    serve_every_model(store)
    queue = SqliteJobQueue(tmp_path / "farm.db")
    app = create_app(
        Settings(max_grid_size=2),
        store=store,
        storage=LocalStorage(tmp_path / "files"),
        queue=queue,
        anonymous_owner="local",
    )
    client = app.test_client()
    assert_problem(client.post("/v1/jobs", json={"text": "fox", "grid_size": 3}), 422, "grid_size")
    assert client.post("/v1/jobs", json={"text": "fox", "grid_size": 2}).status_code == 202
    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["JobParams"]
    assert schema["properties"]["grid_size"]["maximum"] == 2
    store.close()
    queue.close()


@pytest.mark.parametrize(
    "data",
    [
        b'{"text": "fox",}',
        b"{",
        b"",
        b'{"text": "fox", "temperature": NaN}',
        b'{"text": "fox", "temperature": Infinity}',
        b'{"text": "\xff"}',
        b"[" * 30000 + b"]" * 30000,
    ],
)
def test_invalid_json_is_400(farm: Farm, data: bytes) -> None:
    response = farm.client.post(
        "/v1/jobs", data=data, content_type="application/json", headers=farm.auth
    )
    body = assert_problem(response, 400, "body")
    assert "not valid JSON" in body["detail"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_a_body_that_is_not_json_is_415(farm: Farm, content_type: str | None) -> None:
    response = farm.client.post(
        "/v1/jobs", data=b'{"text": "fox"}', content_type=content_type, headers=farm.auth
    )
    body = assert_problem(response, 415, "Content-Type")
    assert "application/json" in body["detail"]


def test_json_with_a_charset_is_accepted(farm: Farm) -> None:
    response = farm.client.post(
        "/v1/jobs",
        data=b'{"text": "fox"}',
        content_type="application/json; charset=utf-8",
        headers=farm.auth,
    )
    assert response.status_code == 202


def test_a_body_over_64_kib_is_413(farm: Farm) -> None:
    body = assert_problem(farm.submit({"text": "x" * (64 * 1024)}), 413)
    assert "64 KiB" in body["detail"]
    assert farm.queue.depth() == 0


def test_unknown_routes_and_methods_are_problems(farm: Farm) -> None:
    assert_problem(farm.get("/v2/jobs"), 404)
    assert_problem(farm.get("/v1/jobs/"), 404)
    response = farm.client.put("/v1/jobs", headers=farm.auth)
    body = assert_problem(response, 405)
    assert "GET" in response.headers["Allow"] and "POST" in response.headers["Allow"]
    assert "use GET, HEAD, POST" in body["detail"]
    assert_problem(farm.client.post("/healthz"), 405)


def test_a_backend_failure_is_503_not_500(farm: Farm) -> None:
    farm.store.close()
    body = assert_problem(farm.get("/v1/jobs"), 503)
    assert "job store" in body["detail"]


class BuggyStore(SqliteJobStore):
    def get_job(self, job_id: str) -> None:
        raise RuntimeError("a bug with a secret in its message: hunter2")


def test_an_unexpected_error_is_a_500_problem_without_internals(tmp_path: Path) -> None:
    store = BuggyStore(tmp_path / "farm.db")
    queue = SqliteJobQueue(tmp_path / "farm.db")
    app = create_app(
        Settings(), store=store, storage=LocalStorage(tmp_path), queue=queue, anonymous_owner="me"
    )
    response = app.test_client().get("/v1/jobs/" + "0" * 32)
    body = assert_problem(response, 500)
    assert "hunter2" not in response.get_data(as_text=True)
    assert "log" in body["detail"]
    store.close()
    queue.close()


# -- idempotency -----------------------------------------------------------------------------


def test_a_repeated_idempotency_key_answers_the_first_job(farm: Farm) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = farm.submit({"text": "fox"}, headers)
    again = farm.submit({"text": "fox"}, headers)
    assert first.status_code == 202
    assert again.status_code == 200
    assert again.headers["Location"] == first.headers["Location"]
    # The seed was drawn once: the repeat shows the first job's seed.
    assert again.get_json() == first.get_json()
    assert farm.queue.depth() == 1
    assert len(farm.get("/v1/jobs").get_json()["jobs"]) == 1


def test_an_idempotency_key_reused_with_another_body_is_409(farm: Farm) -> None:
    headers = {"Idempotency-Key": "order-42"}
    assert farm.submit({"text": "fox"}, headers).status_code == 202
    body = assert_problem(farm.submit({"text": "cat"}, headers), 409)
    assert "Idempotency-Key" in body["detail"]
    assert farm.queue.depth() == 1


def test_idempotency_keys_are_per_owner(farm: Farm) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = farm.submit({"text": "fox"}, headers).get_json()
    bob = {"Authorization": f"Bearer {farm.new_key('bob')}", **headers}
    second = farm.client.post("/v1/jobs", json={"text": "fox"}, headers=bob)
    assert second.status_code == 202
    assert second.get_json()["id"] != first["id"]


@pytest.mark.parametrize("key", ["", "k" * 256, "caf\u00e9"])
def test_a_bad_idempotency_key_is_400(farm: Farm, key: str) -> None:
    headers = {"Idempotency-Key": key.encode("utf8").decode("latin-1")}
    assert_problem(farm.submit({"text": "fox"}, headers), 400, "Idempotency-Key")
    assert farm.queue.depth() == 0


# -- cancel ----------------------------------------------------------------------------------


def test_cancel_a_queued_job(farm: Farm) -> None:
    job = farm.submit_ok()
    response = farm.client.delete(f"/v1/jobs/{job['id']}", headers=farm.auth)
    assert response.status_code == 202
    canceled = response.get_json()
    assert canceled["status"] == "canceled" and canceled["finished_at"] is not None
    assert farm.get(f"/v1/jobs/{job['id']}").get_json()["status"] == "canceled"
    # The queue may still hold the id, but the job waits for nothing: it is not counted.
    assert farm.queue.depth() == 0
    assert farm.store.transition(job["id"], JobStatus.RUNNING) is None
    # Canceling again is harmless.
    again = farm.client.delete(f"/v1/jobs/{job['id']}", headers=farm.auth)
    assert again.status_code == 200
    assert again.get_json() == canceled


def test_cancel_a_running_job_asks_its_worker_to_stop(farm: Farm) -> None:
    job = farm.submit_ok()
    farm.store.transition(job["id"], JobStatus.RUNNING, started_at=utc_now(), worker="w1")
    response = farm.client.delete(f"/v1/jobs/{job['id']}", headers=farm.auth)
    assert response.status_code == 202
    running = response.get_json()
    assert running["status"] == "running" and running["cancel_requested"] is True


@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED])
def test_a_finished_job_cannot_be_canceled(farm: Farm, status: JobStatus) -> None:
    job = farm.submit_ok()
    farm.store.transition(job["id"], JobStatus.RUNNING, started_at=utc_now())
    farm.store.transition(job["id"], status, finished_at=utc_now())
    body = assert_problem(farm.client.delete(f"/v1/jobs/{job['id']}", headers=farm.auth), 409)
    assert f"already {status.value}" in body["detail"]
    assert farm.get(f"/v1/jobs/{job['id']}").get_json()["status"] == status.value


# -- results and files -----------------------------------------------------------------------


def finish_job(farm: Farm, job_id: str, grid_size: int, previews: int = 0) -> dict[str, Any]:
    """What a worker does: write the images, then record them in the job."""
    images = [image_key(job_id, i) for i in range(grid_size**2)]
    preview_keys = [preview_key(job_id, k) for k in range(1, previews + 1)]
    for key in [grid_key(job_id), *images, *preview_keys]:
        farm.storage.put(key, PNG_BYTES + key.encode(), "image/png")
    assert farm.store.transition(job_id, JobStatus.RUNNING, started_at=utc_now(), worker="w1")
    farm.store.update(job_id, progress_step=PROGRESS_TOTAL, attempts=1)
    result: dict[str, Any] = {"grid": grid_key(job_id), "images": images}
    if preview_keys:
        result["previews"] = preview_keys
    assert farm.store.transition(job_id, JobStatus.SUCCEEDED, finished_at=utc_now(), result=result)
    return result


def test_a_finished_job_shows_result_urls_that_serve_its_files(farm: Farm) -> None:
    job = farm.submit_ok({"text": "fox", "grid_size": 2, "progressive_outputs": True})
    finish_job(farm, job["id"], grid_size=2, previews=2)
    shown = farm.get(f"/v1/jobs/{job['id']}").get_json()
    assert shown["status"] == "succeeded"
    assert shown["progress"] == {"step": PROGRESS_TOTAL, "total": PROGRESS_TOTAL}
    assert shown["worker"] == "w1" and shown["attempts"] == 1
    result = shown["result"]
    assert result["grid"] == {
        "url": f"/v1/files/{grid_key(job['id'])}",
        "key": grid_key(job["id"]),
    }
    assert [image["key"] for image in result["images"]] == [
        image_key(job["id"], i) for i in range(4)
    ]
    assert len(result["previews"]) == 2
    for file in [result["grid"], *result["images"], *result["previews"]]:
        response = farm.get(file["url"])
        assert response.status_code == 200
        assert response.mimetype == "image/png"
        assert response.data == PNG_BYTES + file["key"].encode()
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_a_result_without_previews_has_no_previews_field(farm: Farm) -> None:
    job = farm.submit_ok()
    finish_job(farm, job["id"], grid_size=1)
    result = farm.get(f"/v1/jobs/{job['id']}").get_json()["result"]
    assert set(result) == {"grid", "images"}


@pytest.mark.parametrize(
    "path",
    [
        "other/grid.png",
        "jobs/{id}",
        "jobs/{id}/",
        "jobs/{id}/missing.png",
        "jobs/{id}/../{id}/grid.png",
        "jobs/not-a-job/grid.png",
        "jobs/" + "0" * 32 + "/grid.png",
    ],
)
def test_files_outside_the_callers_jobs_are_404(farm: Farm, path: str) -> None:
    job = farm.submit_ok()
    finish_job(farm, job["id"], grid_size=1)
    assert_problem(farm.get("/v1/files/" + path.replace("{id}", job["id"])), 404)


def test_files_need_a_key(farm: Farm) -> None:
    job = farm.submit_ok()
    finish_job(farm, job["id"], grid_size=1)
    assert_problem(farm.client.get(f"/v1/files/{grid_key(job['id'])}"), 401)


def test_with_s3_results_are_presigned_urls_and_files_is_404(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    # No request is made: presigning is local, and /v1/files answers before any S3 call.
    storage = S3Storage("results", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    store = SqliteJobStore(tmp_path / "farm.db")
    serve_every_model(store)
    queue = SqliteJobQueue(tmp_path / "farm.db")
    app = create_app(Settings(), store=store, storage=storage, queue=queue, anonymous_owner="me")
    client = app.test_client()
    job_id = client.post("/v1/jobs", json={"text": "fox"}).get_json()["id"]
    store.transition(job_id, JobStatus.RUNNING, started_at=utc_now())
    result = {"grid": grid_key(job_id), "images": [image_key(job_id, 0)]}
    store.transition(job_id, JobStatus.SUCCEEDED, finished_at=utc_now(), result=result)
    url = client.get(f"/v1/jobs/{job_id}").get_json()["result"]["grid"]["url"]
    assert url.startswith(f"http://127.0.0.1:9/results/{grid_key(job_id)}?")
    assert "X-Amz-Signature=" in url
    body = assert_problem(client.get(f"/v1/files/{grid_key(job_id)}"), 404)
    assert "S3" in body["detail"]
    storage.close()
    store.close()
    queue.close()


# -- warnings --------------------------------------------------------------------------------


def test_a_text_longer_than_the_model_reads_gets_a_warning(tmp_path: Path) -> None:
    # No merges: one token per letter (and one for the word start), plus <s> and </s>.
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for letter in letters:
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault("Ġ" + letter, len(vocab))
    tokenizer = TextTokenizer(vocab, [])
    app, store, queue = make_app(tmp_path, anonymous_owner="me", tokenizer=tokenizer)
    client = app.test_client()
    short = client.post("/v1/jobs", json={"text": "fox"})
    assert short.status_code == 202 and "warnings" not in short.get_json()
    long = client.post("/v1/jobs", json={"text": "a" * 70})
    assert long.status_code == 202
    (warning,) = long.get_json()["warnings"]
    assert len(tokenizer.tokenize("a" * 70)) == 73
    assert "73 tokens" in warning and "first 64" in warning
    store.close()
    queue.close()


# -- the queue failing -----------------------------------------------------------------------


class BrokenQueue(SqliteJobQueue):
    """A queue whose broker is down."""

    def enqueue(self, job_id: str, model: str | None = None, priority: str | None = None) -> None:
        raise StoreUnavailable("the broker at redis://user:hunter2@broker:6379 is down")


def test_a_job_that_cannot_be_queued_fails_and_the_answer_is_503(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "farm.db")
    serve_every_model(store)
    queue = BrokenQueue(tmp_path / "farm.db")
    app = create_app(
        Settings(),
        store=store,
        storage=LocalStorage(tmp_path / "files"),
        queue=queue,
        anonymous_owner="me",
    )
    client = app.test_client()
    response = client.post("/v1/jobs", json={"text": "fox"})
    body = assert_problem(response, 503)
    assert "queue" in body["detail"]
    assert response.headers["Retry-After"]
    assert "hunter2" not in response.get_data(as_text=True)
    (job,) = client.get("/v1/jobs").get_json()["jobs"]
    assert job["status"] == "failed"
    assert "could not be queued" in job["error"] and "hunter2" not in job["error"]
    store.close()
    queue.close()


# -- health, readiness, metrics, OpenAPI -----------------------------------------------------


def test_healthz(farm: Farm) -> None:
    response = farm.client.get("/healthz")
    assert response.status_code == 200
    assert response.get_json() == {"status": "ok"}


def test_readyz_is_200_when_every_backend_answers(farm: Farm) -> None:
    response = farm.client.get("/readyz")
    assert response.status_code == 200
    checks = response.get_json()["checks"]
    assert checks == {"store": "ok", "storage": "ok", "queue": "ok", "workers": "ok"}


def test_readyz_is_503_naming_a_missing_storage_folder(farm: Farm) -> None:
    farm.storage.root.rmdir()
    body = assert_problem(farm.client.get("/readyz"), 503)
    assert "storage" in body["detail"] and str(farm.storage.root) in body["detail"]
    assert body["checks"]["store"] == "ok" and body["checks"]["storage"] != "ok"


def test_readyz_is_503_until_a_worker_serves_a_model(farm: Farm) -> None:
    farm.store.worker_gone("tests")
    body = assert_problem(farm.client.get("/readyz"), 503)
    assert body["checks"]["workers"].startswith("no live worker serves a model")
    assert body["checks"]["store"] == "ok" and "workers:" in body["detail"]
    farm.store.worker_heartbeat("gpu0", models=["mega"], ttl_s=60)
    assert farm.client.get("/readyz").get_json()["checks"]["workers"] == "ok"


def test_readyz_is_503_naming_an_unusable_store(farm: Farm) -> None:
    farm.store.close()
    body = assert_problem(farm.client.get("/readyz"), 503)
    assert body["checks"]["store"] != "ok" and body["checks"]["queue"] == "ok"
    assert "store:" in body["detail"]


def metric_families(farm: Farm) -> dict[str, Any]:
    response = farm.client.get("/metrics")
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    text = response.get_data(as_text=True)
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_metrics(farm: Farm) -> None:
    jobs = [farm.submit_ok()["id"] for _ in range(3)]
    farm.client.delete(f"/v1/jobs/{jobs[0]}", headers=farm.auth)
    finish_job(farm, jobs[1], grid_size=2)
    farm.store.observe_finished(JobStatus.SUCCEEDED, 3.0, 4)
    farm.store.worker_heartbeat("w1")

    families = metric_families(farm)
    assert families["dalle_farm_jobs"].type == "gauge"
    by_status = {
        sample.labels["status"]: sample.value for sample in families["dalle_farm_jobs"].samples
    }
    assert by_status == {"queued": 1, "running": 0, "succeeded": 1, "failed": 0, "canceled": 1}
    # Only the queued job waits: the canceled and the finished one are not counted.
    assert families["dalle_farm_queue_depth"].samples[0].value == 1
    # w1 and the stand-in that serves every model (make_app).
    assert families["dalle_farm_workers_alive"].samples[0].value == 2
    images = families["dalle_farm_images_generated"]
    assert images.type == "counter"
    assert [(s.name, s.value) for s in images.samples] == [("dalle_farm_images_generated_total", 4)]

    histogram = families["dalle_farm_job_duration_seconds"]
    assert histogram.type == "histogram"
    buckets = {
        float(sample.labels["le"]): sample.value
        for sample in histogram.samples
        if sample.name.endswith("_bucket")
    }
    assert list(buckets) == [*DURATION_BUCKETS_S, float("inf")]
    assert buckets[2.5] == 0 and buckets[5.0] == 1 and buckets[float("inf")] == 1
    values = {sample.name: sample.value for sample in histogram.samples}
    assert values["dalle_farm_job_duration_seconds_count"] == 1
    assert values["dalle_farm_job_duration_seconds_sum"] == 3.0

    labels = [
        value
        for family in families.values()
        for sample in family.samples
        for value in sample.labels.values()
    ]
    for value in labels:
        assert not is_job_id(value) and not any(job_id in value for job_id in jobs)
        assert farm.key_id not in value and "dfk_" not in value


def test_metrics_need_no_key_and_answer_openmetrics_when_asked(farm: Farm) -> None:
    response = farm.client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response.mimetype == "application/openmetrics-text"
    assert response.get_data(as_text=True).rstrip().endswith("# EOF")


def flask_routes(app: Flask) -> set[tuple[str, str]]:
    """(OpenAPI path, method) for every rule Flask serves, without HEAD and OPTIONS."""
    routes = set()
    for rule in app.url_map.iter_rules():
        path = re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", rule.rule)
        for method in rule.methods or ():
            if method not in ("HEAD", "OPTIONS"):
                routes.add((path, method.lower()))
    return routes


def test_openapi_documents_every_route_and_only_those(farm: Farm) -> None:
    response = farm.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.get_json()
    assert document["openapi"].startswith("3.1")
    documented = {
        (path, method)
        for path, item in document["paths"].items()
        for method in item
        if method in ("get", "post", "put", "patch", "delete")
    }
    served = flask_routes(farm.app)
    assert {route for route in served if route[0].startswith("/v1/")} <= documented
    assert documented == served

    # Every $ref points at a schema that exists.
    refs = re.findall(r'"\$ref": "#/components/schemas/(\w+)"', json.dumps(document))
    assert refs and set(refs) <= set(document["components"]["schemas"])
    for path, item in document["paths"].items():
        for name in re.findall(r"{(\w+)}", path):
            operations = [operation for operation in item.values() if isinstance(operation, dict)]
            parameters = [
                *item.get("parameters", []),
                *(p for operation in operations for p in operation.get("parameters", [])),
            ]
            assert any(p["name"] == name and p["in"] == "path" for p in parameters), path


# -- odd Unicode: refused where it is input, never a 500 --------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        '{"text": "a \\ud800 fox"}',
        '{"text": "\\udfff"}',
        '{"text": "a\\u0000fox"}',
        '{"text": "a fox", "\\ud800": 1}',
        '{"text": "a fox", "model": "\\udc80"}',
    ],
)
def test_text_that_no_store_can_hold_is_a_422_naming_the_field(farm: Farm, body: str) -> None:
    # Valid JSON escapes for strings UTF-8 cannot encode: refused at the contract, with and
    # without an Idempotency-Key (whose fingerprint would hash the text).
    for headers in ({}, {"Idempotency-Key": "k"}):
        response = farm.client.post(
            "/v1/jobs",
            data=body,
            content_type="application/json",
            headers={**farm.auth, **headers},
        )
        problem = assert_problem(response, 422)
        response.get_data().decode("utf8")  # the answer itself is valid UTF-8
        assert problem["errors"]
    assert farm.queue.depth() == 0


def test_any_storable_text_round_trips_through_the_store(farm: Farm) -> None:
    text = "a fox 🦊\tin the\r\nsnow \u0085\u200b\ufeff 日本"
    job = farm.submit_ok({"text": text})
    assert farm.get(f"/v1/jobs/{job['id']}").get_json()["params"]["text"] == text


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/%ED%A0%80",
        "/v1/jobs/%F0%9F%A6%8A",
        "/v1/jobs/%00",
        "/v1/jobs/" + "%FF" * 40,
        "/v1/files/%ED%A0%80",
        "/v1/files/jobs/0193a5c0ffee00000000000000000001/%ED%A0%80.png",
        "/v1/files/jobs/0193a5c0ffee00000000000000000001/%00",
        "/%ED%A0%80",
    ],
)
def test_odd_bytes_in_a_path_are_a_404_problem(farm: Farm, path: str) -> None:
    assert_problem(farm.get(path), 404)
    deleted = farm.client.delete(path, headers=farm.auth)
    assert_problem(deleted, 405 if path.startswith("/v1/files/") else 404)


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=%ED%A0%80", "status"),
        ("cursor=%ED%A0%80", "cursor"),
        ("cursor=%F0%9F%A6%8A", "cursor"),
        ("limit=%EF%BC%95", "limit"),  # a full-width 5
        ("limit=%00", "limit"),
        ("%ED%A0%80=1", None),
    ],
)
def test_odd_bytes_in_a_query_are_a_400_problem(farm: Farm, query: str, field: str | None) -> None:
    assert_problem(farm.get(f"/v1/jobs?{query}"), 400, field)


@pytest.mark.parametrize("key", ["café", "\x7f", "k\x00", "\u00ff" * 300])
def test_odd_characters_in_an_idempotency_key_are_a_400_problem(farm: Farm, key: str) -> None:
    headers = {"Idempotency-Key": key.encode("utf8").decode("latin-1")}
    assert_problem(farm.submit({"text": "fox"}, headers), 400, "Idempotency-Key")


# -- concurrency, wiring, imports ------------------------------------------------------------


def test_100_concurrent_submissions(farm: Farm) -> None:
    local = threading.local()

    def submit(i: int) -> tuple[int, str]:
        if not hasattr(local, "client"):
            local.client = farm.app.test_client()
        response = local.client.post("/v1/jobs", json={"text": f"fox {i}"}, headers=farm.auth)
        return response.status_code, response.get_json()["id"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(submit, range(100)))
    assert [status for status, _ in answers] == [202] * 100
    assert len({job_id for _, job_id in answers}) == 100
    assert farm.queue.depth() == 100
    listed = farm.get("/v1/jobs?limit=100").get_json()
    assert len(listed["jobs"]) == 100 and listed["next_cursor"] is None


def test_create_app_from_env_builds_the_embedded_farm(tmp_path: Path) -> None:
    built: list[Services] = []

    def build(settings: Settings) -> Services:
        assert settings.data_dir == tmp_path / "data" and settings.max_grid_size == 3
        built.append(services_from_settings(settings))
        return built[0]

    environ = {
        "DALLE_FARM_DATA_DIR": str(tmp_path / "data"),
        "DALLE_FARM_MAX_GRID_SIZE": "3",
        "DALLE_FARM_MODELS_ROOT": str(tmp_path / "no-weights"),
    }
    app = create_app_from_env(build, environ)
    services = built[0]
    assert isinstance(services.store, SqliteJobStore)
    assert isinstance(services.queue, SqliteJobQueue)
    assert isinstance(services.storage, LocalStorage)
    assert services.tokenizer is None
    serve_every_model(services.store)
    _, secret = services.store.create_key("alice")
    client = app.test_client()
    response = client.post(
        "/v1/jobs",
        json={"text": "fox", "grid_size": 3},
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert response.status_code == 202
    assert client.get("/readyz").status_code == 200
    assert services.queue.depth() == 1
    assert (tmp_path / "data" / "farm.db").is_file()
    services.store.close()
    services.queue.close()


def test_the_tokenizer_is_loaded_from_the_models_root_when_there(tmp_path: Path) -> None:
    folder = tmp_path / "dalle_bart_mini"
    assert load_tokenizer(tmp_path, "mini") is None
    folder.mkdir()
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "Ġ": 4, "f": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf8")
    tokenizer = load_tokenizer(tmp_path, "mini")
    assert tokenizer is not None and tokenizer.tokenize("f") == [0, 4, 5, 2]


def test_the_api_does_not_import_torch(tmp_path: Path) -> None:
    script = f"""
import sys
from pathlib import Path
import api.app
from api.app import create_app
from core.settings import Settings
from core.storage import LocalStorage
from core.queue_sqlite import SqliteJobQueue
from core.store_sqlite import SqliteJobStore
root = Path({str(tmp_path)!r})
store = SqliteJobStore(root / "farm.db")
store.worker_heartbeat("tests", models=["mini"], ttl_s=3600)
app = create_app(
    Settings(),
    store=store,
    storage=LocalStorage(root / "files"),
    queue=SqliteJobQueue(root / "farm.db"),
    anonymous_owner="me",
)
client = app.test_client()
assert client.post("/v1/jobs", json={{"text": "fox"}}).status_code == 202
assert client.get("/metrics").status_code == 200
assert client.get("/openapi.json").status_code == 200
loaded = sorted(name for name in sys.modules if name == "torch" or name.startswith("torch."))
assert not loaded, loaded
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_a_job_for_a_model_no_live_worker_serves_is_422(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "farm.db")
    queue = SqliteJobQueue(tmp_path / "farm.db")
    app = create_app(
        Settings(), store=store, storage=LocalStorage(tmp_path), queue=queue, anonymous_owner="me"
    )
    client = app.test_client()
    # No worker at all: nothing is served, and nothing is recorded or queued.
    body = assert_problem(client.post("/v1/jobs", json={"text": "fox"}), 422, field="model")
    assert body["type"].endswith("/model-not-served")
    assert "no worker serves model 'mini'" in body["detail"] and "none" in body["detail"]
    store.worker_heartbeat("gpu0", models=["mini"], ttl_s=60)
    body = assert_problem(
        client.post("/v1/jobs", json={"text": "fox", "model": "mega"}), 422, field="model"
    )
    assert "served: mini" in body["detail"] and "DALLE_FARM_MODEL=mega" in body["detail"]
    assert client.post("/v1/jobs", json={"text": "fox"}).status_code == 202
    assert queue.depth() == 1
    assert len(store.list_jobs("me", status=None, cursor=None, limit=10)[0]) == 1
    # The worker leaves: its model is refused again.
    store.worker_gone("gpu0")
    assert_problem(client.post("/v1/jobs", json={"text": "fox"}), 422, field="model")
    store.close()
    queue.close()
