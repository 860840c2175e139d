"""Messages lost in a Redis failover, found and sent again.

When Sentinel promotes a replica, the old master goes on taking writes until it is demoted a
moment later, and then drops them. A job's record is safe from this: the API answers 202 only
once a replica holds it (Settings.redis_confirm_replicas). Its Celery message is sent after
that, by kombu on a connection of its own, and may still reach the old master in that moment
and be dropped; so may a worker's ack or requeue. A job whose message is gone would wait
forever: nothing else delivers it.

So each worker runs a QueueAudit. Every AUDIT_INTERVAL_S it reads the master's replication id
(INFO replication: master_replid), which a replica takes anew when it is promoted, and compares
it with the one the farm last audited under (the MARK_KEY in Redis). Once a new id has been seen
for SETTLE_S, by which time Sentinel has demoted the old master and no write can go astray any
more, one worker (the first to claim the id) audits the queue:

- the jobs that need a message: every queued or running job in the store
  (RedisJobStore.unfinished_jobs);
- the messages there are: the lane lists of every model (core/queue_celery.message_lists) and
  kombu's hash of messages delivered but not yet acknowledged (a running job's, as
  task_acks_late keeps it there until the job ends);
- every job in the first and not the second gets a message again, in its lane.

A job sent twice is safe, so the audit need not be exact: run_job drops a message for a job
that is finished, and defers one for a job another live worker holds, until it is finished.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis

from core.periodic import Periodic

log = logging.getLogger(__name__)

AUDIT_INTERVAL_S = 5.0
SETTLE_S = 10.0
# kombu's Redis transport: the hash of delivered, unacknowledged messages (its unacked_key).
UNACKED_KEY = "unacked"
MARK_KEY = "dalle-farm:audited-replid"
# How long a worker's claim to audit a replication id holds, should it die while auditing.
CLAIM_TTL_S = 300
_SCAN_CHUNK = 1000


class UnfinishedJobs(Protocol):
    def unfinished_jobs(self) -> list[tuple[str, str, str]]:
        """(model, lane, id) of every queued or running job."""
        ...


def message_job_id(raw: str | bytes) -> str | None:
    """The job id of a dalle_farm.run_job message as kombu stores it in Redis (Celery's
    message protocol 2: the body is [args, kwargs, embed], base64-encoded); None for anything
    else."""
    try:
        return _job_id_of(json.loads(raw))
    except ValueError:
        return None


def _job_id_of(message: Any) -> str | None:
    try:
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if isinstance(args, list) and args else None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


class QueueAudit(Periodic):
    """Finds, after each failover, the unfinished jobs of `store` that no message in `broker`
    (the queue's Redis) points to, and calls `send(job_id, model, lane)` for each.

    `lists`: the Redis lists messages wait in (core/queue_celery.message_lists). `name`: this
    worker, written into its claim."""

    def __init__(
        self,
        store: UnfinishedJobs,
        broker: redis.Redis,
        lists: Iterable[str],
        send: Callable[[str, str, str], None],
        *,
        name: str,
        interval_s: float = AUDIT_INTERVAL_S,
        settle_s: float = SETTLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__("queue-audit", interval_s)
        self.store = store
        self.broker = broker
        self.lists = list(lists)
        self.send = send
        self.name = name
        self.settle_s = settle_s
        self._clock = clock
        self._first_seen: dict[str, float] = {}
        self._last_error: str | None = None

    def run_once(self) -> list[str]:
        """One look: the ids sent again (none unless this worker audited just now)."""
        try:
            resent = self.check()
        except Exception as error:  # Redis failing over: the next round looks again
            # Said once while it lasts (a Redis that refuses INFO would fill the log).
            level = logging.DEBUG if str(error) == self._last_error else logging.WARNING
            log.log(level, "could not audit the queue: %s", error)
            self._last_error = str(error)
            return []
        self._last_error = None
        return resent

    def check(self) -> list[str]:
        replid = _text(self.broker.info("replication")["master_replid"])
        audited = self.broker.get(MARK_KEY)
        if audited is None:  # a new farm: nothing has been lost yet
            self.broker.set(MARK_KEY, replid)
            return []
        if _text(audited) == replid:
            self._first_seen.clear()
            return []
        first_seen = self._first_seen.setdefault(replid, self._clock())
        if self._clock() - first_seen < self.settle_s:
            return []
        claim = f"{MARK_KEY}:{replid}"
        if not self.broker.set(claim, self.name, nx=True, ex=CLAIM_TTL_S):
            return []  # another worker audits
        log.info("Redis has a new master (replication id %s): auditing the queue", replid)
        resent = self.audit()
        self.broker.set(MARK_KEY, replid)
        return resent

    def audit(self) -> list[str]:
        """Send again every unfinished job that has no message; their ids."""
        jobs = self.store.unfinished_jobs()
        if not jobs:
            return []
        messages = self.message_job_ids()
        resent = []
        for model, lane, job_id in jobs:
            if job_id in messages:
                continue
            self.send(job_id, model, lane)
            resent.append(job_id)
            log.warning("job %s had no message (lost in a failover): sent again", job_id)
        log.info("queue audit: %d unfinished jobs, %d sent again", len(jobs), len(resent))
        return resent

    def message_job_ids(self) -> set[str]:
        """The job ids of every message waiting in the lists or delivered and unacknowledged."""
        found: set[str] = set()
        for name in self.lists:
            start = 0
            while chunk := self.broker.lrange(name, start, start + _SCAN_CHUNK - 1):
                found.update(filter(None, map(message_job_id, chunk)))
                start += len(chunk)
        for _, value in self.broker.hscan_iter(UNACKED_KEY, count=_SCAN_CHUNK):
            found.update(filter(None, [_unacked_job_id(value)]))
        return found


def _unacked_job_id(value: Any) -> str | None:
    """The job id of an entry of kombu's unacked hash: [message, exchange, routing key]."""
    try:
        return _job_id_of(json.loads(value)[0])
    except (ValueError, TypeError, IndexError, KeyError):
        return None


def _text(value: Any) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)
