"""FarmClient: the farm's REST API from Python (submit, get, wait, watch, cancel, list,
download).

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

`watch` reads a job's live events (GET /v1/jobs/{id}/events, Server-Sent Events), resuming a
broken connection with Last-Event-ID; `wait` follows that stream rather than polling.

A FarmClient may be shared by threads: each thread gets its own HTTP session.
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from pydantic import ValidationError

from client.answers import is_retryable, job_of, json_of, not_the_contract, parse_retry_after
from client.errors import (
    FarmError,
    JobFailed,
    NoEventStream,
    NotFound,
    Problem,
    RequestTimeout,
    TransportError,
    WaitTimeout,
    api_error,
)
from client.jobs import FileRef, Job
from core.events import DONE, STATUS, Event, parse_stream

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
        return job_of(response)

    def get(self, job_id: str) -> Job:
        """The job as it is now."""
        return job_of(self._request("GET", f"/v1/jobs/{job_id}"))

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
        """Wait until the job is finished, and return it. Raises JobFailed if it failed or was
        canceled (unless `raise_on_failure` is false), WaitTimeout after `timeout_s`. When
        `stop` is set, returns the job unfinished.

        It follows the job's event stream (`watch`), so it learns of the end at once and
        costs the server one open connection, not a request per poll. It polls instead when
        `stop` is given (a stream can only notice it between events), or when the server has
        no stream for it (an older farm, its stream limit reached, a broken connection)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        job = None if stop is not None else self._wait_for_done(job_id, deadline, timeout_s or 0)
        interval = poll_interval_s
        while job is None or not job.is_finished:
            if job is not None and deadline is not None and time.monotonic() >= deadline:
                assert timeout_s is not None
                raise WaitTimeout(job, timeout_s)
            if job is not None:
                pause = interval if deadline is None else min(interval, deadline - time.monotonic())
                if stop is not None:
                    if stop.wait(max(pause, 0.0)):
                        return job
                else:
                    self._sleep(max(pause, 0.0))
                interval = min(interval * 1.5, max_poll_interval_s)
            job = self.get(job_id)
        if raise_on_failure and job.status != "succeeded":
            raise JobFailed(job)
        return job

    def watch(self, job_id: str, *, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's live events (core.events.Event: cursor, type, data), from its state now
        (or after `last_event_id`) to `done`: status and done carry the job's JSON, progress
        {id, step, total}, preview {id, frame, key, url}. A broken connection is resumed with
        Last-Event-ID, without loss, up to max_retries times in a row."""
        cursor = last_event_id
        failures = 0
        while True:
            try:
                for event in self._events(job_id, cursor):
                    failures = 0
                    cursor = event.cursor or cursor
                    yield event
                    if event.type == DONE:
                        return
            except requests.RequestException as error:
                if failures >= self.max_retries:
                    raise TransportError(f"GET /v1/jobs/{job_id}/events: {error}") from None
                self._sleep(self.retry_delay(failures, None))
                failures += 1
            # A stream that ended before `done` (the server stopping): reconnect.

    def _events(
        self, job_id: str, cursor: str | None, *, retries: int | None = None, read_s: float = 0
    ) -> Iterator[Event]:
        """The events of one connection to the job's stream, after `cursor`."""
        headers = {"Accept": "text/event-stream"}
        if cursor:
            headers["Last-Event-ID"] = cursor
        path = f"/v1/jobs/{job_id}/events"
        response = self._request(
            "GET", path, headers=headers, stream=True, retries=retries, read_timeout_s=read_s
        )
        with response:
            if not response.headers.get("Content-Type", "").startswith("text/event-stream"):
                raise NoEventStream(f"GET {path}: the server sent no event stream")
            lines = (line.decode("utf-8", "replace") for line in response.iter_lines())
            yield from parse_stream(lines)

    def _wait_for_done(self, job_id: str, deadline: float | None, timeout_s: float) -> Job | None:
        """The job once its stream says it is done; WaitTimeout at `deadline`; None when the
        stream cannot be had or gives nothing (the caller polls)."""
        job: Job | None = None
        cursor = None
        while True:
            read_s = self.timeout_s
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 and job is not None:
                    raise WaitTimeout(job, timeout_s)
                read_s = min(max(remaining, 0.1), self.timeout_s)
            got = False
            try:
                for event in self._events(job_id, cursor, retries=0, read_s=read_s):
                    got = True
                    cursor = event.cursor or cursor
                    if event.type in (STATUS, DONE):
                        job = Job.from_json(event.data)
                    if event.type == DONE:
                        return job
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            except NotFound:
                self.get(job_id)  # NotFound again if there really is no such job
                return None
            except (requests.ConnectionError, requests.Timeout):
                # A read timeout (the deadline, or a silent server) or a broken connection:
                # go on from the cursor if this connection gave anything.
                if deadline is not None and time.monotonic() >= deadline and job is not None:
                    raise WaitTimeout(job, timeout_s) from None
            except (FarmError, requests.RequestException, ValidationError):
                return None
            if not got or job is None:
                return None

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job (Conflict if it already succeeded or failed)."""
        return job_of(self._request("DELETE", f"/v1/jobs/{job_id}"))

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
        page = json_of(response)
        jobs = page.get("jobs") if isinstance(page, dict) else None
        if not isinstance(jobs, list):
            raise not_the_contract(response, "it has no list of jobs")
        return [job_of(response, job) for job in jobs], page.get("next_cursor")

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
        stream: bool = False,
        retries: int | None = None,
        read_timeout_s: float | None = None,
    ) -> requests.Response:
        """One call, retried as the module docstring says (at most `retries` times, default
        max_retries). `stream`: return once the headers are in; the body is read later."""
        url, own = self._url(path_or_url)
        retries = self.max_retries if retries is None else retries
        timeout = (self.timeout_s, read_timeout_s or self.timeout_s)
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
                    timeout=timeout,
                    stream=stream,
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
            if attempt >= retries:
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
