"""The web app (GET /) in a real browser: headless Chromium driven by Playwright, against a real
`dalle-farm serve` (the small random model, SQLite, local files) on loopback, and against the
API with keys required for the key form. tests/test_web.py checks the blueprint over HTTP;
only a browser shows the page working: submitting, live progress, the grid and its tiles,
canceling, field errors, the key form and the farm page's numbers.

Screenshots of each page go to test-artifacts/web/ (git-ignored), passed or failed, and so does
web-app.jpg, the job page as the README shows it. The README's own copy, docs/web-app.jpg (in
git), is replaced with it only when asked, with DALLE_FARM_UPDATE_SCREENSHOTS=1:

    DALLE_FARM_UPDATE_SCREENSHOTS=1 .venv/bin/python -m pytest tests/test_web_browser.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cli.api import create_api_app
from core.contract import JobParams
from core.job import JobRecord, JobStatus, new_job_id, utc_now
from core.settings import Settings
from tests.browser import WatchedPage, chromium, open_page
from tests.embedded_serve import Serve
from tests.farm_helpers import REPO_ROOT, http, http_json, subprocess_env, wait_for
from tests.servers import api_server

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

BROWSER_TIMEOUT_MS = 60_000
JOB_TIMEOUT_S = 120
ARTIFACTS = REPO_ROOT / "test-artifacts" / "web"
README_SCREENSHOT = REPO_ROOT / "docs" / "web-app.jpg"
UPDATE_SCREENSHOTS = "DALLE_FARM_UPDATE_SCREENSHOTS"  # "1": replace README_SCREENSHOT
# A job that runs for a while on the small model on a slow CPU: 64 images per decoder step.
SLOW_GRID = 8


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def serve(
    tmp_path_factory: pytest.TempPathFactory, small_models_root: Path, browser: Browser
) -> Iterator[Serve]:
    """`dalle-farm serve` on loopback: no key needed."""
    env = subprocess_env(
        {
            "DALLE_FARM_DATA_DIR": str(tmp_path_factory.mktemp("web-serve")),
            "DALLE_FARM_MODELS_ROOT": str(small_models_root),
        }
    )
    farm = Serve(env, tmp_path_factory.mktemp("web-log") / "serve.log")
    try:
        yield farm.start()
    finally:
        farm.process.kill_group()


@dataclass
class KeyedFarm:
    origin: str
    secret: str
    prompt: str
    job_id: str


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedFarm]:
    """The API as `dalle-farm api` builds it (keys required), with one job of the key's."""
    app = create_api_app(Settings(data_dir=tmp_path_factory.mktemp("web-keyed")))
    store = app.extensions["dalle_farm"].store
    key, secret = store.create_key("web")
    prompt = "a job made before the page opened"
    params = JobParams(text=prompt, seed=3).to_dict()
    job_id = new_job_id()
    store.create_job(JobRecord(job_id, key.id, JobStatus.QUEUED, params, created_at=utc_now()))
    try:
        with api_server(app) as origin:
            yield KeyedFarm(origin, secret, prompt, job_id)
    finally:
        store.close()


@pytest.fixture
def web(browser: Browser, request: pytest.FixtureRequest) -> Iterator[WatchedPage]:
    """A fresh page, screenshot into ARTIFACTS under the test's name when the test ends."""
    screenshot = ARTIFACTS / f"{request.node.name}.png"
    with open_page(browser, 1100, 900, BROWSER_TIMEOUT_MS, screenshot) as watched:
        yield watched


def wait_js(page: Page, expression: str, timeout_s: float = BROWSER_TIMEOUT_MS / 1000) -> None:
    """Wait until the JavaScript `expression` is true in the page. (Playwright's
    wait_for_function polls with eval, which the page's Content-Security-Policy forbids.)"""
    wait_for(lambda: page.evaluate(expression), timeout_s, f"the page to show {expression}", 0.2)


def record_progress(page: Page) -> None:
    """Keep every value the page gives a progress bar (but each bar's latest), in
    window.progressValues."""
    page.evaluate(
        """() => {
          window.progressValues = [];
          new MutationObserver((changes) => {
            for (const c of changes) {
              // The value each change replaced (the observer runs later, in batches).
              if (c.target.matches?.("progress") && c.oldValue !== null) {
                window.progressValues.push(Number(c.oldValue));
              }
            }
          }).observe(document.body, {subtree: true, attributes: true, attributeOldValue: true,
                                     attributeFilter: ["aria-valuenow"]});
        }"""
    )


def submit(page: Page, text: str, **fields: str) -> str:
    """Fill the form and submit it; the new job's id, from the page's answer."""
    page.fill("#text", text)
    for name, value in fields.items():
        if page.locator(f"#field-{name}").is_hidden():
            page.click(".more summary")
        if value in ("on", "off"):
            page.locator(f"#field-{name}").set_checked(value == "on")
        else:
            page.fill(f"#field-{name}", value)
    page.click("#submit-form button[type=submit]")
    link = page.locator(".outcome a")
    link.wait_for()
    href = link.get_attribute("href")
    assert href is not None
    return href.rsplit("/", 1)[1]


def test_submit_watch_the_progress_and_open_a_tile(web: WatchedPage, serve: Serve) -> None:
    page = web.page
    page.goto(f"{serve.base}/")
    assert page.title() == "dalle-farm"
    record_progress(page)
    # One image: the small model decodes fast, but its VQGAN takes seconds per image and frame.
    job_id = submit(page, "a lighthouse at dawn", grid_size="1", seed="5", progressive_outputs="on")
    row = page.locator(f'li.job[data-id="{job_id}"]')
    assert row.locator(".prompt").inner_text() == "a lighthouse at dawn"
    assert not page.locator("#key-dialog").is_visible()  # loopback: no key asked for

    row.locator(".prompt").click()
    page.locator("#grid-image").wait_for(timeout=JOB_TIMEOUT_S * 1000)
    wait_js(page, "document.querySelector('#grid-image').naturalWidth === 256")
    values = page.evaluate("window.progressValues")
    assert any(0 < value < 256 for value in values), values
    # Previews arrived, then the tiles, each with a download link.
    frames = len(serve.job(job_id)["result"]["previews"])
    assert frames > 1
    wait_js(page, f"document.querySelectorAll('#previews img[data-frame]').length === {frames}")
    tiles = page.locator(".tiles .tile img")
    assert tiles.count() == 1
    wait_js(
        page,
        "[...document.querySelectorAll('.tiles .tile img')].every(i => i.naturalWidth === 256)",
    )
    assert page.locator(".tiles a.download[href^='blob:']").count() == 1
    page.locator(".tiles .tile").first.click()
    dialog = page.locator("#tile-dialog")
    dialog.wait_for()
    assert page.locator("#tile-title").inner_text() == "Tile 1"
    wait_js(page, "document.querySelector('#tile-image').naturalWidth === 256")
    assert page.locator("#tile-download").get_attribute("download") == f"{job_id}-0.png"
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # Details: the seed, the weights and timings of job.json, and a curl command that submits
    # exactly this job's params.
    job = serve.job(job_id)
    record = json.loads(serve.fetch(f"/v1/files/jobs/{job_id}/job.json"))
    details = page.locator("#details")
    details.locator("dd", has_text=record["weights"]["sha256"]).wait_for()
    assert "Render time" in details.inner_text()
    curl = page.locator("#curl").input_value()
    assert "$DALLE_FARM_KEY" in curl and f"{serve.base}/v1/jobs" in curl
    match = re.search(r"-d '(.*)'$", curl)
    assert match is not None, curl
    assert json.loads(match.group(1)) == job["params"]
    assert job["params"]["seed"] == 5
    page.set_viewport_size({"width": 1000, "height": 760})
    page.evaluate("window.scrollTo(0, 0)")
    screenshot = ARTIFACTS / README_SCREENSHOT.name
    page.screenshot(path=str(screenshot), type="jpeg", quality=70)
    if os.environ.get(UPDATE_SCREENSHOTS) == "1":
        shutil.copyfile(screenshot, README_SCREENSHOT)
    web.check()


def test_a_bad_value_is_shown_at_its_field(web: WatchedPage, serve: Serve) -> None:
    page = web.page
    page.goto(f"{serve.base}/")
    page.click(".more summary")
    page.fill("#text", "a fox")
    page.fill("#field-temperature", "0")
    page.fill("#field-top_k", "2.5")
    page.click("#submit-form button[type=submit]")
    error = page.locator("#temperature-error")
    error.wait_for()
    # What the API says about the same body, at the fields it names.
    status, _, content = http(
        "POST", f"{serve.base}/v1/jobs", {"text": "a fox", "temperature": 0, "top_k": 2.5}
    )
    assert status == 422
    messages = {e["field"]: e["message"] for e in json.loads(content)["errors"]}
    assert set(messages) == {"temperature", "top_k"}
    assert error.inner_text() == messages["temperature"]
    assert page.locator("#top_k-error").inner_text() == messages["top_k"]
    assert page.locator("#field-temperature").get_attribute("aria-invalid") == "true"
    assert page.locator("#field-grid_size").get_attribute("aria-invalid") is None
    web.check()


def test_cancel_a_running_job_and_again(web: WatchedPage, serve: Serve) -> None:
    page = web.page
    page.goto(f"{serve.base}/")
    page.locator("li.job").first.wait_for()
    record_progress(page)
    job_id = submit(page, "a very long render", grid_size=str(SLOW_GRID), seed="11")
    row = page.locator(f'li.job[data-id="{job_id}"]')
    # The list's own progress bar moves while it runs.
    wait_js(
        page,
        f"""() => {{
          const bar = document.querySelector('li.job[data-id="{job_id}"] progress');
          return bar && Number(bar.getAttribute('aria-valuenow')) > 0;
        }}""",
        JOB_TIMEOUT_S,
    )
    assert row.get_attribute("data-status") == "running"
    row.locator("button.cancel").click()
    wait_js(
        page,
        f"document.querySelector('li.job[data-id=\"{job_id}\"]').dataset.status === 'canceled'",
        JOB_TIMEOUT_S,
    )
    assert serve.job(job_id)["status"] == "canceled"
    assert row.locator("button.cancel").is_hidden()

    # Again: the same settings with the next seed, at the top of the list.
    first = page.locator("li.job").first
    first_id = first.get_attribute("data-id")
    assert first_id == job_id
    first.locator("button.again").click()
    wait_js(page, f"document.querySelector('li.job').dataset.id !== '{job_id}'")
    again_id = page.locator("li.job").first.get_attribute("data-id")
    assert again_id is not None
    again = serve.job(again_id)
    http_json("DELETE", f"{serve.base}/v1/jobs/{again_id}")  # not worth rendering in full
    assert again["params"] == {**serve.job(job_id)["params"], "seed": 12}
    web.check()


def test_the_key_form_when_keys_are_required(web: WatchedPage, keyed: KeyedFarm) -> None:
    page = web.page
    page.goto(f"{keyed.origin}/")
    dialog = page.locator("#key-dialog")
    dialog.wait_for()
    page.screenshot(path=str(ARTIFACTS / "key-form.png"))
    page.fill("#key-input", "dfk_not_a_key")
    page.click("#key-form button[type=submit]")
    page.locator("#key-message", has_text="refused").wait_for()
    page.fill("#key-input", keyed.secret)
    page.click("#key-form button[type=submit]")
    page.locator("li.job .prompt", has_text=keyed.prompt).wait_for()
    dialog.wait_for(state="hidden")
    assert page.evaluate("sessionStorage.getItem('dalle-farm-key')") == keyed.secret
    # Reloading the tab keeps the key: no second question.
    page.reload()
    page.locator("li.job .prompt", has_text=keyed.prompt).wait_for()
    assert not dialog.is_visible()
    assert not [url for url in web.requests if keyed.secret in url]
    # A phone's width: nothing sticks out sideways.
    page.set_viewport_size({"width": 360, "height": 740})
    page.screenshot(path=str(ARTIFACTS / "narrow.png"), full_page=True)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    web.check()


def test_the_event_stream_parser(web: WatchedPage, keyed: KeyedFarm) -> None:
    """api/web/sse.js, in the page: events split anywhere across chunks, CRLF and CR line
    ends, comments, multi-line data and the last id (for Last-Event-ID)."""
    page = web.page
    page.goto(f"{keyed.origin}/web/index.html#/farm")  # the farm page asks for no key
    stream = (
        ": a comment\r\nid: 1\r\nevent: progress\r\n"
        'data: {"id":"a","step":3,"total":256}\r\n\r\n'
        'event: status\rdata: {"x":\rdata: 1}\rid: 2\r\r'
        ": keep-alive\n\nid: 3\nevent: done\ndata:{}\n\n"
    )
    for size in (1, 2, 5, len(stream)):
        events = page.evaluate(
            """async ([text, size]) => {
              const { EventParser } = await import("/web/sse.js");
              const parser = new EventParser();
              const events = [];
              for (let i = 0; i < text.length; i += size) {
                events.push(...parser.feed(text.slice(i, i + size)));
              }
              return { events, lastId: parser.lastId };
            }""",
            [stream, size],
        )
        assert events == {
            "events": [
                {"type": "progress", "data": '{"id":"a","step":3,"total":256}', "id": "1"},
                {"type": "status", "data": '{"x":\n1}', "id": "2"},
                {"type": "done", "data": "{}", "id": "3"},
            ],
            "lastId": "3",
        }, size
    web.check()


def metrics(base: str) -> dict[tuple[str, str], float]:
    """/metrics as {(sample name, label text): value}."""
    status, _, content = http("GET", f"{base}/metrics")
    assert status == 200
    samples: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(content.decode()):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[(sample.name, labels)] = sample.value
    return samples


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus's histogram_quantile over (upper bound, cumulative count) pairs."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank = q * total
    lower, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return buckets[-2][0]
            return lower + (bound - lower) * (rank - lower_count) / (count - lower_count)
        lower, lower_count = bound, count
    return float("nan")


def test_the_farm_page_shows_what_metrics_says(web: WatchedPage, serve: Serve) -> None:
    page = web.page
    wait_for(
        lambda: metrics(serve.base)[("dalle_farm_jobs", "status=running")] == 0,
        JOB_TIMEOUT_S,
        "the farm to be idle",
    )
    page.goto(f"{serve.base}/#/farm")

    def shown() -> dict[str, str | None]:
        return {
            name: page.locator(f"#farm-{name}").get_attribute("data-value")
            for name in (
                "queue-depth", "workers", "models", "p50", "p90", "p99", "finished",
                *(f"jobs-{status.value}" for status in JobStatus),
            )
        }  # fmt: skip

    def expected() -> dict[str, str]:
        samples = metrics(serve.base)
        buckets = sorted(
            (float(labels.removeprefix("le=")), value)
            for (name, labels), value in samples.items()
            if name == "dalle_farm_job_duration_seconds_bucket"
        )

        def number(value: float) -> str:
            return str(int(value)) if value == int(value) else repr(value)

        values = {
            "queue-depth": number(samples[("dalle_farm_queue_depth", "")]),
            "workers": number(samples[("dalle_farm_workers_alive", "")]),
            "models": "mini",
            "finished": number(samples[("dalle_farm_job_duration_seconds_count", "")]),
        }
        for status in JobStatus:
            values[f"jobs-{status.value}"] = number(
                samples[("dalle_farm_jobs", f"status={status.value}")]
            )
        for q in (50, 90, 99):
            values[f"p{q}"] = histogram_quantile(q / 100, buckets)  # type: ignore[assignment]
        return values

    def matches() -> bool:
        page_values, wanted = shown(), expected()
        for name, value in wanted.items():
            got = page_values[name]
            if isinstance(value, float):
                if got is None or abs(float(got) - value) > 1e-9 * max(1.0, value):
                    return False
            elif got != value:
                return False
        return True

    wait_for(matches, 30, "the farm page to show /metrics' numbers", 0.5)
    assert shown()["jobs-succeeded"] not in ("0", None)  # the first test's job is counted
    page.locator("#rate-chart path.line").wait_for(state="attached")  # two scrapes: a rate
    rate: Any = page.locator("#farm-rate").get_attribute("data-value")
    assert float(rate) >= 0
    web.check()


def test_a_job_page_follows_the_event_stream(web: WatchedPage, keyed: KeyedFarm) -> None:
    """The job page reads GET /v1/jobs/{id}/events with the key, and reconnects with
    Last-Event-ID when a stream ends before "done". The stream here is played by the browser's
    request interception (the farm's own endpoint is tested with the API)."""
    page = web.page
    headers = {"Authorization": f"Bearer {keyed.secret}"}
    job = http_json("GET", f"{keyed.origin}/v1/jobs/{keyed.job_id}", headers=headers)
    running = {**job, "status": "running", "progress": {"step": 40, "total": 256}}
    done = {**job, "status": "canceled", "progress": {"step": 120, "total": 256}}
    progress = {"id": keyed.job_id, "step": 77, "total": 256}
    streams = [
        f"id: 6\nevent: status\ndata: {json.dumps(running)}\n\n"
        f": keep-alive\n\nid: 7\nevent: progress\ndata: {json.dumps(progress)}\n\n",
        f"id: 8\nevent: done\ndata: {json.dumps(done)}\n\n",
    ]
    seen: list[dict[str, str]] = []

    def stream(route: Any) -> None:
        seen.append(route.request.headers)
        body = streams[len(seen) - 1] if len(seen) <= len(streams) else ""
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)

    page.route(f"**/v1/jobs/{keyed.job_id}/events", stream)
    page.goto(f"{keyed.origin}/")
    page.locator("#key-dialog").wait_for()
    page.fill("#key-input", keyed.secret)
    page.click("#key-form button[type=submit]")
    row = page.locator(f'li.job[data-id="{keyed.job_id}"]')
    record_progress(page)
    row.locator(".prompt").click()
    page.locator("#job-progress").wait_for()
    page.locator(".job-page .status-canceled").wait_for()
    assert page.locator("#job-progress").get_attribute("aria-valuenow") == "120"
    assert [v for v in page.evaluate("window.progressValues") if v in (40, 77)] == [40, 77]
    assert len(seen) == 2, seen
    assert all(h["authorization"] == f"Bearer {keyed.secret}" for h in seen)
    assert "last-event-id" not in seen[0] and seen[1]["last-event-id"] == "7"
    web.check()
