"""A JobRecord as the API shows it: storage keys become URLs, the owner stays private.

{"id", "status", "progress": {"step", "total"}, "params" (with the seed used), "created_at",
 "started_at", "finished_at", "worker", "error", "attempts", "cancel_requested",
 "result": null | {"grid": {"url", "key"}, "images": [{"url", "key"}, ...],
                   "previews": [{"url", "key"}, ...] (only with progressive_outputs)}}
"""

from __future__ import annotations

from typing import Any

from core.job import JobRecord
from core.storage import Storage


def job_json(record: JobRecord, storage: Storage) -> dict[str, Any]:
    """The job's JSON; result URLs come from `storage` (presigned for S3, /v1/files/ for local)."""
    return {
        "id": record.id,
        "status": record.status.value,
        "progress": {"step": record.progress_step, "total": record.progress_total},
        "params": record.params,
        "created_at": record.created_at,
        "started_at": record.started_at,
        "finished_at": record.finished_at,
        "worker": record.worker,
        "error": record.error,
        "attempts": record.attempts,
        "cancel_requested": record.cancel_requested,
        "result": _result_json(record.result, storage),
    }


def _result_json(result: dict[str, Any] | None, storage: Storage) -> dict[str, Any] | None:
    if result is None:
        return None

    def file(key: str) -> dict[str, str]:
        return {"url": storage.url(key), "key": key}

    grid = result.get("grid")
    shown: dict[str, Any] = {
        "grid": file(grid) if grid is not None else None,
        "images": [file(key) for key in result.get("images") or ()],
    }
    if result.get("previews"):
        shown["previews"] = [file(key) for key in result["previews"]]
    return shown
