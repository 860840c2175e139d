"""Live events as Server-Sent Events: GET /v1/jobs/{id}/events and GET /v1/events.

    GET /v1/jobs/{id}/events   one job: first its state now (a `status` event, or `done` if it
                               is finished), then each change, until `done`; then the stream ends
    GET /v1/events             every job of the caller, from now on, until the client leaves

Events and their data are core/events.py's. Each has an `id:`; a client that reconnects sends
the last one it saw as `Last-Event-ID` and gets what it missed, in order. If the log no longer
holds that id, a job stream starts again from the job's state now; the caller's stream goes on
from now (its missed events are gone: list the jobs to catch up).

A stream polls the store's event log every POLL_S and writes a comment every KEEP_ALIVE_S
when nothing happens, so proxies keep the connection open and a client that left is noticed
(its next write fails). Ownership is checked before the stream starts: another key's job is
404, as for GET /v1/jobs/{id}.

Streams are long requests. The API's server (api/server.py) runs them on threads of their
own, apart from the threads that answer every other request, so open streams never delay a
submit. At most DALLE_FARM_MAX_EVENT_STREAMS are open per API process; one more is answered
429 with Retry-After. When the server stops, every stream ends at once (the client
reconnects to another process with Last-Event-ID).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from http import HTTPStatus
from typing import Any

from flask import Blueprint, Response, request

from api import operations
from api.auth import current_owner
from api.limits import RequestLimiter, v1_blueprint
from api.openapi import add_route
from api.problems import Problem
from api.routes import owned_job
from api.services import Services
from core.events import (
    DONE,
    KEEP_ALIVE,
    KEEP_ALIVE_S,
    PREVIEW,
    PROGRESS,
    Event,
    EventPage,
    StoredEvent,
    encode_event,
    encode_retry,
    event_type_of_status,
    is_cursor,
    preview_frame,
)
from core.job import FieldError, JobRecord
from core.job_json import job_json
from core.settings import Settings
from core.storage import Storage
from core.store import StoreUnavailable

log = logging.getLogger(__name__)

# How often an open stream reads the store's log for new events.
POLL_S = 0.3
# Events read from the log at a time.
PAGE_EVENTS = 100
# What a 429 suggests a client wait before opening another stream.
STREAMS_RETRY_AFTER_S = 5
# The WSGI environ key under which api/server.py puts its stop Event (streams end when set).
STOP_ENVIRON_KEY = "dalle_farm.stop"
# The paths of the event streams, for the server to run them on their own threads.
_STREAM_PATH = re.compile(r"/v1/(?:jobs/[^/]+/)?events")


def is_event_stream(method: str, path: str) -> bool:
    """Whether a request is for an event stream (a long request)."""
    return method == "GET" and _STREAM_PATH.fullmatch(path) is not None


class StreamSlots:
    """How many event streams may be open at once in this process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def take(self) -> bool:
        return self._free.acquire(blocking=False)

    def give(self) -> None:
        self._free.release()


def create_blueprint(
    settings: Settings,
    services: Services,
    anonymous_owner: str | None,
    limiter: RequestLimiter,
) -> Blueprint:
    """The event stream routes under /v1, with the same auth as the other /v1 routes."""
    blueprint = v1_blueprint("v1_events", settings, services.store, anonymous_owner, limiter)
    views = EventViews(services, StreamSlots(settings.max_event_streams))
    add_route(blueprint, "/jobs/<job_id>/events", "GET", views.job_events, operations.JOB_EVENTS)
    add_route(blueprint, "/events", "GET", views.owner_events, operations.OWNER_EVENTS)
    return blueprint


class EventViews:
    def __init__(self, services: Services, slots: StreamSlots) -> None:
        self.store = services.store
        self.storage = services.storage
        self.slots = slots

    def job_events(self, job_id: str) -> Response:
        """GET /v1/jobs/{id}/events."""
        owned_job(self.store, job_id)
        after = _last_event_id()
        return self._stream(
            lambda cursor: self.store.job_events(job_id, cursor, PAGE_EVENTS), after, job=True
        )

    def owner_events(self) -> Response:
        """GET /v1/events."""
        owner = current_owner()
        after = _last_event_id()
        return self._stream(
            lambda cursor: self.store.owner_events(owner, cursor, PAGE_EVENTS), after, job=False
        )

    def _stream(
        self, read: Callable[[str | None], EventPage], after: str | None, *, job: bool
    ) -> Response:
        if not self.slots.take():
            raise Problem(
                HTTPStatus.TOO_MANY_REQUESTS,
                f"this API process has {self.slots.limit} event streams open, its limit "
                f"(DALLE_FARM_MAX_EVENT_STREAMS); retry in {STREAMS_RETRY_AFTER_S} s, close "
                "streams you no longer read, or poll GET /v1/jobs/{id}",
                slug="too-many-streams",
                headers={"Retry-After": str(STREAMS_RETRY_AFTER_S)},
            )
        try:
            first = read(after)  # a store that is down answers 503 here, before the stream
        except BaseException:
            self.slots.give()
            raise
        stop = request.environ.get(STOP_ENVIRON_KEY)
        stop = stop if isinstance(stop, threading.Event) else None
        frames = _Frames(self.storage, read, stop, job=job)
        response = Response(frames.run(first, fresh=after is None), mimetype="text/event-stream")
        response.call_on_close(self.slots.give)
        response.headers["Cache-Control"] = "no-cache"
        response.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
        return response


class _Frames:
    """The bytes of one stream: its events as the log holds them, polled until it ends (a
    job's stream after `done`; any stream when the server stops or the store is down)."""

    def __init__(
        self,
        storage: Storage,
        read: Callable[[str | None], EventPage],
        stop: threading.Event | None,
        *,
        job: bool,
    ) -> None:
        self.storage = storage
        self.read = read
        self.stop = stop if stop is not None else threading.Event()
        self.ends_on_done = job

    def run(self, page: EventPage, fresh: bool) -> Iterator[bytes]:
        """`page`: the first read, after the client's Last-Event-ID (`fresh`: it sent none)."""
        yield encode_retry()
        quiet_s = 0.0
        while True:
            if page.gap or (fresh and not page.events):
                # Where we start (no Last-Event-ID) or lost our place: the job's state now, or
                # for the caller's stream just the cursor to go on from.
                fresh = False
                yield self._resync(page)
                if page.record is not None and page.record.status.is_terminal:
                    return
            for stored in page.events:
                yield encode_event(self.wire(stored))
                if stored.type == DONE and self.ends_on_done:
                    return
            if page.events:
                quiet_s = 0.0
            elif self.stop.wait(POLL_S):
                return
            else:
                quiet_s += POLL_S
                if quiet_s >= KEEP_ALIVE_S:
                    quiet_s = 0.0
                    yield KEEP_ALIVE
            if self.stop.is_set():
                return
            try:
                page = self.read(page.cursor)
            except StoreUnavailable as error:
                # End the stream; the client reconnects with its Last-Event-ID.
                log.warning("an event stream ends: the store is unavailable: %s", error)
                return

    def _resync(self, page: EventPage) -> bytes:
        record = page.record
        if record is None:
            # An id alone: no event is dispatched, but the client's Last-Event-ID moves here.
            return f"id: {page.cursor}\n\n".encode("ascii")
        event = Event(page.cursor, event_type_of_status(record.status.value), self.job(record))
        return encode_event(event)

    def wire(self, stored: StoredEvent) -> Event:
        """An event as the log holds it → as clients get it."""
        if stored.type == PROGRESS:
            data: dict[str, Any] = {"id": stored.job_id, **stored.data}
        elif stored.type == PREVIEW:
            key = str(stored.data.get("key", ""))
            frame = preview_frame(key)
            data = {"id": stored.job_id, "frame": frame, "key": key, "url": self.storage.url(key)}
        else:
            data = self.job(JobRecord.from_dict(stored.data))
        return Event(stored.cursor, stored.type, data)

    def job(self, record: JobRecord) -> dict[str, Any]:
        return job_json(record, self.storage)


def _last_event_id() -> str | None:
    value = request.headers.get("Last-Event-ID")
    if value is None or value == "":
        return None
    if not is_cursor(value):
        message = (
            "Last-Event-ID must be the id of an event this stream sent (printable ASCII, at "
            "most 64 characters); reconnect without it to start from now"
        )
        raise Problem(
            HTTPStatus.BAD_REQUEST,
            message,
            slug="invalid-request",
            errors=[FieldError("Last-Event-ID", message)],
        )
    return value
