"""How a job id reaches a worker.

    CeleryJobQueue   distributed: a Celery task message in Redis (core/queue_celery.py)
    SqliteJobQueue   embedded `serve`: a leased row in the same SQLite file as the store

Both carry only the job id; the record lives in the JobStore.
"""

from __future__ import annotations

from typing import Protocol


class JobQueue(Protocol):
    def enqueue(self, job_id: str, model: str | None = None, priority: str | None = None) -> None:
        """Queue the job for a worker that serves `model`, in the lane `priority` (None: look
        them up in the job's record, or use the defaults; core/lanes.py)."""
        ...

    def depth(self) -> int:
        """Jobs waiting to be taken by a worker (for /metrics); a job canceled or failed while
        queued never counts, even while its message is still in the queue."""
        ...

    def depth_by_lane(self) -> dict[str, int]:
        """depth() per priority lane (core/lanes.py): {"interactive": n, "bulk": m}, promoted
        bulk jobs counted as interactive (jobs queued before lanes existed may be left out)."""
        ...

    def check(self) -> None:
        """Raise core.store.StoreUnavailable when the queue cannot be reached (for /readyz)."""
        ...
