"""GET /docs in a real browser: headless Chromium, driven by Playwright, against the API served by
our own HTTP server on a loopback port. tests/test_docs.py checks the page over HTTP; only a
browser shows that Swagger UI actually renders our OpenAPI 3.1 document under the page's
Content-Security-Policy, fetches nothing from elsewhere, and can call the API.

The browser is tests/browser.py's: Debian's `chromium` package, which scripts/test installs with
playwright when run as root.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import pytest

from cli.api import create_api_app
from core.settings import Settings
from tests.browser import WatchedPage, chromium, open_page
from tests.servers import api_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Locator, Page

# Only fails a test that hangs (Swagger UI's bundle is a few MB of JavaScript to parse).
BROWSER_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@dataclass
class Farm:
    origin: str
    secret: str


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    """The API as `dalle-farm api` builds it (API keys required), served on a thread."""
    app = create_api_app(Settings(data_dir=tmp_path_factory.mktemp("docs-browser")))
    store = app.extensions["dalle_farm"].store
    _, secret = store.create_key("browser")
    try:
        with api_server(app) as origin:
            yield Farm(origin, secret)
    finally:
        store.close()


@pytest.fixture
def docs(browser: Browser, farm: Farm, tmp_path: Path) -> Iterator[tuple[Page, WatchedPage]]:
    """/docs open in a fresh page, with Swagger UI done rendering the document (what the page
    looked like goes to the test's tmp_path/docs.png, passed or failed, for a person)."""
    with open_page(browser, 1280, 900, BROWSER_TIMEOUT_MS, tmp_path / "docs.png") as watched:
        page = watched.page
        page.goto(f"{farm.origin}/docs")
        # Operations are drawn only once /openapi.json was fetched and parsed. Otherwise Swagger
        # UI shows an errors box (fetch or parse errors) or "Unable to render this definition"
        # (.version-pragma: an "openapi" version it does not support).
        page.locator(".opblock, .errors-wrapper, .version-pragma").first.wait_for()
        problems = page.locator(".errors-wrapper, .version-pragma").all_inner_texts()
        assert problems == [], f"Swagger UI did not render /openapi.json: {problems}"
        yield page, watched


def operation(page: Page, method: str, path: str) -> Locator:
    return page.locator(f'.opblock-{method}:has(.opblock-summary-path[data-path="{path}"])')


def test_swagger_ui_renders_the_document(docs: tuple[Page, WatchedPage], farm: Farm) -> None:
    page, traffic = docs
    assert page.title() == "dalle-farm API"
    info = page.locator(".information-container .title")
    assert info.inner_text().split() == ["dalle-farm", "1", "OAS", "3.1"]
    for method, path in [
        ("post", "/v1/jobs"),
        ("get", "/v1/jobs"),
        ("get", "/v1/jobs/{job_id}"),
        ("delete", "/v1/jobs/{job_id}"),
        ("get", "/healthz"),
    ]:
        assert operation(page, method, path).count() == 1, (method, path)
    assert "JobParams" in page.locator("section.models").inner_text()  # the Schemas section
    page.wait_for_load_state("networkidle")
    assert f"{farm.origin}/openapi.json" in traffic.requests
    origins = {f"{p.scheme}://{p.netloc}" for p in map(urlsplit, traffic.requests)}
    assert origins == {farm.origin}, traffic.requests
    assert traffic.failed == [] and traffic.errors == [], (traffic.failed, traffic.errors)


def execute(page: Page, method: str, path: str) -> str:
    """Try it out → Execute on one operation; the status code the page shows."""
    block = operation(page, method, path)
    block.locator(".opblock-summary").click()
    block.locator(".try-out__btn").click()
    block.locator(".execute").click()
    status = block.locator(".live-responses-table .response .response-col_status").first
    status.wait_for()
    return str(status.inner_text()).strip()


def test_try_it_out_calls_the_api(docs: tuple[Page, WatchedPage], farm: Farm) -> None:
    page, traffic = docs
    assert execute(page, "get", "/healthz") == "200"
    # The keyed calls, with the key given to "Authorize" (the document's bearer scheme).
    page.locator(".scheme-container .authorize").click()
    page.locator(".modal-ux input").fill(farm.secret)
    page.locator(".modal-ux .auth-btn-wrapper .authorize").click()
    page.locator(".modal-ux .btn-done").click()
    assert execute(page, "get", "/v1/jobs") == "200"
    assert f"{farm.origin}/v1/jobs" in [url.split("?")[0] for url in traffic.requests]
    assert traffic.failed == [] and traffic.errors == [], (traffic.failed, traffic.errors)
