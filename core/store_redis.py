"""The JobStore of the distributed farm, on Redis (DALLE_FARM_REDIS_URL).

Every read-modify-write is one Lua script, so it is atomic however many API processes and
workers share the Redis: create_job with its Idempotency-Key, transition (the compare-and-set of
core.job.can_move, whose table is written into the script once, at import), request_cancel,
update, lease renewal and release, key revocation.

Keys, under a prefix (default "dalle-farm"):
    {p}:job:{id}                         hash: the JobRecord; id, owner and status as plain
                                         strings, every other field as JSON
    {p}:jobs-by-owner:{owner}            sorted set of the owner's job ids, all with score 0
    {p}:jobs-by-status:{status}:{owner}  the same, one per status
    {p}:status-counts                    hash status → number of jobs
    {p}:idempotency:{owner}:{key sha256} hash: job_id, fingerprint
    {p}:key:{id}, {p}:keys               hash per API key (name, secret_hash, created_at,
                                         revoked); list of key ids in creation order
    {p}:lease:{job id}                   the worker holding the lease; expires by itself (PX)
    {p}:metrics                          hash: duration buckets, sum and count, images
    {p}:workers                          sorted set worker → last heartbeat (Redis' clock)

Listing: job ids sort by creation time and all members of an index share score 0, so
ZREVRANGEBYLEX gives a page newest first from the cursor in O(log N + page). A status filter
reads that status's own index, kept in step by the scripts that change a job's status, so it
costs the same as no filter (never a scan over the owner's other jobs). The status counts for
/metrics are a hash that the same scripts update: O(1).

Scripts build some key names from the prefix, so this needs one Redis (or a primary with
replicas), not Redis Cluster.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from core.job import JobRecord, JobStatus, can_move, utc_now
from core.store import (
    DURATION_BUCKETS_S,
    HEARTBEAT_RETENTION_S,
    IDEMPOTENCY_CONFLICT,
    WORKER_ALIVE_S,
    ApiKey,
    IdempotencyConflict,
    JobNotFound,
    MetricsSnapshot,
    StoreUnavailable,
    check_job_fields,
    check_key_name,
    check_limit,
    check_observation,
    check_ttl,
    cumulative_buckets,
    duration_bucket,
    hash_idempotency_key,
    hash_secret,
    key_id_from_secret,
    new_key_secret,
)

CONNECT_TIMEOUT_S = 5.0
SOCKET_TIMEOUT_S = 10.0
HEALTH_CHECK_INTERVAL_S = 15
# Errors Redis answers when it is up but cannot serve: loading, read-only replica, out of memory.
_OUTAGE_REPLIES = ("LOADING", "READONLY", "MASTERDOWN", "MISCONF", "OOM", "NOREPLICAS")
# Fields stored as plain strings (scripts read them); the rest are JSON.
_PLAIN_FIELDS = ("id", "owner", "status")

_ALLOWED_MOVES = ", ".join(
    f'["{a.value}>{b.value}"] = true' for a in JobStatus for b in JobStatus if can_move(a, b)
)
# move(job key, counts key, index prefix, to, fields...): set status and fields, and keep the
# per-status index and the counts in step. The caller checked that the move is allowed.
_MOVE = """
local function move(job, counts, index, to, ...)
    local from = redis.call('HGET', job, 'status')
    local id = redis.call('HGET', job, 'id')
    local owner = redis.call('HGET', job, 'owner')
    redis.call('HSET', job, 'status', to, ...)
    redis.call('ZREM', index .. from .. ':' .. owner, id)
    redis.call('ZADD', index .. to .. ':' .. owner, 0, id)
    redis.call('HINCRBY', counts, from, -1)
    redis.call('HINCRBY', counts, to, 1)
end
"""

# KEYS: job, owner index, owner's status index, counts, idempotency (or the job key again)
# ARGV: id, status, has idempotency key (1/0), fingerprint, field, value, ...
_CREATE_JOB = """
if ARGV[3] == '1' then
    local found = redis.call('HMGET', KEYS[5], 'job_id', 'fingerprint')
    if found[1] then
        if found[2] ~= ARGV[4] then return {'conflict'} end
        return {'existing', found[1]}
    end
end
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('ZADD', KEYS[2], 0, ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[1])
redis.call('HINCRBY', KEYS[4], ARGV[2], 1)
if ARGV[3] == '1' then
    redis.call('HSET', KEYS[5], 'job_id', ARGV[1], 'fingerprint', ARGV[4])
end
return {'created'}
"""

# KEYS: job, counts. ARGV: index prefix, to, field, value, ...
_TRANSITION = (
    f"local ALLOWED = {{{_ALLOWED_MOVES}}}\n"
    + _MOVE
    + """
local from = redis.call('HGET', KEYS[1], 'status')
if not from then return {'missing'} end
if not ALLOWED[from .. '>' .. ARGV[2]] then return {'refused'} end
move(KEYS[1], KEYS[2], ARGV[1], ARGV[2], unpack(ARGV, 3))
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: job, counts. ARGV: index prefix, finished_at (JSON).
_REQUEST_CANCEL = (
    _MOVE
    + """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'missing'} end
if status == 'queued' then
    move(KEYS[1], KEYS[2], ARGV[1], 'canceled', 'finished_at', ARGV[2])
elseif status == 'running' then
    redis.call('HSET', KEYS[1], 'cancel_requested', 'true')
end
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: job. ARGV: field, value, ...
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'missing'} end
redis.call('HSET', KEYS[1], unpack(ARGV))
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""

# KEYS: lease. ARGV: worker, ttl in ms.
_RENEW_LEASE = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: lease. ARGV: worker.
_RELEASE_LEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: key id list. ARGV: key hash prefix, id or name. Returns how many keys matched.
_REVOKE_KEY = """
local matched = 0
for _, id in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    local key = ARGV[1] .. id
    if id == ARGV[2] or redis.call('HGET', key, 'name') == ARGV[2] then
        redis.call('HSET', key, 'revoked', '1')
        matched = matched + 1
    end
end
return matched
"""

# Heartbeats use Redis' clock, so workers on machines whose clocks disagree still compare.
_NOW = """
local time = redis.call('TIME')
local now = tonumber(time[1]) + tonumber(time[2]) / 1000000
"""
# KEYS: workers. ARGV: worker, retention in s.
_HEARTBEAT = (
    _NOW
    + """
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return 0
"""
)
# KEYS: workers. ARGV: alive window in s.
_WORKERS_ALIVE = _NOW + "return redis.call('ZCOUNT', KEYS[1], now - tonumber(ARGV[1]), '+inf')\n"


class RedisJobStore:
    """The JobStore (core/store.py) on Redis.

    `url_or_client`: a redis:// URL (the store opens and closes its own connections) or a
    redis.Redis the caller owns. `worker_alive_s`: how recent a heartbeat must be for metrics()
    to count the worker alive.
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        prefix: str = "dalle-farm",
        *,
        worker_alive_s: float = WORKER_ALIVE_S,
    ) -> None:
        if isinstance(url_or_client, str):
            self.url = redact_url(url_or_client)
            self._client: redis.Redis = redis.Redis.from_url(
                url_or_client,
                decode_responses=True,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                socket_timeout=SOCKET_TIMEOUT_S,
                health_check_interval=HEALTH_CHECK_INTERVAL_S,
                # Retry only failures to reach Redis, not timeouts, after which a script may
                # have run: run twice, a compare-and-set would report its own success as refused.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2, (redis.ConnectionError,)),
            )
            self._owns_client = True
        else:
            self.url = _client_url(url_or_client)
            self._client = url_or_client
            self._owns_client = False
        self._prefix = prefix
        self._worker_alive_s = worker_alive_s
        register = self._client.register_script
        self._create_job = register(_CREATE_JOB)
        self._transition = register(_TRANSITION)
        self._request_cancel = register(_REQUEST_CANCEL)
        self._update = register(_UPDATE)
        self._renew_lease = register(_RENEW_LEASE)
        self._release_lease = register(_RELEASE_LEASE)
        self._revoke_key = register(_REVOKE_KEY)
        self._heartbeat = register(_HEARTBEAT)
        self._workers_alive = register(_WORKERS_ALIVE)

    # -- key names ---------------------------------------------------------------------------
    def _key(self, *parts: str) -> str:
        return ":".join((self._prefix, *parts))

    @property
    def _status_index_prefix(self) -> str:
        return self._key("jobs-by-status", "")

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as err:
            raise StoreUnavailable(
                f"Redis at {self.url} cannot be reached ({err}); check that it is running and "
                "that DALLE_FARM_REDIS_URL points to it"
            ) from err
        except redis.ResponseError as err:
            if str(err).startswith(_OUTAGE_REPLIES):
                raise StoreUnavailable(f"Redis at {self.url} cannot serve requests: {err}") from err
            raise

    # -- API keys ----------------------------------------------------------------------------
    def create_key(self, name: str) -> tuple[ApiKey, str]:
        """A new key named `name` and its secret, which is shown only this once."""
        key_id, secret = new_key_secret()
        key = ApiKey(id=key_id, name=check_key_name(name), created_at=utc_now())
        with self._errors(), self._client.pipeline() as pipe:
            pipe.hset(
                self._key("key", key.id),
                mapping={
                    "name": key.name,
                    "secret_hash": hash_secret(secret),
                    "created_at": key.created_at,
                    "revoked": "0",
                },
            )
            pipe.rpush(self._key("keys"), key.id)
            pipe.execute()
        return key, secret

    def list_keys(self) -> list[ApiKey]:
        with self._errors():
            key_ids = [_text(key_id) for key_id in self._client.lrange(self._key("keys"), 0, -1)]
            with self._client.pipeline(transaction=False) as pipe:
                for key_id in key_ids:
                    pipe.hmget(self._key("key", key_id), ["name", "created_at", "revoked"])
                rows = pipe.execute()
        return [
            ApiKey(id=key_id, name=_text(name), created_at=_text(at), revoked=_text(r) == "1")
            for key_id, (name, at, r) in zip(key_ids, rows, strict=True)
            if name is not None
        ]

    def revoke_key(self, id_or_name: str) -> bool:
        """Revoke the key with this id, or every key with this name; False if none matches."""
        with self._errors():
            matched = self._revoke_key(
                keys=[self._key("keys")], args=[self._key("key", ""), id_or_name]
            )
        return int(matched) > 0

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, unless unknown or revoked."""
        key_id = key_id_from_secret(secret)
        if key_id is None:
            return None
        with self._errors():
            name, created_at, revoked, secret_hash = self._client.hmget(
                self._key("key", key_id), ["name", "created_at", "revoked", "secret_hash"]
            )
        if secret_hash is None or not hmac.compare_digest(_text(secret_hash), hash_secret(secret)):
            return None
        if _text(revoked) == "1":
            return None
        return ApiKey(id=key_id, name=_text(name), created_at=_text(created_at))

    # -- jobs --------------------------------------------------------------------------------
    def create_job(
        self, record: JobRecord, idempotency_key: str | None = None, fingerprint: str | None = None
    ) -> tuple[JobRecord, bool]:
        """Store a new job; with an Idempotency-Key, see JobStore.create_job."""
        job_key = self._key("job", record.id)
        idempotency = (
            self._key("idempotency", record.owner, hash_idempotency_key(idempotency_key))
            if idempotency_key is not None
            else job_key
        )
        keys = [
            job_key,
            self._key("jobs-by-owner", record.owner),
            self._key("jobs-by-status", record.status.value, record.owner),
            self._key("status-counts"),
            idempotency,
        ]
        args = [
            record.id,
            record.status.value,
            "1" if idempotency_key is not None else "0",
            fingerprint or "",
            *_flatten(_encode(record.to_dict())),
        ]
        with self._errors():
            reply = self._create_job(keys=keys, args=args)
        outcome = _text(reply[0])
        if outcome == "conflict":
            raise IdempotencyConflict(IDEMPOTENCY_CONFLICT)
        if outcome == "exists":
            raise ValueError(f"a job with id {record.id} already exists")
        if outcome == "existing":
            existing = self.get_job(_text(reply[1]))
            if existing is None:
                raise JobNotFound(f"the job of this Idempotency-Key, {_text(reply[1])}, is gone")
            return existing, False
        return JobRecord.from_json(record.to_json()), True

    def get_job(self, job_id: str) -> JobRecord | None:
        with self._errors():
            fields = self._client.hgetall(self._key("job", job_id))
        return _decode(fields) if fields else None

    def list_jobs(
        self,
        owner: str,
        status: JobStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs, newest first; pass the returned cursor back for the next page."""
        check_limit(limit)
        index = (
            self._key("jobs-by-owner", owner)
            if status is None
            else self._key("jobs-by-status", JobStatus(status).value, owner)
        )
        newest = "+" if cursor is None else f"({cursor}"
        with self._errors():
            # One more than asked tells whether there is a next page.
            job_ids = self._client.zrevrangebylex(index, newest, "-", start=0, num=limit + 1)
            with self._client.pipeline(transaction=False) as pipe:
                for job_id in job_ids[:limit]:
                    pipe.hgetall(self._key("job", _text(job_id)))
                rows = pipe.execute()
        records = [_decode(fields) for fields in rows if fields]
        return records, _text(job_ids[limit - 1]) if len(job_ids) > limit else None

    def transition(self, job_id: str, to: JobStatus, **fields: Any) -> JobRecord | None:
        """Move the job to `to` and set `fields` if core.job.can_move allows; else None."""
        changes = check_job_fields(fields)
        target = JobStatus(to)
        with self._errors():
            reply = self._transition(
                keys=[self._key("job", job_id), self._key("status-counts")],
                args=[self._status_index_prefix, target.value, *_flatten(_encode(changes))],
            )
        outcome = _text(reply[0])
        if outcome == "missing":
            raise JobNotFound(f"no job has the id {job_id!r}")
        if outcome == "refused":
            return None
        return _decode(_pairs(reply[1:]))

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set JobRecord attributes other than id, owner and status."""
        changes = check_job_fields(fields)
        if not changes:
            record = self.get_job(job_id)
            if record is None:
                raise JobNotFound(f"no job has the id {job_id!r}")
            return record
        with self._errors():
            reply = self._update(keys=[self._key("job", job_id)], args=_flatten(_encode(changes)))
        if _text(reply[0]) == "missing":
            raise JobNotFound(f"no job has the id {job_id!r}")
        return _decode(_pairs(reply[1:]))

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, ask a running one to stop; terminal jobs stay as they are."""
        with self._errors():
            reply = self._request_cancel(
                keys=[self._key("job", job_id), self._key("status-counts")],
                args=[self._status_index_prefix, json.dumps(utc_now())],
            )
        if _text(reply[0]) == "missing":
            raise JobNotFound(f"no job has the id {job_id!r}")
        return _decode(_pairs(reply[1:]))

    # -- leases ------------------------------------------------------------------------------
    def renew_lease(self, job_id: str, worker: str, ttl_s: float) -> bool:
        """Take the job's lease if free or expired, or extend it if `worker` holds it."""
        check_ttl(ttl_s)
        with self._errors():
            taken = self._renew_lease(
                keys=[self._key("lease", job_id)], args=[worker, max(1, round(ttl_s * 1000))]
            )
        return int(taken) == 1

    def release_lease(self, job_id: str, worker: str) -> None:
        """Give up the lease, if `worker` holds it."""
        with self._errors():
            self._release_lease(keys=[self._key("lease", job_id)], args=[worker])

    def lease_holder(self, job_id: str) -> str | None:
        with self._errors():
            holder = self._client.get(self._key("lease", job_id))
        return None if holder is None else _text(holder)

    # -- metrics -----------------------------------------------------------------------------
    def observe_finished(self, status: JobStatus, duration_s: float, images: int) -> None:
        """Count a finished job's duration in the histogram and its images."""
        check_observation(status, duration_s, images)
        metrics = self._key("metrics")
        with self._errors(), self._client.pipeline() as pipe:
            pipe.hincrby(metrics, f"duration_bucket_{duration_bucket(duration_s)}", 1)
            pipe.hincrbyfloat(metrics, "duration_sum_s", float(duration_s))
            pipe.hincrby(metrics, "duration_count", 1)
            pipe.hincrby(metrics, "images_generated", images)
            pipe.execute()

    def worker_heartbeat(self, worker: str) -> None:
        with self._errors():
            self._heartbeat(keys=[self._key("workers")], args=[worker, HEARTBEAT_RETENTION_S])

    def metrics(self) -> MetricsSnapshot:
        with self._errors(), self._client.pipeline() as pipe:
            pipe.hgetall(self._key("status-counts"))
            pipe.hgetall(self._key("metrics"))
            self._workers_alive(
                keys=[self._key("workers")], args=[self._worker_alive_s], client=pipe
            )
            status_counts, counters, workers_alive = pipe.execute()
        counts = {_text(name): int(value) for name, value in status_counts.items()}
        values = {_text(name): _text(value) for name, value in counters.items()}
        return MetricsSnapshot(
            jobs_by_status={status.value: counts.get(status.value, 0) for status in JobStatus},
            duration_bucket_counts=cumulative_buckets(
                values.get(f"duration_bucket_{i}", "0") for i in range(len(DURATION_BUCKETS_S) + 1)
            ),
            duration_sum_s=float(values.get("duration_sum_s", "0")),
            duration_count=int(values.get("duration_count", "0")),
            images_generated=int(values.get("images_generated", "0")),
            workers_alive=int(workers_alive),
        )

    def check(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        with self._errors():
            self._client.ping()

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RedisJobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def redact_url(url: str) -> str:
    """The URL without its password, fit for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port is not None else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _client_url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _encode(fields: Mapping[str, Any]) -> dict[str, str]:
    """JobRecord fields as stored in the job's hash."""
    return {
        name: (value.value if isinstance(value, JobStatus) else str(value))
        if name in _PLAIN_FIELDS
        else json.dumps(value, sort_keys=True, ensure_ascii=False)
        for name, value in fields.items()
    }


def _decode(fields: Mapping[Any, Any]) -> JobRecord:
    values = {_text(name): _text(value) for name, value in fields.items()}
    return JobRecord.from_dict(
        {
            name: value if name in _PLAIN_FIELDS else json.loads(value)
            for name, value in values.items()
        }
    )


def _flatten(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
