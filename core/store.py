"""The state the API and the workers share: job records, API keys, leases and farm counters.

One contract, two backends:
    RedisJobStore    the distributed farm (DALLE_FARM_REDIS_URL)        core/store_redis.py
    SqliteJobStore   the embedded `dalle-farm serve` (a file in DALLE_FARM_DATA_DIR)
                                                                          core/store_sqlite.py

Errors:
    StoreError
    ├── StoreUnavailable       the backend cannot be reached (readyz reports it)
    ├── JobNotFound            no job with that id
    └── IdempotencyConflict    an Idempotency-Key was reused with a different body

Every state change goes through `transition`, which applies core.job.can_move atomically
(compare-and-set), so a job's state only moves forward even with duplicate deliveries.

Workers announce themselves with `worker_heartbeat(name, models=...)`: each announcement lives
`ttl_s` (default WORKER_ALIVE_S) unless renewed, so a worker that dies drops out within that
time, and one that stops cleanly leaves at once (`worker_gone`). `served_models()` is what the
API checks before it accepts a job; core/unserved.py fails queued jobs whose model no live
worker has served for DALLE_FARM_UNSERVED_JOB_TIMEOUT_S.

Text is stored as ASCII JSON (non-ASCII escaped), so any Python string, a lone surrogate
included, is written and read back unchanged; names that are stored as they are (API key
names) must be valid Unicode, else ValueError says so.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import math
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from core.events import EventPage
from core.job import MODELS, JobRecord, JobStatus
from core.webhooks import WebhookDelivery

# Upper bounds (seconds) of the job-duration histogram on /metrics.
DURATION_BUCKETS_S = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)
# The model of a job whose params name none (JobParams' default).
DEFAULT_MODEL = MODELS[0]
# How long a worker's heartbeat (and the models it announces) lives unless renewed. Workers
# beat every 10 s, so a live one is never missed; a dead one drops out within this time.
WORKER_ALIVE_S = 30.0
# What a worker may call a model it announces: a plain name, never a comma (the Redis store
# keeps a worker's models as one comma-separated string).
_MODEL_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


class StoreError(Exception):
    """Base class of the store's errors."""


class StoreUnavailable(StoreError):
    """The backend cannot be reached."""


class NotConfirmed(StoreUnavailable):
    """The store took `job` but too few replicas confirmed it in time: it is lost if the
    store fails over now (a failover may be under way), and kept otherwise."""

    def __init__(self, message: str, job: JobRecord) -> None:
        super().__init__(message)
        self.job = job


class JobNotFound(StoreError):
    """No job has that id."""


class IdempotencyConflict(StoreError):
    """The Idempotency-Key was used before with a different request body."""


class TooManyJobs(StoreError):
    """The owner already has `active` jobs queued or running, its limit (`limit`) or more."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} jobs queued or running; the limit is {limit}")
        self.active = active
        self.limit = limit


@dataclass(frozen=True)
class ApiKey:
    id: str  # public, short; jobs record it as their owner
    name: str
    created_at: str
    revoked: bool = False
    # Its own limits (core/limits.py), None for the farm's: jobs queued plus running (0: no
    # limit), and requests per time ("10/s"; "none": no limit).
    max_jobs: int | None = None
    rate: str | None = None


@dataclass
class MetricsSnapshot:
    jobs_by_status: dict[str, int]  # every JobStatus value, 0 when none
    duration_bucket_counts: list[int]  # cumulative counts per DURATION_BUCKETS_S bound, then +Inf
    duration_sum_s: float
    duration_count: int
    images_generated: int
    workers_alive: int
    extra: dict[str, Any] = field(default_factory=dict)


class JobStore(Protocol):
    # -- API keys: only a hash of each secret is stored; the secret is shown once ----------
    def create_key(
        self, name: str, limits: Mapping[str, int | str | None] | None = None
    ) -> tuple[ApiKey, str]:
        """A new key named `name`, with its own `limits` (as set_key_limits takes them) if
        given, and its secret (e.g. "dfk_<id>_<random>")."""
        ...

    def list_keys(self) -> list[ApiKey]: ...

    def revoke_key(self, id_or_name: str) -> bool:
        """Revoke by id or name; False when there is no such key."""
        ...

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key whose secret this is, unless unknown or revoked (constant-time compare)."""
        ...

    def set_key_limits(
        self, id_or_name: str, limits: Mapping[str, int | str | None]
    ) -> list[ApiKey]:
        """Set the key's own limits given in `limits` ("max_jobs", "rate"; None: back to the
        farm's), for the key with this id or every key with this name; the keys changed
        (none: no such key). ValueError for a limit core.limits.check_key_limits refuses."""
        ...

    # -- jobs ----------------------------------------------------------------------------
    def create_job(
        self,
        record: JobRecord,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        max_active: int | None = None,
    ) -> tuple[JobRecord, bool]:
        """Store a new queued job; returns (record, created).

        With an idempotency key (scoped to record.owner), a second call with the same key and
        fingerprint returns the first job and created=False; another fingerprint raises
        IdempotencyConflict. With `max_active`, TooManyJobs if the owner already has that many
        jobs queued or running (a replay is answered all the same). Atomic under concurrent
        calls. NotConfirmed when the store keeps replicas and too few confirmed the new job in
        time (it may or may not survive).
        """
        ...

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def list_jobs(
        self,
        owner: str,
        status: JobStatus | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[JobRecord], str | None]:
        """The owner's jobs, newest first, and the cursor of the next page (None: no more)."""
        ...

    def transition(self, job_id: str, to: JobStatus, **fields: Any) -> JobRecord | None:
        """Move the job to `to` and set `fields` (JobRecord attributes) atomically, if
        core.job.can_move(current, to); otherwise change nothing and return None.
        Raises JobNotFound for an unknown id."""
        ...

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set JobRecord attributes other than status (progress, result, attempts, ...)."""
        ...

    def request_cancel(self, job_id: str) -> JobRecord:
        """A queued job becomes canceled at once; a running one gets cancel_requested=True
        (its worker stops at the next decoder step). Terminal jobs are returned unchanged."""
        ...

    # -- leases: a running job's worker renews its lease; an expired lease means the worker died
    def renew_lease(self, job_id: str, worker: str, ttl_s: float) -> bool:
        """Take or extend the lease; False if another live worker holds it."""
        ...

    def release_lease(self, job_id: str, worker: str) -> None: ...

    def lease_holder(self, job_id: str) -> str | None: ...

    # -- counters for /metrics -------------------------------------------------------------
    def observe_finished(self, status: JobStatus, duration_s: float, images: int) -> None:
        """Count a finished job's duration in the histogram and its images."""
        ...

    # -- workers: who is alive, and which models they serve -------------------------------
    def worker_heartbeat(
        self, worker: str, models: Iterable[str] | None = None, ttl_s: float | None = None
    ) -> None:
        """`worker` is alive for `ttl_s` more seconds (default: the store's worker_alive_s).

        With `models`, it also announces that it serves those models (replacing what it
        announced before); None keeps its announcement as it is. A worker announces only once
        its model is loaded and it takes jobs.
        """
        ...

    def worker_gone(self, worker: str) -> None:
        """Remove the worker at once (a clean shutdown): it no longer counts as alive, and
        no longer serves its models."""
        ...

    def served_models(self) -> frozenset[str]:
        """The models that some live worker announced it serves."""
        ...

    def models_last_served(self) -> dict[str, float]:
        """For each model ever announced: when a worker last announced it, or stopped
        serving it (Unix seconds, by the store's clock)."""
        ...

    def fail_queued_jobs(
        self, model: str, created_before_ms: int, error: str, limit: int = 100
    ) -> list[str]:
        """Atomically fail up to `limit` queued jobs for `model` created before
        `created_before_ms` (ms since the Unix epoch), with `error` and finished_at now; the
        ids of the jobs failed, oldest first. Running and finished jobs are never touched."""
        ...

    def count_queued(self) -> int:
        """How many jobs are queued (waiting for a worker); finished ones never count."""
        ...

    def metrics(self) -> MetricsSnapshot: ...

    # -- webhooks (core/webhooks.py; core/store_*_webhooks.py) ------------------------------
    # A job created with params["webhook_url"] gets a delivery; when the job reaches a final
    # state (transition, request_cancel, fail_queued_jobs) the delivery is due at once.
    def webhook_secret(self, owner: str) -> str:
        """The owner's webhook signing secret, created now if it has none."""
        ...

    def rotate_webhook_secret(self, owner: str) -> str:
        """Replace the owner's webhook signing secret; the new one."""
        ...

    def claim_webhook_deliveries(
        self, claimant: str, limit: int, lease_s: float
    ) -> list[WebhookDelivery]:
        """Up to `limit` due deliveries whose job is final, leased to `claimant` for lease_s."""
        ...

    def complete_webhook_delivery(
        self, delivery: WebhookDelivery, state: str, error: str | None, retry_in_s: float = 0.0
    ) -> bool:
        """Record a try: delivered, failed (given up), or pending (again in retry_in_s);
        error None keeps the last one recorded. False when the claim is not held."""
        ...

    def webhook_delivery(self, job_id: str) -> WebhookDelivery | None: ...

    def check(self) -> None:
        """Raise StoreUnavailable when the backend cannot be reached (for /readyz)."""
        ...

    # -- live events: a log per job and per owner, appended with each change (core/events.py)
    def job_events(self, job_id: str, after: str | None = None, limit: int = 100) -> EventPage:
        """The job's events after cursor `after`, oldest first (None: none, and the newest
        cursor with the job's record: start watching now). A cursor no longer in the log is
        a gap: no events, the newest cursor and the record to resynchronise from."""
        ...

    def owner_events(self, owner: str, after: str | None = None, limit: int = 100) -> EventPage:
        """Every event of the owner's jobs after cursor `after`, as job_events (no record)."""
        ...

    def close(self) -> None: ...


# Heartbeats older than this are deleted; long past counting as alive.
HEARTBEAT_RETENTION_S = 24 * 3600.0

# -- Checks and encodings both backends share ------------------------------------------------

IDEMPOTENCY_CONFLICT = "Idempotency-Key was already used with a different request body"
KEY_SECRET_PREFIX = "dfk_"
# "dfk_" + 12 hex digits of key id + "_" + secrets.token_urlsafe(24) (32 characters).
_KEY_SECRET = re.compile(r"dfk_([0-9a-f]{12})_[A-Za-z0-9_-]{32}")
_UNSETTABLE_FIELDS = frozenset({"id", "owner", "status"})
# Computed when a record is read, never stored.
_COMPUTED_FIELDS = frozenset({"queue_position"})
_SETTABLE_FIELDS = frozenset(
    field.name
    for field in dataclasses.fields(JobRecord)
    if field.name not in _UNSETTABLE_FIELDS | _COMPUTED_FIELDS
)


def new_key_secret() -> tuple[str, str]:
    """A new key id and its secret: "dfk_<id>_<random>"."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_SECRET_PREFIX}{key_id}_{secrets.token_urlsafe(24)}"


def hash_secret(secret: str) -> str:
    """What is stored of a key secret: its sha256, hex. (The secret has 192 random bits, so a
    fast hash is enough; a slow one would only slow down every request.)"""
    return hashlib.sha256(secret.encode("utf8")).hexdigest()


def key_id_from_secret(secret: object) -> str | None:
    """The key id a secret names, or None if it is not shaped like a secret."""
    if not isinstance(secret, str):
        return None
    match = _KEY_SECRET.fullmatch(secret)
    return None if match is None else match.group(1)


def check_key_name(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a key name must be a non-blank string, got {name!r}")
    return check_text("the key name", name.strip())


def hash_idempotency_key(key: str) -> str:
    """Idempotency-Keys are stored hashed: they are the client's, and may be long (or hold any
    code point, a lone surrogate included: it is hashed as it is)."""
    return hashlib.sha256(key.encode("utf8", "surrogatepass")).hexdigest()


def check_text(what: str, value: str) -> str:
    """`value` if it can be stored as UTF-8 text, else a ValueError that names `what`."""
    try:
        value.encode("utf8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"{what} is not valid Unicode text (character {error.start} is a lone surrogate, "
            f"{value[error.start]!r})"
        ) from None
    return value


def check_worker(worker: object) -> str:
    if not isinstance(worker, str) or not worker.strip():
        raise ValueError(f"a worker name must be a non-blank string, got {worker!r}")
    return check_text("the worker name", worker)


def check_models(models: Iterable[str]) -> tuple[str, ...]:
    """The models a worker announces, sorted and each once; ValueError for a bad name."""
    if isinstance(models, str):
        raise ValueError(f"models must be a collection of model names, got the string {models!r}")
    names = list(models)
    for name in names:
        if not isinstance(name, str) or _MODEL_NAME.fullmatch(name) is None:
            raise ValueError(f"a model name is 1-64 letters, digits, '_', '.' or '-', got {name!r}")
    return tuple(sorted(set(names)))


def check_heartbeat_ttl(ttl_s: float | None, default_s: float) -> float:
    if ttl_s is None:
        return default_s
    check_ttl(ttl_s)
    return float(ttl_s)


def job_id_bound(created_before_ms: int) -> str:
    """The string that every job id created before `created_before_ms` sorts below."""
    if isinstance(created_before_ms, bool) or not isinstance(created_before_ms, int):
        raise ValueError(f"created_before_ms must be an integer, got {created_before_ms!r}")
    return f"{min(max(created_before_ms, 0), 2**48 - 1):012x}"


def check_job_fields(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` if every name is a JobRecord attribute that update/transition may set."""
    fixed = sorted(_UNSETTABLE_FIELDS.intersection(fields))
    if fixed:
        raise ValueError(
            f"{', '.join(fixed)} cannot be set this way (status changes go through transition)"
        )
    unknown = sorted(set(fields) - _SETTABLE_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown JobRecord field(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(_SETTABLE_FIELDS))}"
        )
    return dict(fields)


def check_limit(limit: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer, got {limit!r}")


def check_cursor(cursor: str | None) -> str | None:
    return None if cursor is None else check_text("the cursor", cursor)


def check_ttl(ttl_s: float) -> None:
    if not (isinstance(ttl_s, int | float) and math.isfinite(ttl_s) and ttl_s > 0):
        raise ValueError(f"a lease time must be a positive number of seconds, got {ttl_s!r}")


def check_observation(status: JobStatus, duration_s: float, images: int) -> None:
    if not JobStatus(status).is_terminal:
        raise ValueError(f"only finished jobs are observed, got status {JobStatus(status).value}")
    if not (isinstance(duration_s, int | float) and math.isfinite(duration_s) and duration_s >= 0):
        raise ValueError(f"duration_s must be a number >= 0, got {duration_s!r}")
    if isinstance(images, bool) or not isinstance(images, int) or images < 0:
        raise ValueError(f"images must be an integer >= 0, got {images!r}")


def duration_bucket(duration_s: float) -> int:
    """The histogram bucket of a duration: the first bound >= it, or len(bounds) for +Inf."""
    return bisect.bisect_left(DURATION_BUCKETS_S, duration_s)


def cumulative_buckets(counts: Iterable[Any]) -> list[int]:
    """Per-bucket counts (each bound, then +Inf) as Prometheus' cumulative `le` counts."""
    total = 0
    cumulative = []
    for count in counts:
        total += int(count)
        cumulative.append(total)
    return cumulative
