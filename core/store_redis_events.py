"""The job event log on Redis (core/events.py says what events are).

    {p}:events:job:{id}       stream: the job's events (capped near JOB_EVENTS_MAX)
    {p}:events:owner:{owner}  stream: every event of the owner's jobs, with a `job` field
                              (capped near OWNER_EVENTS_MAX)

Both expire EVENTS_TTL_S after their last event. Entries are appended by LOG_EVENT_LUA, a Lua
function for the scripts that change a job (core/store_redis_lua.py), so an event exists
exactly when its change does; a stream entry's id is the event's cursor. For status and done
the entry's fields are the job hash's (without its checkpoint), for progress `step` and
`total`, for preview `key`.

Reads never block (XRANGE), so a stream being watched holds no Redis connection between polls.
A cursor no longer in the stream (trimmed, expired, or never given out) is a gap: the reader
answers the newest cursor and the job record, read atomically, to resynchronise from.

CREATE_JOB, TRANSITION, UPDATE, REQUEST_CANCEL and FAIL_QUEUED log through it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import redis

from core.events import EventPage, StoredEvent
from core.job import JobRecord
from core.store_redis_base import RedisBackend

JOB_EVENTS_MAX = 1000
OWNER_EVENTS_MAX = 10000
EVENTS_TTL_S = 7 * 24 * 3600
_PLAIN_FIELDS = ("id", "owner", "status")
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")

# log_event(prefix, id, owner, type, field, value, ...): append to both streams.
# log_record(prefix, job key, type): a status or done event with the job's fields.
LOG_EVENT_LUA = f"""
local function log_event(prefix, id, owner, kind, ...)
    local job = prefix .. 'events:job:' .. id
    local mine = prefix .. 'events:owner:' .. owner
    redis.call('XADD', job, 'MAXLEN', '~', {JOB_EVENTS_MAX}, '*', 'type', kind, ...)
    redis.call('XADD', mine, 'MAXLEN', '~', {OWNER_EVENTS_MAX}, '*', 'job', id, 'type', kind, ...)
    redis.call('EXPIRE', job, {EVENTS_TTL_S})
    redis.call('EXPIRE', mine, {EVENTS_TTL_S})
end
local function log_record(prefix, job, kind)
    local all = redis.call('HGETALL', job)
    local fields = {{}}
    for i = 1, #all, 2 do
        if all[i] ~= 'checkpoint' and string.sub(all[i], 1, 1) ~= '_' then
            table.insert(fields, all[i])
            table.insert(fields, all[i + 1])
        end
    end
    log_event(prefix, redis.call('HGET', job, 'id'), redis.call('HGET', job, 'owner'), kind,
              unpack(fields))
end
"""


def read_events(
    client: redis.Redis,
    prefix: str,
    *,
    job_id: str | None = None,
    owner: str | None = None,
    after: str | None = None,
    limit: int = 100,
) -> EventPage:
    """One job's (`job_id`) or one owner's events after `after` (None: from now on).
    `prefix` is the store's key prefix ("dalle-farm:")."""
    if job_id is not None:
        stream = f"{prefix}events:job:{job_id}"
    elif owner is not None:
        stream = f"{prefix}events:owner:{owner}"
    else:
        raise ValueError("read_events needs a job_id or an owner")
    start = after if after is not None and _STREAM_ID.fullmatch(after) else None
    if start is not None and start != "0-0" and not client.xrange(stream, start, start, count=1):
        start = None  # not in the stream: a gap
    if start is None:
        with client.pipeline(transaction=True) as pipe:
            pipe.xrevrange(stream, "+", "-", count=1)
            if job_id is not None:
                pipe.hgetall(f"{prefix}job:{job_id}")
            replies = pipe.execute()
        newest = _text(replies[0][0][0]) if replies[0] else "0-0"
        record = _record(replies[1]) if job_id is not None and replies[1] else None
        return EventPage([], newest, gap=after is not None, record=record)
    entries: list[Any] = client.xrange(stream, f"({start}", "+", count=limit) or []
    events = [_event(entry_id, fields, job_id) for entry_id, fields in entries]
    return EventPage(events, events[-1].cursor if events else start)


def _event(entry_id: Any, fields: Mapping[Any, Any], job_id: str | None) -> StoredEvent:
    values = {_text(name): _text(value) for name, value in fields.items()}
    kind = values.pop("type")
    job = values.pop("job", None) or job_id or ""
    data: dict[str, Any]
    if kind in ("status", "done"):
        record = _record(values)
        data = record.to_dict() if record is not None else {}
        data.pop("checkpoint", None)
        job = data.get("id", job)
    elif kind == "progress":
        data = {"step": int(values["step"]), "total": int(values["total"])}
    else:
        data = {"key": values["key"]}
    return StoredEvent(_text(entry_id), job, kind, data)


def _record(fields: Mapping[Any, Any]) -> JobRecord | None:
    values = {_text(name): _text(value) for name, value in fields.items()}
    if "id" not in values:
        return None
    return JobRecord.from_dict(
        {
            name: value if name in _PLAIN_FIELDS else json.loads(value)
            for name, value in values.items()
            if not name.startswith("_")
        }
    )


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


class RedisEventLog(RedisBackend):
    """The event half of the JobStore protocol on Redis: job_events and owner_events."""

    def job_events(self, job_id: str, after: str | None = None, limit: int = 100) -> EventPage:
        """The job's events after cursor `after`; see read_events."""
        with self._errors():
            return read_events(
                self._client, self._key_prefix, job_id=job_id, after=after, limit=limit
            )

    def owner_events(self, owner: str, after: str | None = None, limit: int = 100) -> EventPage:
        """Every event of the owner's jobs after cursor `after`; see read_events."""
        with self._errors():
            return read_events(
                self._client, self._key_prefix, owner=owner, after=after, limit=limit
            )
