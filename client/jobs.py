"""A job as the client returns it: the contract's Job (core.contract), checked, with shortcuts.

job.id, job.status, job.params["seed"], job.progress_step / job.progress_total,
job.grid and job.images (FileRef: url, key), job.warnings, job.error, job.attempts,
the times, job.contract (the core.contract.Job itself) and job.raw (the JSON as sent)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from core.contract import FileRef
from core.contract import Job as ContractJob

__all__ = ["FINISHED_STATUSES", "ContractJob", "FileRef", "Job"]

FINISHED_STATUSES = frozenset({"succeeded", "failed", "canceled"})


@dataclass(frozen=True)
class Job:
    """A job as the API shows it; `contract` is the validated core.contract.Job, `raw` the
    whole JSON."""

    id: str
    status: str
    params: dict[str, Any]
    progress_step: int = 0
    progress_total: int = 0
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    worker: str | None = None
    error: str | None = None
    attempts: int = 0
    grid: FileRef | None = None
    images: tuple[FileRef, ...] = ()
    previews: tuple[FileRef, ...] = ()
    warnings: tuple[str, ...] = ()
    cancel_requested: bool = False
    queue_position: int | None = None  # while queued: its place in its lane (1: next)
    contract: ContractJob | None = field(default=None, repr=False, compare=False)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def is_finished(self) -> bool:
        """Succeeded, failed or canceled: the status will not change again."""
        return self.status in FINISHED_STATUSES

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> Job:
        """Check a job's JSON against the contract (pydantic's ValidationError, a ValueError,
        if it does not fit) and wrap it."""
        # Through JSON, as the server sent it: strict JSON validation takes "queued" for the
        # status enum, which strict Python validation would not.
        job = ContractJob.model_validate_json(json.dumps(dict(body)))
        return cls.from_contract(job, raw=dict(body))

    @classmethod
    def from_contract(cls, job: ContractJob, raw: Mapping[str, Any] | None = None) -> Job:
        result = job.result
        return cls(
            id=job.id,
            status=job.status.value,
            params=job.params.to_dict(),
            progress_step=job.progress.step,
            progress_total=job.progress.total,
            created_at=job.created_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            worker=job.worker,
            error=job.error,
            attempts=job.attempts,
            grid=result.grid if result is not None else None,
            images=tuple(result.images) if result is not None else (),
            previews=tuple(result.previews) if result is not None else (),
            warnings=tuple(job.warnings),
            cancel_requested=job.cancel_requested,
            queue_position=job.queue_position,
            contract=job,
            raw=dict(raw) if raw is not None else job.model_dump(mode="json"),
        )
