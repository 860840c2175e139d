"""A job's lease: which worker thread runs it, renewed while it runs, taken over when its holder
died.

A lease is a key in the store with a time to live, held by `lease_owner()` (`name#pid/thread`).
run_job takes it before a job runs (`take_lease`), a `Heartbeat` thread renews it (and the
worker's heartbeat) every ttl/4 seconds while the job renders, and it is released at the end. A
worker that vanishes stops renewing: its lease expires, and a redelivery finds the job free.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from core.settings import Settings
from core.store import JobStore

log = logging.getLogger(__name__)

# Bounds of the lease's time to live, in seconds; see lease_ttl_s.
MIN_LEASE_TTL_S = 15.0
MAX_LEASE_TTL_S = 60.0


def lease_ttl_s(settings: Settings) -> float:
    """How long a job's lease outlives its worker's last heartbeat.

    Tied to the broker's visibility timeout: a redelivered job should find the dead worker's
    lease expired, or soon expiring, rather than wait long after Redis handed it back.
    """
    return max(MIN_LEASE_TTL_S, min(float(settings.visibility_timeout_s), MAX_LEASE_TTL_S))


def lease_owner(worker_name: str, pid: int | None = None, thread: int | None = None) -> str:
    """The lease holder's name: the worker, its process and thread, as `name#pid/thread`.

    Two threads or processes of one worker must not run the same job at once (a message
    delivered twice), and a dead process's lease can be recognised (and released early) by its
    own worker; see take_lease.
    """
    pid = os.getpid() if pid is None else pid
    return f"{worker_name}#{pid}/{threading.get_ident() if thread is None else thread}"


def take_lease(store: JobStore, job_id: str, worker_name: str, owner: str, ttl_s: float) -> bool:
    """Hold the job's lease as `owner` (renewed if it already does); False if another live
    holder has it."""
    if store.renew_lease(job_id, owner, ttl_s):
        return True
    # A pool process of this same worker that was killed (kill -9, OOM) leaves its lease
    # behind; its worker restarts the process and gets the job back at once (reject on worker
    # lost). Waiting the lease out would add up to a minute for nothing.
    holder = store.lease_holder(job_id)
    if holder is None:
        return store.renew_lease(job_id, owner, ttl_s)
    name, _, process = holder.rpartition("#")
    pid = process.partition("/")[0]
    if name == worker_name and pid.isdigit() and not _process_alive(int(pid)):
        log.info("job %s: its lease holder %s is dead; taking over", job_id, holder)
        store.release_lease(job_id, holder)
        return store.renew_lease(job_id, owner, ttl_s)
    return False


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    # A zombie (killed, not yet reaped by the pool) still answers; /proc tells them apart.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class Heartbeat:
    """Renews the lease and the worker's heartbeat every ttl/4 seconds on a daemon thread."""

    store: JobStore
    job_id: str
    worker_name: str
    owner: str
    ttl_s: float
    lost: threading.Event = field(default_factory=threading.Event)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(target=self._run, name=f"lease-{self.job_id}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.store.renew_lease(self.job_id, self.owner, self.ttl_s):
                    log.warning("job %s: another worker took over its lease", self.job_id)
                    self.lost.set()
                    return
                self.store.worker_heartbeat(self.worker_name)
            except Exception as error:  # a blip: the next beat tries again
                log.warning("job %s: heartbeat failed: %s", self.job_id, error)
