"""api/web.py over HTTP (Flask's test client): the page and its files, their content types,
caching and Content-Security-Policy, and 404 problems for anything else. The page working in a
browser is tests/test_web_browser.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from api.web import WEB_ROOT, content_security_policy, web_files
from cli.api import create_api_app
from core.settings import Settings
from core.storage import LocalStorage, S3Storage
from tests.farm_helpers import AWS_ENV


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlaskClient]:
    """The API as `dalle-farm api` builds it: keys required for /v1, none for the page."""
    app = create_api_app(Settings(data_dir=tmp_path_factory.mktemp("web")))
    yield app.test_client()
    app.extensions["dalle_farm"].store.close()


def directives(policy: str) -> dict[str, list[str]]:
    return {
        name: values
        for name, *values in (part.split() for part in policy.split(";") if part.strip())
    }


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/", "text/html; charset=utf-8"),
        ("/web/index.html", "text/html; charset=utf-8"),
        ("/web/app.js", "text/javascript; charset=utf-8"),
        ("/web/client.js", "text/javascript; charset=utf-8"),
        ("/web/style.css", "text/css; charset=utf-8"),
    ],
)
def test_files_are_served_with_their_type_and_headers(
    client: FlaskClient, path: str, content_type: str
) -> None:
    response = client.get(path)  # no Authorization header: the page needs no key
    assert response.status_code == 200
    assert response.headers["Content-Type"] == content_type
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Cache-Control"] == "no-cache"
    policy = directives(response.headers["Content-Security-Policy"])
    assert policy["script-src"] == ["'self'"]
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]
    assert policy["frame-ancestors"] == ["'none'"]
    name = "index.html" if path == "/" else path.removeprefix("/web/")
    assert response.data == (WEB_ROOT / name).read_bytes()


def test_a_file_is_revalidated_with_its_etag(client: FlaskClient) -> None:
    first = client.get("/web/app.js")
    etag = first.headers["ETag"]
    again = client.get("/web/app.js", headers={"If-None-Match": etag})
    assert again.status_code == 304
    assert again.data == b""


def test_the_page_has_no_inline_script_and_only_local_files() -> None:
    page = (WEB_ROOT / "index.html").read_text()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.S)
    assert scripts and all('src="/web/' in attrs and not body.strip() for attrs, body in scripts)
    assert "style=" not in page and "http://" not in page and "https://" not in page
    # Every module the app imports is a file the blueprint serves.
    served = web_files()
    for script in WEB_ROOT.glob("*.js"):
        for module in re.findall(r'from "\./([^"]+)"', script.read_text()):
            assert module in served, (script.name, module)


@pytest.mark.parametrize(
    "path",
    ["/web/nope.js", "/web/../web.py", "/web/%2e%2e/web.py", "/web/", "/web/sub/app.js"],
)
def test_unknown_files_are_404_problems(client: FlaskClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.mimetype == "application/problem+json"
    problem = response.get_json()
    assert problem["status"] == 404 and problem["detail"]


def test_the_routes_are_in_the_openapi_document(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    assert "text/html" in paths["/"]["get"]["responses"]["200"]["content"]
    assert "404" in paths["/web/{name}"]["get"]["responses"]


def test_the_policy_allows_images_from_presigned_urls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in AWS_ENV.items():  # fake credentials to sign with (no request is made)
        monkeypatch.setenv(name, value)
    local = directives(content_security_policy(LocalStorage(tmp_path)))
    assert local["img-src"] == ["'self'", "blob:"]
    s3 = S3Storage(
        bucket="results",
        endpoint_url="http://127.0.0.1:9",
        public_endpoint_url="https://files.example.org",
        url_expiry_s=60,
    )
    assert directives(content_security_policy(s3))["img-src"] == [
        "'self'",
        "blob:",
        "https://files.example.org",
    ]
