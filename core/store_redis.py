"""The JobStore of the distributed farm, on Redis (DALLE_FARM_REDIS_URL).

Every read-modify-write is one Lua script (core/store_redis_lua.py), so it is atomic however
many API processes and workers share the Redis: create_job with its Idempotency-Key,
transition (the compare-and-set of core.job.can_move), request_cancel, update, failing
unserved jobs, lease renewal and release, key revocation, heartbeats.

RedisJobStore is built of parts, one concept each:
    core/store_redis_base.py     the connection, key names, Redis' failures as StoreUnavailable
    core/store_redis_keys.py     API keys
    core/store_redis_workers.py  heartbeats and the models workers serve
    core/store_redis_webhooks.py webhook secrets and the outbox of webhook deliveries
    core/store_redis_lanes.py    queue positions in the lanes, promoting bulk jobs
    this module                  jobs, leases and the /metrics counters

Keys of this module, under a prefix (default "dalle-farm"):
    {p}:job:{id}                         hash: the JobRecord; id, owner and status as plain
                                         strings, every other field as ASCII JSON; and
                                         _model, the job's model, and _lane, its lane
                                         (core/lanes.py), for the indexes below
    {p}:jobs-by-owner:{owner}            sorted set of the owner's job ids, all with score 0
    {p}:jobs-by-status:{status}:{owner}  the same, one per status
    {p}:queued-by-model:{model}          the same, of the queued jobs of each model
    {p}:queued-by-lane:{model}:{lane}    sorted set of the queued jobs of a model and lane,
                                         scored by when each entered it (ms, Redis' clock):
                                         ZRANK is a job's queue_position
    {p}:promoted:{model}                 sorted set: the promoted bulk job still queued
                                         (core/lanes.py), scored by when it was promoted
    {p}:status-counts                    hash status → number of jobs
    {p}:idempotency:{owner}:{key sha256} hash: job_id, fingerprint, replays (a count)
    {p}:lease:{job id}                   the worker holding the lease; expires by itself (PX)
    {p}:metrics                          hash: duration buckets, sum and count, images

Listing: job ids sort by creation time and all members of an index share score 0, so
ZREVRANGEBYLEX gives a page newest first from the cursor in O(log N + page). A status filter
reads that status's own index, kept in step by the scripts that change a job's status, so it
costs the same as no filter (never a scan over the owner's other jobs). The status counts for
/metrics are a hash that the same scripts update: O(1). Failing a model's old queued jobs
reads only that model's queued index, oldest first. A queued job's position is one ZRANK in
its lane's index, read only for queued jobs.

Scripts build some key names from the prefix, so this needs one Redis (or a primary with
replicas), not Redis Cluster. Jobs queued by a version without the per-model index are not in
it: they are never failed as unserved (they still run when a worker takes them). Jobs queued
before lanes existed are in no lane index: their queue_position is null.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from core.job import JobRecord, JobStatus, utc_now
from core.lanes import lane_of
from core.store import (
    DEFAULT_MODEL,
    DURATION_BUCKETS_S,
    IDEMPOTENCY_CONFLICT,
    IdempotencyConflict,
    JobNotFound,
    MetricsSnapshot,
    NotConfirmed,
    StoreError,
    TooManyJobs,
    check_cursor,
    check_job_fields,
    check_limit,
    check_models,
    check_observation,
    check_ttl,
    cumulative_buckets,
    duration_bucket,
    hash_idempotency_key,
    job_id_bound,
)
from core.store_redis_base import CONFIRM_TIMEOUT_MS, RedisBackend, redact_url, text
from core.store_redis_events import RedisEventLog
from core.store_redis_keys import RedisKeyStore
from core.store_redis_lanes import RedisLanes, lane_key
from core.store_redis_lua import (
    CREATE_JOB,
    FAIL_QUEUED,
    LANE_FIELD,
    MODEL_FIELD,
    RELEASE_LEASE,
    RENEW_LEASE,
    REQUEST_CANCEL,
    TRANSITION,
    UPDATE,
)
from core.store_redis_webhooks import RedisWebhookStore, delivery_fields
from core.store_redis_workers import RedisWorkerRegistry

__all__ = ["RedisBackend", "RedisJobStore", "redact_url"]

log = logging.getLogger(__name__)

# Fields stored as plain strings (scripts read them); the rest are JSON.
_PLAIN_FIELDS = ("id", "owner", "status")


class RedisJobStore(
    RedisKeyStore, RedisWorkerRegistry, RedisWebhookStore, RedisEventLog, RedisLanes
):
    """The JobStore (core/store.py) on Redis.

    `url_or_client`: a redis:// URL (the store opens and closes its own connections) or a
    redis.Redis the caller owns. `worker_alive_s`: how long a worker's heartbeat lives when it
    gives no ttl_s. `confirm_replicas`: replicas that must confirm a new job (create_job raises
    NotConfirmed when too few do within CONFIRM_TIMEOUT_MS).
    """

    # -- jobs --------------------------------------------------------------------------------
    def create_job(
        self,
        record: JobRecord,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        max_active: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new job; with an Idempotency-Key or max_active, see JobStore.create_job."""
        job_key = self._key("job", record.id)
        idempotency = (
            self._key("idempotency", record.owner, hash_idempotency_key(idempotency_key))
            if idempotency_key is not None
            else job_key
        )
        model = _model_of(record)
        lane = lane_of(record.params)
        keys = [
            job_key,
            self._key("jobs-by-owner", record.owner),
            self._key("jobs-by-status", record.status.value, record.owner),
            self._key("status-counts"),
            idempotency,
            self._key("queued-by-model", model),
            self._key("queued-by-lane", model, lane),
            self._key("jobs-by-status", JobStatus.QUEUED.value, record.owner),
            self._key("jobs-by-status", JobStatus.RUNNING.value, record.owner),
            self._key("webhook", record.id),
            self._key("webhooks-due"),
        ]
        fields = [*_flatten(_encode(record.to_dict())), MODEL_FIELD, model, LANE_FIELD, lane]
        args = [
            record.id,
            record.status.value,
            "1" if idempotency_key is not None else "0",
            fingerprint or "",
            str(max_active or 0),
            str(len(fields)),
            *fields,
            *delivery_fields(record),  # its webhook's delivery, in the same step
        ]
        with self._errors():
            reply, confirmed = self._run_confirmed(self._script(CREATE_JOB), keys, args)
        outcome = text(reply[0])
        if outcome == "conflict":
            raise IdempotencyConflict(IDEMPOTENCY_CONFLICT)
        if outcome == "exists":
            raise ValueError(f"a job with id {record.id} already exists")
        if outcome == "too-many":
            assert max_active is not None
            raise TooManyJobs(int(text(reply[1])), max_active)
        if outcome == "existing":
            existing = self.get_job(text(reply[1]))
            if existing is None:
                raise JobNotFound(f"the job of this Idempotency-Key, {text(reply[1])}, is gone")
            if not confirmed:  # the first request's job may be just as unconfirmed
                raise self._not_confirmed(existing)
            return existing, False
        created = JobRecord.from_json(record.to_json())
        if created.status is JobStatus.QUEUED:
            with self._errors():
                created.queue_position = self._positions([(model, lane, created.id)])[0]
        if not confirmed:
            raise self._not_confirmed(created)
        return created, True

    def _not_confirmed(self, job: JobRecord) -> NotConfirmed:
        return NotConfirmed(
            f"Redis at {self.url} holds job {job.id}, but fewer than {self.confirm_replicas} "
            f"replica(s) confirmed it within {CONFIRM_TIMEOUT_MS} ms (a failover may be under way)",
            job,
        )

    def get_job(self, job_id: str) -> JobRecord | None:
        """The job, with its queue_position while it is queued."""
        with self._errors():
            fields = self._client.hgetall(self._key("job", job_id))
            if not fields:
                return None
            record = _decode(fields)
            if record.status is JobStatus.QUEUED:
                record.queue_position = self._positions([lane_key(fields, job_id)])[0]
        return record

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
        newest = "+" if check_cursor(cursor) is None else f"({cursor}"
        with self._errors():
            # One more than asked tells whether there is a next page.
            job_ids = self._client.zrevrangebylex(index, newest, "-", start=0, num=limit + 1)
            with self._client.pipeline(transaction=False) as pipe:
                for job_id in job_ids[:limit]:
                    pipe.hgetall(self._key("job", text(job_id)))
                rows = pipe.execute()
            rows = [fields for fields in rows if fields]
            records = [_decode(fields) for fields in rows]
            queued = [i for i, record in enumerate(records) if record.status is JobStatus.QUEUED]
            if queued:
                lanes = [lane_key(rows[i], records[i].id) for i in queued]
                for i, position in zip(queued, self._positions(lanes), strict=True):
                    records[i].queue_position = position
        return records, text(job_ids[limit - 1]) if len(job_ids) > limit else None

    def transition(self, job_id: str, to: JobStatus, **fields: Any) -> JobRecord | None:
        """Move the job to `to` and set `fields` if core.job.can_move allows; else None."""
        changes = check_job_fields(fields)
        target = JobStatus(to)
        with self._errors():
            reply = self._script(TRANSITION)(
                keys=[self._key("job", job_id), self._key("status-counts")],
                args=[self._key_prefix, target.value, *_flatten(_encode(changes))],
            )
        outcome = text(reply[0])
        if outcome == "missing":
            raise JobNotFound(f"no job has the id {job_id!r}")
        if outcome == "refused":
            return None
        return self._job_final(_decode(_pairs(reply[1:])))

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set JobRecord attributes other than id, owner and status."""
        changes = check_job_fields(fields)
        if not changes:
            record = self.get_job(job_id)
            if record is None:
                raise JobNotFound(f"no job has the id {job_id!r}")
            return record
        with self._errors():
            reply = self._script(UPDATE)(
                keys=[self._key("job", job_id)], args=_flatten(_encode(changes))
            )
        if text(reply[0]) == "missing":
            raise JobNotFound(f"no job has the id {job_id!r}")
        return _decode(_pairs(reply[1:]))

    def request_cancel(self, job_id: str) -> JobRecord:
        """Cancel a queued job now, ask a running one to stop; terminal jobs stay as they are."""
        with self._errors():
            reply = self._script(REQUEST_CANCEL)(
                keys=[self._key("job", job_id), self._key("status-counts")],
                args=[self._key_prefix, json.dumps(utc_now())],
            )
        if text(reply[0]) == "missing":
            raise JobNotFound(f"no job has the id {job_id!r}")
        return self._job_final(_decode(_pairs(reply[1:])))

    def fail_queued_jobs(
        self, model: str, created_before_ms: int, error: str, limit: int = 100
    ) -> list[str]:
        """Fail the model's queued jobs created before `created_before_ms`, oldest first."""
        (name,) = check_models([model])
        check_limit(limit)
        with self._errors():
            reply = self._script(FAIL_QUEUED)(
                keys=[self._key("queued-by-model", name), self._key("status-counts")],
                args=[
                    self._key_prefix,
                    job_id_bound(created_before_ms),
                    limit,
                    json.dumps(error),
                    json.dumps(utc_now()),
                ],
            )
        failed = [text(job_id) for job_id in reply[1:]]
        self._jobs_final(failed)
        return failed

    def _job_final(self, record: JobRecord) -> JobRecord:
        """A job that has a webhook and is final: its delivery is due now (webhooks)."""
        if record.status.is_terminal and record.params.get("webhook_url"):
            self._jobs_final([record.id])
        return record

    def _jobs_final(self, job_ids: list[str]) -> None:
        # The change is made; a failure here only delays the delivery until the outbox's
        # safety net looks at it (WAITING_RECHECK_S).
        try:
            self._webhooks_job_final(job_ids)
        except StoreError as error:
            log.warning("could not mark the webhooks of %d job(s) due: %s", len(job_ids), error)

    def count_queued(self) -> int:
        with self._errors():
            count = self._client.hget(self._key("status-counts"), JobStatus.QUEUED.value)
        return 0 if count is None else int(count)

    # -- leases ------------------------------------------------------------------------------
    def renew_lease(self, job_id: str, worker: str, ttl_s: float) -> bool:
        """Take the job's lease if free or expired, or extend it if `worker` holds it."""
        check_ttl(ttl_s)
        with self._errors():
            taken = self._script(RENEW_LEASE)(
                keys=[self._key("lease", job_id)], args=[worker, max(1, round(ttl_s * 1000))]
            )
        return int(taken) == 1

    def release_lease(self, job_id: str, worker: str) -> None:
        """Give up the lease, if `worker` holds it."""
        with self._errors():
            self._script(RELEASE_LEASE)(keys=[self._key("lease", job_id)], args=[worker])

    def lease_holder(self, job_id: str) -> str | None:
        with self._errors():
            holder = self._client.get(self._key("lease", job_id))
        return None if holder is None else text(holder)

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

    def metrics(self) -> MetricsSnapshot:
        with self._errors(), self._client.pipeline() as pipe:
            pipe.hgetall(self._key("status-counts"))
            pipe.hgetall(self._key("metrics"))
            self._workers_alive(client=pipe)
            status_counts, counters, workers_alive = pipe.execute()
        counts = {text(name): int(value) for name, value in status_counts.items()}
        values = {text(name): text(value) for name, value in counters.items()}
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

    def __enter__(self) -> RedisJobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _model_of(record: JobRecord) -> str:
    model = record.params.get("model")
    return model if isinstance(model, str) and model else DEFAULT_MODEL


def _encode(fields: Mapping[str, Any]) -> dict[str, str]:
    """JobRecord fields as stored in the job's hash. JSON is ASCII (non-ASCII escaped), so a
    lone surrogate in a prompt or an error is stored, not an encoding error."""
    return {
        name: (value.value if isinstance(value, JobStatus) else str(value))
        if name in _PLAIN_FIELDS
        else json.dumps(value, sort_keys=True)
        for name, value in fields.items()
    }


def _decode(fields: Mapping[Any, Any]) -> JobRecord:
    values = {text(name): text(value) for name, value in fields.items()}
    return JobRecord.from_dict(
        {
            name: value if name in _PLAIN_FIELDS else json.loads(value)
            for name, value in values.items()
            if name not in (MODEL_FIELD, LANE_FIELD)
        }
    )


def _flatten(fields: Mapping[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _pairs(flat: Sequence[Any]) -> dict[Any, Any]:
    return dict(zip(flat[::2], flat[1::2], strict=True))
