"""Live job events: what the stores log and how the API sends them as Server-Sent Events.

A job's life is a log of events, appended by the store in the same atomic step as the change
they describe (so a watcher that reconnects with the last id it saw loses nothing):

    status    the job was created, or moved to queued or running (or a cancel was asked of a
              running job); data: the job's JSON as GET /v1/jobs/{id} answers it
    progress  the decoder advanced; data: {"id", "step", "total"}
    preview   a progressive preview was stored; data: {"id", "frame", "key", "url"}
    done      the job succeeded, failed or was canceled; data: the final job JSON

On the wire (text/event-stream) each event is

    id: <cursor>          opaque, increasing within one stream
    event: <type>
    data: <one line of JSON>
    <blank line>

`encode_event` writes that, `parse_stream` reads it back (the Python client uses it).
This module is pure: no store, no Flask, no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from core.job import JobRecord

STATUS = "status"
PROGRESS = "progress"
PREVIEW = "preview"
DONE = "done"
EVENT_TYPES = (STATUS, PROGRESS, PREVIEW, DONE)

# A comment line: ignored by every SSE reader, it keeps proxies from closing an idle stream.
KEEP_ALIVE = b": keep-alive\n\n"
KEEP_ALIVE_S = 5.0
# What the server suggests a client wait before reconnecting (`retry:`), in milliseconds.
RETRY_MS = 2000
# Cursors are ids the server gave out: short printable ASCII. Anything else is not one.
MAX_CURSOR_CHARS = 64
_CURSOR = re.compile(r"[\x21-\x7e]{1," + str(MAX_CURSOR_CHARS) + "}")
_PREVIEW_FRAME = re.compile(r"/previews/([0-9]+)\.png$")


@dataclass(frozen=True)
class Event:
    """One event as sent: its cursor (the SSE id), type and JSON data."""

    cursor: str
    type: str
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StoredEvent:
    """An event as logged. For status and done, `data` is the job record (as
    JobRecord.to_dict, without its checkpoint); for progress {"step", "total"}; for preview
    {"key"}."""

    cursor: str
    job_id: str
    type: str
    data: dict[str, Any]


@dataclass(frozen=True)
class EventPage:
    """Events after a cursor, oldest first, and the cursor to read on from. `gap`: the cursor
    asked for is not in the log (pruned, or never given out); `events` is then empty, `cursor`
    the newest, and `record` (job streams only) the job as it is at that cursor."""

    events: list[StoredEvent] = field(default_factory=list)
    cursor: str = "0"
    gap: bool = False
    record: JobRecord | None = None


def is_cursor(value: object) -> bool:
    """Whether `value` could be a cursor this server gave out (a Last-Event-ID worth trying)."""
    return isinstance(value, str) and _CURSOR.fullmatch(value) is not None


def preview_frame(key: str) -> int | None:
    """The frame number of a preview's storage key (jobs/{id}/previews/{k}.png), or None."""
    match = _PREVIEW_FRAME.search(key)
    return None if match is None else int(match.group(1))


def event_type_of_status(status: str) -> str:
    """`done` for a final status (succeeded, failed, canceled), else `status`."""
    return DONE if status in ("succeeded", "failed", "canceled") else STATUS


def encode_event(event: Event) -> bytes:
    """The event as text/event-stream bytes. The data is one line of ASCII JSON (non-ASCII
    escaped), so no line break or odd code point can split or break the frame."""
    if event.type not in EVENT_TYPES:
        raise ValueError(f"unknown event type {event.type!r}; known: {', '.join(EVENT_TYPES)}")
    if not is_cursor(event.cursor):
        raise ValueError(f"an event id must be 1-{MAX_CURSOR_CHARS} printable ASCII characters")
    data = json.dumps(event.data, separators=(",", ":"))
    return f"id: {event.cursor}\nevent: {event.type}\ndata: {data}\n\n".encode("ascii")


def encode_retry(retry_ms: int = RETRY_MS) -> bytes:
    """The `retry:` field that suggests a reconnect delay, sent once at a stream's start."""
    return f"retry: {int(retry_ms)}\n\n".encode("ascii")


def parse_stream(lines: Iterable[str]) -> Iterator[Event]:
    """The events of a text/event-stream, as the SSE specification reads it: fields up to a
    blank line make one event; comments (lines starting with ':') and `retry:` are skipped;
    an event without data, or whose data is not a JSON object, is skipped too."""
    cursor = ""
    kind = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                try:
                    body = json.loads("\n".join(data))
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    yield Event(cursor, kind, body)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "id" and "\0" not in value:
            cursor = value
        elif name == "event":
            kind = value
        elif name == "data":
            data.append(value)
