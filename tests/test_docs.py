"""GET /docs: Swagger UI for /openapi.json, served whole from our server (no CDN, no key)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from swagger_ui_bundle import swagger_ui_path

from api.app import create_app
from core.queue_sqlite import SqliteJobQueue
from core.settings import Settings
from core.storage import LocalStorage
from core.store_sqlite import SqliteJobStore


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    """An app that needs API keys: /docs must not."""
    store = SqliteJobStore(tmp_path / "farm.db")
    queue = SqliteJobQueue(tmp_path / "farm.db")
    app = create_app(
        Settings(data_dir=tmp_path),
        store=store,
        storage=LocalStorage(tmp_path / "files"),
        queue=queue,
    )
    yield app.test_client()
    store.close()
    queue.close()


def test_docs_is_a_page_that_needs_no_key(client: FlaskClient) -> None:
    response = client.get("/docs")
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert client.get("/v1/jobs").status_code == 401  # while the API itself needs one


def test_the_page_and_every_asset_it_references_come_from_our_server(
    client: FlaskClient,
) -> None:
    page = client.get("/docs").get_data(as_text=True)
    # No absolute URL and no protocol-relative one ("//cdn.example/x.js").
    assert not re.search(r"https?:|[\"'(]//", page), page
    references = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(references) >= 3
    spec = re.search(r'url: "([^"]+)"', page)
    assert spec is not None
    for url in [*references, spec.group(1)]:
        assert url.startswith("/") and not url.startswith("//"), url
        with client.get(url) as response:  # closes the static file it streams
            assert response.status_code == 200, url
            assert response.get_data(), url
    assert spec.group(1) == "/openapi.json"


def test_the_page_asks_for_nothing_from_elsewhere(client: FlaskClient) -> None:
    response = client.get("/docs")
    # Swagger UI would fetch a validator badge from validator.swagger.io by default.
    assert "validatorUrl: null" in response.get_data(as_text=True)
    assert "default-src 'self'" in response.headers["Content-Security-Policy"]


def test_the_bundled_swagger_ui_renders_openapi_3_1() -> None:
    # Swagger UI 4 refuses any document whose "openapi" is not 3.0.x.
    version = re.fullmatch(r"swagger-ui-(\d+)\.(\d+)\.(\d+)", Path(str(swagger_ui_path)).name)
    assert version is not None and int(version.group(1)) >= 5


def test_a_missing_asset_is_a_404_problem(client: FlaskClient) -> None:
    response = client.get("/docs/static/nothing.js")
    assert response.status_code == 404 and response.mimetype == "application/problem+json"
