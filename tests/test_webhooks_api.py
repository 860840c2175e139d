"""POST /v1/jobs with a webhook_url (api/routes.py): URLs that may not be called are refused at
submit (422 on the field, saying why), without an allow-list and with one; a good URL is kept
in the job's params and registers a delivery."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.app import create_app
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import LocalStorage
from core.store_sqlite import SqliteJobStore
from tests.test_api import Farm, assert_problem, farm, serve_every_model

__all__ = ["farm"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1, a loopback address"),
        ("http://localhost/hook", "a loopback address"),
        ("http://10.1.2.3/hook", "10.1.2.3, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "a cloud metadata address"),
        ("http://[::1]/hook", "::1, a loopback address"),
        ("http://[::ffff:192.168.0.1]/hook", "a private address (as 192.168.0.1 inside an IPv6"),
        ("http://no-such-host.invalid/hook", "cannot be resolved"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("http://user:pw@example.com/", "credentials"),
    ],
)
def test_a_url_that_may_not_be_called_is_refused_at_submit(
    farm: Farm, url: str, reason: str
) -> None:
    body = assert_problem(farm.submit({"text": "a fox", "webhook_url": url}), 422, "webhook_url")
    (error,) = body["errors"]
    assert reason in error["message"], body
    assert reason in body["detail"]
    assert farm.store.list_jobs(farm.key_id)[0] == []  # nothing was created


def test_the_operators_allow_list_admits_a_receiver(tmp_path: Path) -> None:
    store = SqliteJobStore(tmp_path / "farm.db")
    serve_every_model(store)
    key, secret = store.create_key("alice")
    storage = LocalStorage(tmp_path / "files")
    settings = Settings(data_dir=tmp_path, webhook_allow="127.0.0.1/32")
    queue = SqliteJobQueue(tmp_path / "farm.db")
    app = create_app(settings, store=store, storage=storage, queue=queue)
    try:
        client = app.test_client()
        auth = {"Authorization": f"Bearer {secret}"}
        url = "http://127.0.0.1:9/hook"
        response = client.post("/v1/jobs", json={"text": "a fox", "webhook_url": url}, headers=auth)
        assert response.status_code == 202, response.get_data(as_text=True)
        job = response.get_json()
        assert job["params"]["webhook_url"] == url
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth).get_json() == job
        delivery = store.webhook_delivery(job["id"])
        assert delivery is not None and (delivery.url, delivery.owner) == (url, key.id)
        refused = client.post(
            "/v1/jobs", json={"text": "a fox", "webhook_url": "http://127.0.0.2/"}, headers=auth
        )
        assert_problem(refused, 422, "webhook_url")
        plain = client.post("/v1/jobs", json={"text": "a fox"}, headers=auth).get_json()
        assert "webhook_url" not in plain["params"] and store.webhook_delivery(plain["id"]) is None
    finally:
        queue.close()
        store.close()
