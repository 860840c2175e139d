"""GET /docs in a real browser: headless Chromium, driven by Playwright, against the API served by
our own HTTP server on a loopback port. tests/test_docs.py checks the page over HTTP; only a
browser shows that Swagger UI actually renders our OpenAPI 3.1 document under the page's
Content-Security-Policy, fetches nothing from elsewhere, and can call the API.

Chromium is Debian's `chromium` package (Playwright's own browser download needs internet);
scripts/test installs it and playwright when run as root.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import urlsplit

import pytest

from api.server import ServerConfig, listen, serve_app
from cli.api import create_api_app
from core.settings import Settings

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Request, Response

# Only fails a test that hangs (Swagger UI's bundle is a few MB of JavaScript to parse).
BROWSER_TIMEOUT_MS = 30_000
ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _unavailable(what: str) -> NoReturn:
    # As root, scripts/test installs both, so a missing one there is a broken setup, not a skip.
    if ROOT:
        pytest.fail(f"{what} is missing: run scripts/test, which installs it")
    pytest.skip(f"{what} is not installed (scripts/test installs it when run as root)")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        _unavailable("chromium (sudo apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def browser(chromium: str) -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        # Chromium's sandbox refuses to run as root.
        args = ["--no-sandbox"] if ROOT else []
        launched = playwright.chromium.launch(executable_path=chromium, args=args)
        yield launched
        launched.close()


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
    sockets = listen("127.0.0.1", 0)
    port = sockets[0].getsockname()[1]
    stop = threading.Event()
    thread = threading.Thread(
        target=serve_app, args=(app, sockets, ServerConfig(threads=4), stop), daemon=True
    )
    thread.start()
    try:
        yield Farm(f"http://127.0.0.1:{port}", secret)
    finally:
        stop.set()
        thread.join(30)
        store.close()
    assert not thread.is_alive(), "the server did not stop"


@dataclass
class Traffic:
    """What the page did, recorded as it happened."""

    requests: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def watch(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            # A Content-Security-Policy violation is reported as a console error too.
            if message.type == "error":
                self.errors.append(f"console: {message.text}")

        def on_failed(request: Request) -> None:
            self.failed.append(f"{request.method} {request.url}: {request.failure}")

        def on_response(response: Response) -> None:
            if response.status >= 400:
                self.failed.append(f"{response.request.method} {response.url}: {response.status}")

        page.on("request", lambda request: self.requests.append(request.url))
        page.on("requestfailed", on_failed)
        page.on("response", on_response)
        page.on("console", on_console)
        page.on("pageerror", lambda error: self.errors.append(f"page: {error}"))


@pytest.fixture
def docs(browser: Browser, farm: Farm, tmp_path: Path) -> Iterator[tuple[Page, Traffic]]:
    """/docs open in a fresh page, with Swagger UI done rendering the document."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(BROWSER_TIMEOUT_MS)
    page = context.new_page()
    traffic = Traffic()
    traffic.watch(page)
    try:
        page.goto(f"{farm.origin}/docs")
        # Operations are drawn only once /openapi.json was fetched and parsed. Otherwise Swagger
        # UI shows an errors box (fetch or parse errors) or "Unable to render this definition"
        # (.version-pragma: an "openapi" version it does not support).
        page.locator(".opblock, .errors-wrapper, .version-pragma").first.wait_for()
        problems = page.locator(".errors-wrapper, .version-pragma").all_inner_texts()
        assert problems == [], f"Swagger UI did not render /openapi.json: {problems}"
        yield page, traffic
    finally:
        with suppress(Exception):  # what the page looked like, passed or failed, for a person
            page.screenshot(path=str(tmp_path / "docs.png"), full_page=True)
        context.close()


def operation(page: Page, method: str, path: str) -> Locator:
    return page.locator(f'.opblock-{method}:has(.opblock-summary-path[data-path="{path}"])')


def test_swagger_ui_renders_the_document(docs: tuple[Page, Traffic], farm: Farm) -> None:
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


def test_try_it_out_calls_the_api(docs: tuple[Page, Traffic], farm: Farm) -> None:
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
