"""FarmClient: the farm's REST API from Python (submit, get, wait, cancel, list, download).

    with FarmClient("http://farm:8000", api_key="…") as farm:
        job = farm.submit("a painting of a fox", seed=7, grid_size=2)
        job = farm.wait(job.id)
        png = farm.download(job.images[0])

Every request has a timeout. Answers 408, 429 and 5xx, refused or cut connections and timeouts
are retried with exponential backoff and jitter, up to `max_retries` times, waiting what a
Retry-After header asks for when there is one. That is safe for every call: reads and cancel
are idempotent, and each submit carries an Idempotency-Key (a new UUID unless the caller gives
one), the same on every retry, so a POST whose answer was lost never creates a second job.
Errors are typed (client.errors) and carry the server's problem detail.

A FarmClient may be shared by threads: each thread gets its own HTTP session.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from pydantic import ValidationError

from client.errors import (
    FarmError,
    JobFailed,
    Problem,
    RequestTimeout,
    TransportError,
    WaitTimeout,
    api_error,
)
from client.jobs import FileRef, Job

__all__ = ["API_KEY_ENV", "SERVER_ENV", "FarmClient", "FileRef", "Job", "JobPage"]

SERVER_ENV = "DALLE_FARM_SERVER"
API_KEY_ENV = "DALLE_FARM_API_KEY"
DEFAULT_SERVER = "http://127.0.0.1:8000"
USER_AGENT = "dalle-farm-client/0.1"


JobPage = tuple[list[Job], str | None]


class FarmClient:
    """A client of one farm's REST API.

    `server` defaults to $DALLE_FARM_SERVER, else http://127.0.0.1:8000; `api_key` to
    $DALLE_FARM_API_KEY (none is needed by `dalle-farm serve` on loopback). `timeout_s` bounds
    each request's connect and each read; `max_retries` is the number of retries after the
    first try; backoff waits `backoff_s`·2ⁿ (at most `max_backoff_s`, with jitter), or the
    server's Retry-After (at most `max_retry_after_s`).
    """

    def __init__(
        self,
        server: str | None = None,
        api_key: str | None = None,
        *,
        timeout_s: float = 30.0,
        max_retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        max_retry_after_s: float = 300.0,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        server = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
        parts = urlsplit(server)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the server must be an http:// or https:// URL, got {server!r}")
        if max_retries < 0 or timeout_s <= 0:
            raise ValueError("max_retries must be >= 0 and timeout_s > 0")
        self.server = server.rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get(API_KEY_ENV) or None
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_retry_after_s = max_retry_after_s
        self._sleep = sleep
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._sessions_lock = threading.Lock()

    # -- the API ------------------------------------------------------------------------------

    def submit(self, text: str, *, idempotency_key: str | None = None, **settings: Any) -> Job:
        """Submit a job: `text` and any of seed, grid_size, is_seamless, temperature, top_k,
        supercondition_factor, model, progressive_outputs. With the `idempotency_key` of an
        earlier submit and the same settings, the server answers that earlier job."""
        key = idempotency_key or str(uuid.uuid4())
        response = self._request(
            "POST", "/v1/jobs", json={"text": text, **settings}, headers={"Idempotency-Key": key}
        )
        return _job(response)

    def get(self, job_id: str) -> Job:
        """The job as it is now."""
        return _job(self._request("GET", f"/v1/jobs/{job_id}"))

    def wait(
        self,
        job_id: str,
        *,
        timeout_s: float | None = None,
        poll_interval_s: float = 0.25,
        max_poll_interval_s: float = 2.0,
        raise_on_failure: bool = True,
        stop: threading.Event | None = None,
    ) -> Job:
        """Poll until the job is finished, and return it. Raises JobFailed if it failed or was
        canceled (unless `raise_on_failure` is false), WaitTimeout after `timeout_s`. When
        `stop` is set, returns the job unfinished at once."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        interval = poll_interval_s
        while True:
            job = self.get(job_id)
            if job.is_finished:
                if raise_on_failure and job.status != "succeeded":
                    raise JobFailed(job)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                assert timeout_s is not None
                raise WaitTimeout(job, timeout_s)
            pause = interval if deadline is None else min(interval, deadline - time.monotonic())
            if stop is not None:
                if stop.wait(max(pause, 0.0)):
                    return job
            else:
                self._sleep(max(pause, 0.0))
            interval = min(interval * 1.5, max_poll_interval_s)

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (Conflict if it already succeeded or failed)."""
        return _job(self._request("DELETE", f"/v1/jobs/{job_id}"))

    def list_page(
        self, *, status: str | None = None, cursor: str | None = None, limit: int = 50
    ) -> JobPage:
        """One page of this key's jobs, newest first, and the cursor of the next (or None)."""
        query: dict[str, str] = {"limit": str(limit)}
        if status is not None:
            query["status"] = status
        if cursor is not None:
            query["cursor"] = cursor
        response = self._request("GET", "/v1/jobs", params=query)
        page = _json(response)
        jobs = page.get("jobs") if isinstance(page, dict) else None
        if not isinstance(jobs, list):
            raise _not_the_contract(response, "it has no list of jobs")
        return [_job(response, job) for job in jobs], page.get("next_cursor")

    def list(self, *, status: str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job of this key (with `status`, if given), newest first, page by page."""
        cursor: str | None = None
        while True:
            jobs, cursor = self.list_page(status=status, cursor=cursor, limit=page_size)
            yield from jobs
            if cursor is None:
                return

    def download(self, file: FileRef | str, path: str | Path | None = None) -> bytes:
        """The bytes of a result file (a FileRef of a job, or its URL); also written to
        `path`, whole or not at all, when given. The API key goes only to the API's own host,
        never to a presigned S3 URL."""
        url = file.url if isinstance(file, FileRef) else file
        data = self._request("GET", url).content
        if path is not None:
            target = Path(path)
            partial = target.with_name(f".{target.name}.part-{os.getpid()}")
            partial.write_bytes(data)
            partial.replace(target)
        return data

    # -- plumbing -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close every thread's connections."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def __enter__(self) -> FarmClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = USER_AGENT
            self._local.session = session
            with self._sessions_lock:
                self._sessions.append(session)
        return session

    def _url(self, path_or_url: str) -> tuple[str, bool]:
        """The absolute URL, and whether it is the API's own (so it may carry the key)."""
        url = urljoin(self.server + "/", path_or_url)
        own, target = urlsplit(self.server), urlsplit(url)
        return url, (own.scheme, own.netloc) == (target.scheme, target.netloc)

    def _request(
        self,
        method: str,
        path_or_url: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        url, own = self._url(path_or_url)
        sent_headers = {"Accept": "application/json, application/problem+json, */*"}
        sent_headers.update(headers or {})
        if own and self.api_key:
            sent_headers["Authorization"] = f"Bearer {self.api_key}"
        shown = url.split("?", 1)[0]  # presigned URLs carry signatures in the query
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                response = self._session().request(
                    method,
                    url,
                    json=json,
                    params=params,
                    headers=sent_headers,
                    timeout=self.timeout_s,
                )
            except requests.Timeout as error:
                failure: FarmError = RequestTimeout(
                    f"{method} {shown}: no answer within {self.timeout_s:g} s ({error})"
                )
            except requests.RequestException as error:
                failure = TransportError(f"{method} {shown}: {error}")
            else:
                if response.status_code < 400:
                    return response
                problem = Problem.from_response(
                    response.status_code,
                    response.reason or "error",
                    response.headers.get("Content-Type", ""),
                    response.content,
                )
                failure = api_error(method, shown, problem)
                if not is_retryable(response.status_code):
                    raise failure
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
            if attempt >= self.max_retries:
                raise failure
            self._sleep(self.retry_delay(attempt, retry_after))
            attempt += 1

    def retry_delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number `attempt` + 1 (from 0): the server's
        Retry-After if it sent one, else exponential backoff with jitter."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after_s)
        ceiling = min(self.backoff_s * 2**attempt, self.max_backoff_s)
        return random.uniform(ceiling / 2, ceiling)


def is_retryable(status: int) -> bool:
    """408 (the request did not arrive whole in time), 429 (too many requests) and 5xx are worth
    retrying; other errors would fail again."""
    return status in (408, 429) or status >= 500


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delay-seconds or an HTTP date; None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _job(response: requests.Response, body: Any = None) -> Job:
    """The job in `response` (or `body`, one job of its page), checked against the contract."""
    body = _json(response) if body is None else body
    if not isinstance(body, dict):
        raise _not_the_contract(response, "it is not a JSON object")
    try:
        return Job.from_json(body)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, detail['loc'])) or 'the job'}: {detail['msg']}"
            for detail in error.errors(include_url=False)[:3]
        )
        raise _not_the_contract(response, problems) from None


def _not_the_contract(response: requests.Response, why: str) -> FarmError:
    return FarmError(
        f"{response.request.method} {response.url.split('?', 1)[0]}: the answer is not a job "
        f"of this client's API contract ({why}); is the server a farm of the same version?"
    )


def _json(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise FarmError(
            f"{response.request.method} {response.url.split('?', 1)[0]}: the answer "
            f"({response.status_code}, {response.headers.get('Content-Type')}) is not JSON; "
            "is the server URL the farm's API?"
        ) from None
