"""Headless Chromium for the browser tests (tests/test_docs_browser.py, tests/test_web_browser.py).

Chromium is Debian's `chromium` package, driven by Playwright (Playwright's own browser download
needs internet); scripts/test installs both when run as root. Where either is missing, a test
that needs a browser is skipped, or fails when run as root (see `unavailable`).

    with chromium() as browser:                    a module fixture's browser
        with open_page(browser, ...) as watched:   a fresh page that records its errors, and
            watched.page.goto(...)                 is screenshot when it closes
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Response

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def unavailable(what: str) -> NoReturn:
    """Skip the test for want of `what`; fail it as root."""
    # As root, scripts/test installs both, so a missing one there is a broken setup, not a skip.
    if AS_ROOT:
        pytest.fail(f"{what} is missing: run scripts/test, which installs it")
    pytest.skip(f"{what} is not installed (scripts/test installs it when run as root)")


@contextmanager
def chromium() -> Iterator[Browser]:
    """Debian's chromium, headless under Playwright, until the block ends."""
    path = shutil.which("chromium")
    if path is None:
        unavailable("chromium (sudo apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        # Chromium's sandbox refuses to run as root.
        args = ["--no-sandbox"] if AS_ROOT else []
        browser = playwright.chromium.launch(executable_path=path, args=args)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class WatchedPage:
    """A page, and what it did, recorded as it happened."""

    page: Page
    requests: list[str] = field(default_factory=list)  # every URL it asked for
    failed: list[str] = field(default_factory=list)  # requests that failed or answered ≥ 400
    errors: list[str] = field(default_factory=list)  # console errors and uncaught ones

    def watch(self) -> None:
        def on_console(message: ConsoleMessage) -> None:
            # A Content-Security-Policy violation is reported as a console error too.
            if message.type == "error":
                self.errors.append(f"console: {message.text}")

        def on_failed(request: Request) -> None:
            self.failed.append(f"{request.method} {request.url}: {request.failure}")

        def on_response(response: Response) -> None:
            if response.status >= 400:
                self.failed.append(f"{response.request.method} {response.url}: {response.status}")

        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("requestfailed", on_failed)
        self.page.on("response", on_response)
        self.page.on("console", on_console)
        self.page.on("pageerror", lambda error: self.errors.append(f"page: {error}"))

    def check(self) -> None:
        """No uncaught error, no Content-Security-Policy violation, no failed load other than
        an HTTP error answer the test asked for (the browser logs those as console errors)."""
        unexpected = [e for e in self.errors if "Failed to load resource" not in e]
        assert unexpected == [], unexpected


@contextmanager
def open_page(
    browser: Browser, width: int, height: int, timeout_ms: float, screenshot: Path
) -> Iterator[WatchedPage]:
    """A fresh page (in a context of its own, `width` × `height`, every wait at most
    `timeout_ms`), watched; when the block ends, passed or failed, a full-page screenshot of it
    goes to `screenshot`, for a person, and the context is closed."""
    context = browser.new_context(viewport={"width": width, "height": height})
    context.set_default_timeout(timeout_ms)
    watched = WatchedPage(context.new_page())
    watched.watch()
    try:
        yield watched
    finally:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        with suppress(Exception):
            watched.page.screenshot(path=str(screenshot), full_page=True)
        context.close()
