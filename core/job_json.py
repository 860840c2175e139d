"""A JobRecord as the API shows it (core.contract.Job): storage keys become URLs, the owner
stays private. The API answers it, and webhook deliveries (worker/webhooks.py) POST the same.

{"id", "status", "progress": {"step", "total"}, "params" (with the seed used), "created_at",
 "started_at", "finished_at", "worker", "error", "attempts", "cancel_requested",
 "queue_position": while queued, the job's place in its lane (1: next), else null,
 "result": null | {"grid": {"url", "key"}, "images": [{"url", "key"}, ...],
                   "previews": [{"url", "key"}, ...] (only with progressive_outputs)},
 "warnings": [...] (only in a POST answer that has one)}
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from pydantic import ValidationError

from core.contract import Job
from core.job import JobRecord, JobStatus
from core.storage import Storage

logger = logging.getLogger(__name__)


def job_json(record: JobRecord, storage: Storage, warnings: Iterable[str] = ()) -> dict[str, Any]:
    """The job's JSON, checked against the contract's Job; result URLs come from `storage`
    (presigned for S3, /v1/files/ for local)."""
    fields: dict[str, Any] = {
        "id": record.id,
        "status": record.status,
        "progress": {"step": record.progress_step, "total": record.progress_total},
        "params": record.params,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "worker": record.worker,
        "error": record.error,
        "attempts": record.attempts,
        "cancel_requested": record.cancel_requested,
        # The store computes it when it reads a queued record (JobRecord.queue_position).
        "queue_position": record.queue_position if record.status is JobStatus.QUEUED else None,
        "result": _result(record.result, storage),
        "warnings": list(warnings),
    }
    try:
        return Job.model_validate(fields).model_dump(mode="json")
    except ValidationError as error:
        # A record written under older rules is still shown, as it is, rather than a 500.
        logger.warning("job %s does not fit the contract: %s", record.id, error)
    if not fields["warnings"]:
        del fields["warnings"]
    if fields["result"] is not None and not fields["result"]["previews"]:
        del fields["result"]["previews"]
    return fields


def job_page_json(
    records: Iterable[JobRecord], next_cursor: str | None, storage: Storage
) -> dict[str, Any]:
    """A page of jobs (the contract's JobPage) as JSON."""
    return {"jobs": [job_json(record, storage) for record in records], "next_cursor": next_cursor}


def _result(result: dict[str, Any] | None, storage: Storage) -> dict[str, Any] | None:
    if result is None:
        return None

    def file(key: str) -> dict[str, str]:
        return {"url": storage.url(key), "key": key}

    grid = result.get("grid")
    return {
        "grid": file(grid) if grid is not None else None,
        "images": [file(key) for key in result.get("images") or ()],
        "previews": [file(key) for key in result.get("previews") or ()],
    }
