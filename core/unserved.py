"""Queued jobs whose model no live worker serves fail after a bound, never wait forever.

The API refuses a job for a model that no live worker serves (JobStore.served_models), but a
job can still be left without one: queued just before the last worker of its model stopped,
or while the only one restarts. Such a job fails once no live worker has served its model for
DALLE_FARM_UNSERVED_JOB_TIMEOUT_S, counted from the later of its creation and the last time
a worker announced (or stopped serving) the model:

    fail_unserved_jobs(store, timeout_s)   one sweep; the ids of the jobs it failed
    UnservedJobSweeper(store, timeout_s)   .maybe(): a sweep at most every interval_s, never
                                           raising; for heartbeat loops and request hooks

Workers' heartbeat loops sweep (core/presence.py), and so does the API, so a job fails on time
even when no worker at all is alive. A job fails at most about interval_s after its bound.
Every step is a compare-and-set in the store: a job a worker has just started is never failed.
Times compare the store's clock (heartbeats) with the caller's and the API's (job creation);
machines kept within a few seconds of each other (NTP) are what the bound of minutes assumes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from core.job import MODELS, JobStatus, job_id_timestamp_ms
from core.store import JobStore, StoreUnavailable

log = logging.getLogger(__name__)

# The longest pause between two sweeps of one process; shorter for short bounds.
SWEEP_INTERVAL_S = 10.0
# Jobs failed per store call; a sweep repeats the call until none is left.
_BATCH = 100


def unserved_error(model: str, served: frozenset[str], timeout_s: float) -> str:
    """What a job that no worker took is told."""
    others = (
        f"the farm serves {', '.join(sorted(served))} now"
        if served
        else "no worker is alive at all now"
    )
    return (
        f"no worker serves model '{model}'; the job waited {timeout_s:g} s "
        f"(DALLE_FARM_UNSERVED_JOB_TIMEOUT_S) without one. Start a worker with "
        f"DALLE_FARM_MODEL={model}, or submit the job again with a model the farm serves "
        f"({others})"
    )


def fail_unserved_jobs(store: JobStore, timeout_s: float, now: float | None = None) -> list[str]:
    """Fail every queued job whose model no live worker has served for `timeout_s` seconds
    (by `now`, Unix seconds; default the current time); return their ids.

    Raises StoreUnavailable when the store cannot be reached.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
    now = time.time() if now is None else now
    cutoff = now - timeout_s
    served = store.served_models()
    last_served = store.models_last_served()
    failed: list[str] = []
    for model in MODELS:
        if model in served or last_served.get(model, float("-inf")) >= cutoff:
            continue
        error = unserved_error(model, served, timeout_s)
        failed_for_model = 0
        while True:
            batch = store.fail_queued_jobs(model, int(cutoff * 1000), error, limit=_BATCH)
            for job_id in batch:
                waited_s = max(0.0, now - job_id_timestamp_ms(job_id) / 1000)
                store.observe_finished(JobStatus.FAILED, round(waited_s, 3), 0)
            failed.extend(batch)
            failed_for_model += len(batch)
            if len(batch) < _BATCH:
                break
        if failed_for_model:
            log.warning("failed %d queued job(s): %s", failed_for_model, error)
    return failed


class UnservedJobSweeper:
    """fail_unserved_jobs at most once per `interval_s` (default: SWEEP_INTERVAL_S, or a
    quarter of a shorter bound), from any thread; a call while another thread sweeps returns
    at once. Failures are logged, never raised: the next call tries again."""

    def __init__(
        self,
        store: JobStore,
        timeout_s: float,
        *,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        self.store = store
        self.timeout_s = timeout_s
        self.interval_s = min(SWEEP_INTERVAL_S, timeout_s / 4) if interval_s is None else interval_s
        self._clock = clock
        self._next = float("-inf")
        self._lock = threading.Lock()

    def maybe(self) -> list[str]:
        """Sweep if the interval has passed since the last sweep; the ids of the jobs failed."""
        if self._clock() < self._next or not self._lock.acquire(blocking=False):
            return []
        try:
            if self._clock() < self._next:
                return []
            self._next = self._clock() + self.interval_s
            try:
                return fail_unserved_jobs(self.store, self.timeout_s)
            except StoreUnavailable as error:
                log.warning("could not look for jobs that no worker serves: %s", error)
            except Exception:  # a request or a heartbeat must not fail for it
                log.exception("the sweep for jobs that no worker serves failed")
            return []
        finally:
            self._lock.release()
