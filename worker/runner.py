"""The one job function both modes run: `run_job(job_id, …) -> Outcome`.

The Celery task (distributed) and the embedded worker loop call it with a job id from their
queue; everything that makes a job safe to deliver twice, to crash in and to cancel lives here:

- an unknown or already finished job is done at once (a duplicate delivery touches nothing);
- a job whose lease another live worker holds is DEFERRED: the caller delivers it again later;
- each start counts an attempt; past settings.max_attempts the job fails ("crashed workers");
- a heartbeat thread renews the lease (worker/lease.py) while the job runs, so a dead
  worker's lease expires;
- the decoder's on_step reports progress and stops at the next step once a cancel is asked;
- every 32 decoder steps the tokens so far are saved in the job's record (its checkpoint); a
  job redelivered after its worker died resumes from there and ends with the identical images;
- previews, then the tiles and the grid side by side on the job's own upload threads
  (worker/finishing.py), then job.json (the commit marker) once all of them are stored, and
  only then is the job moved to succeeded;
- storage that is down (StorageUnavailable) hands the job back (queued) and re-raises, so the
  caller retries later; the job is never reported succeeded with objects missing.

What errors do:
    ValueError, ModelError      the job cannot be rendered (settings the model refuses, or its
                                own decoding failed: model.batch.JobFailed): failed, with the
                                message; the other jobs of the batch are not affected
    any other Exception         while rendering (a bug, the GPU out of memory): failed, logged
    StorageUnavailable          the job is requeued, then re-raised: retry the delivery later
    StoreUnavailable            re-raised as is: the state cannot be recorded, retry later
"""

from __future__ import annotations

import copy
import enum
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from core.checkpoint import decode_tokens, encode_tokens
from core.job import (
    JobParams,
    JobRecord,
    JobStatus,
    grid_key,
    image_key,
    job_json_key,
    parse_params,
    preview_key,
    resolve_seed,
    utc_now,
)
from core.settings import Settings
from core.storage import Storage, StorageUnavailable
from core.store import JobStore, StoreUnavailable
from model.errors import ModelError
from worker.finishing import upload_all
from worker.lease import Heartbeat, lease_owner, lease_ttl_s, take_lease

log = logging.getLogger(__name__)

__all__ = ["Outcome", "RenderEngine", "RenderedImages", "lease_owner", "lease_ttl_s", "run_job"]

# Seconds between two progress writes while the decoder runs: a GPU decodes a step in a few
# milliseconds, and a write each time would make the store the bottleneck.
PROGRESS_INTERVAL_S = 0.1


class Outcome(enum.Enum):
    DONE = "done"  # acknowledge the delivery: the job is finished, or was never ours to run
    DEFERRED = "deferred"  # another live worker holds the job: deliver it again later


class RenderedImages(Protocol):
    """worker.engine.Rendered, as run_job uses it."""

    @property
    def grid_png(self) -> bytes: ...

    @property
    def tile_pngs(self) -> list[bytes]: ...

    @property
    def timings(self) -> dict[str, float]: ...


class RenderEngine(Protocol):
    """What run_job needs of worker.engine.Engine (a protocol: this module imports no torch)."""

    weights: dict[str, Any]

    def render(
        self,
        params: JobParams,
        on_step: Callable[[int, int], None] | None = None,
        on_preview: Callable[[int, bytes], None] | None = None,
        *,
        job_id: str | None = None,
        resume: list[list[int]] | None = None,
        on_checkpoint: Callable[[int, list[list[int]]], None] | None = None,
    ) -> RenderedImages: ...


class _Canceled(Exception):
    """Raised from on_step to stop the decoder once a cancel was asked."""


class _LeaseLost(Exception):
    """Raised from on_step when another worker took over the job's lease."""


class _HandBack(Exception):
    """Raised from on_step when the worker is asked to stop: the job goes back to the queue."""


@dataclass
class _Progress:
    """on_step for the decoder: throttled progress writes, cancel and lease checks."""

    store: JobStore
    job_id: str
    heartbeat: Heartbeat
    stop_requested: threading.Event | None = None
    _last_write: float = 0.0

    def __call__(self, step: int, total: int) -> None:
        if self.heartbeat.lost.is_set():
            raise _LeaseLost
        if self.stop_requested is not None and self.stop_requested.is_set():
            raise _HandBack
        try:
            record = self._record(step, total)
        except StoreUnavailable as error:  # progress is best effort; the end result is not
            log.warning("job %s: could not record progress: %s", self.job_id, error)
            return
        if record is None or record.cancel_requested or record.status.is_terminal:
            raise _Canceled

    def _record(self, step: int, total: int) -> JobRecord | None:
        # The cancel flag is read at every step, so a cancel stops the very next one; progress
        # is written at most every PROGRESS_INTERVAL_S (the write returns the record too).
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_INTERVAL_S or step == total:
            self._last_write = now
            return self.store.update(self.job_id, progress_step=step, progress_total=total)
        return self.store.get_job(self.job_id)


def run_job(
    job_id: str,
    *,
    store: JobStore,
    storage: Storage,
    engine: RenderEngine,
    worker_name: str,
    settings: Settings,
    stop_requested: threading.Event | None = None,
) -> Outcome:
    """Run job `job_id` to an end (succeeded, failed or canceled) unless another worker holds it.

    Returns DONE (acknowledge the delivery) or DEFERRED (deliver it again in a few seconds).
    When `stop_requested` is set while the decoder runs (the worker is shutting down), the job
    is handed back: queued again at the next decoder step, and DEFERRED is returned.
    Raises StorageUnavailable after requeueing the job when results cannot be stored, and
    StoreUnavailable when the store cannot be reached: retry the delivery later in both cases.
    """
    record = store.get_job(job_id)
    if record is None:
        log.warning("job %s: no such job; dropping the delivery", job_id)
        return Outcome.DONE
    if record.status.is_terminal:
        log.info("job %s is already %s; nothing to do", job_id, record.status.value)
        return Outcome.DONE

    owner = lease_owner(worker_name)
    ttl_s = lease_ttl_s(settings)
    # The lease comes before the attempt count: a deferred delivery is not an attempt.
    if not take_lease(store, job_id, worker_name, owner, ttl_s):
        log.info("job %s is held by %s; deferring", job_id, store.lease_holder(job_id))
        return Outcome.DEFERRED
    try:
        return _run_leased(
            job_id, store, storage, engine, worker_name, owner, ttl_s, settings, stop_requested
        )
    finally:
        try:
            store.release_lease(job_id, owner)
        except StoreUnavailable as error:  # it expires on its own
            log.warning("job %s: could not release its lease: %s", job_id, error)


def _run_leased(
    job_id: str,
    store: JobStore,
    storage: Storage,
    engine: RenderEngine,
    worker_name: str,
    owner: str,
    ttl_s: float,
    settings: Settings,
    stop_requested: threading.Event | None,
) -> Outcome:
    record = store.get_job(job_id)
    if record is None or record.status.is_terminal:  # finished while we took the lease
        return Outcome.DONE
    attempts = record.attempts + 1
    if attempts > settings.max_attempts:
        error = (
            f"the job crashed workers {record.attempts} times; giving up "
            f"(DALLE_FARM_MAX_ATTEMPTS={settings.max_attempts})"
        )
        _finish(store, job_id, JobStatus.FAILED, record, error=error)
        return Outcome.DONE
    if record.cancel_requested:  # asked while its last worker was dying
        _finish(store, job_id, JobStatus.CANCELED, record)
        return Outcome.DONE
    try:
        params = resolve_seed(parse_params(record.params, max_grid_size=settings.max_grid_size))
    except ValueError as error:
        _finish(store, job_id, JobStatus.FAILED, record, error=f"invalid job parameters: {error}")
        return Outcome.DONE

    resume = _checkpoint_tokens(record, params)
    resumed_from = len(resume[0]) if resume else 0
    started_at = utc_now()
    fields: dict[str, Any] = {
        "started_at": started_at,
        "worker": worker_name,
        "attempts": attempts,
        "progress_step": resumed_from,
        # The seed actually used, recorded before rendering so that a retry draws the same one.
        "params": params.to_dict(),
        "error": None,
    }
    if record.status is JobStatus.QUEUED:
        running = store.transition(job_id, JobStatus.RUNNING, **fields)
        if running is None:  # canceled (or finished) meanwhile
            return Outcome.DONE
    else:  # RUNNING: redelivered after a worker died or handed it back
        store.update(job_id, **fields)
    log.info(
        "job %s: attempt %d on %s%s",
        job_id,
        attempts,
        worker_name,
        f", resuming at token {resumed_from}" if resumed_from else "",
    )

    with Heartbeat(store, job_id, worker_name, owner, ttl_s) as heartbeat:
        job = _JobRun(job_id, store, storage, heartbeat)
        render_started = time.monotonic()
        try:
            rendered = engine.render(
                params,
                on_step=_Progress(store, job_id, heartbeat, stop_requested),
                on_preview=job.store_preview if params.progressive_outputs else None,
                job_id=job_id,
                resume=resume,
                on_checkpoint=job.store_checkpoint,
            )
            render_s = time.monotonic() - render_started
            upload_started = time.monotonic()
            job.store_results(rendered, settings.upload_threads)
            upload_s = time.monotonic() - upload_started
            finished_at = utc_now()
            job_json = {
                "id": job_id,
                "params": params.to_dict(),
                "seed": params.seed,
                "model": params.model,
                "weights": engine.weights,
                "worker": worker_name,
                "attempts": attempts,
                "resumed_from": resumed_from,
                "timings": {
                    "created_at": record.created_at,
                    "started_at": started_at,
                    "finished_at": finished_at,
                    "queued_s": _seconds_between(record.created_at, started_at),
                    "render_s": round(render_s, 3),
                    **{part: round(seconds, 3) for part, seconds in rendered.timings.items()},
                    "upload_s": round(upload_s, 3),
                },
                "result": job.result,
            }
            # Last: its presence says every other object of the job is stored.
            job.put(job_json_key(job_id), json.dumps(job_json, indent=2).encode(), "json")
        except _Canceled:
            log.info("job %s: canceled", job_id)
            _finish(store, job_id, JobStatus.CANCELED, record, started_at=started_at)
            return Outcome.DONE
        except _LeaseLost:
            return Outcome.DONE  # the worker that holds the lease now has its own delivery
        except _HandBack:
            log.info("job %s: handed back, the worker is stopping", job_id)
            # Not a crash either: the attempt is given back.
            store.transition(job_id, JobStatus.QUEUED, attempts=attempts - 1, progress_step=0)
            return Outcome.DEFERRED
        except StorageUnavailable as error:
            log.warning("job %s: results could not be stored; handing it back: %s", job_id, error)
            # Not a crash: the attempt is given back, and the error says why the job waits.
            store.transition(
                job_id,
                JobStatus.QUEUED,
                attempts=attempts - 1,
                progress_step=0,
                error=f"storage unavailable, retrying: {error}",
            )
            raise
        except StoreUnavailable:
            raise
        except Exception as error:
            if isinstance(error, (ValueError, ModelError)):
                message = str(error)
            else:
                # A bug, or the device failing (out of memory): left running, the job would
                # wait for a retry that never comes.
                log.exception("job %s: rendering failed", job_id)
                message = f"the worker failed: {type(error).__name__}: {error}"
            _finish(store, job_id, JobStatus.FAILED, record, error=message, started_at=started_at)
            return Outcome.DONE

    images = len(job.result["images"])
    succeeded = store.transition(
        job_id,
        JobStatus.SUCCEEDED,
        finished_at=finished_at,
        progress_step=record.progress_total,
        result=job.result,
        error=None,
        checkpoint=None,
    )
    if succeeded is None:  # canceled or failed meanwhile: the objects stay, harmless
        log.info("job %s ended elsewhere while it was being stored", job_id)
        return Outcome.DONE
    store.observe_finished(JobStatus.SUCCEEDED, _seconds_between(started_at, finished_at), images)
    log.info("job %s succeeded in %.1f s", job_id, render_s + upload_s)
    return Outcome.DONE


@dataclass
class _JobRun:
    """Puts a job's objects, keeping the result keys as they become stored."""

    job_id: str
    store: JobStore
    storage: Storage
    heartbeat: Heartbeat
    result: dict[str, Any] = field(default_factory=lambda: {"grid": None, "images": []})

    def put(self, key: str, data: bytes, kind: str = "png") -> None:
        # No retry loop here: S3Storage's client already retries with backoff, and a longer
        # outage is the caller's to retry (the job is handed back).
        if self.heartbeat.lost.is_set():
            raise _LeaseLost
        content_type = "application/json" if kind == "json" else "image/png"
        self.storage.put(key, data, content_type)

    def store_checkpoint(self, step: int, tokens: list[list[int]]) -> None:
        if self.heartbeat.lost.is_set():
            raise _LeaseLost
        try:
            self.store.update(self.job_id, checkpoint=encode_tokens(tokens))
        except StoreUnavailable as error:  # the next checkpoint may get through
            log.warning("job %s: could not save its checkpoint: %s", self.job_id, error)

    def store_preview(self, frame: int, png: bytes) -> None:
        key = preview_key(self.job_id, frame)
        self.put(key, png)
        previews: list[str] = self.result.setdefault("previews", [])
        previews.append(key)
        # Shown at once: GET /v1/jobs/{id} lists it, and the job's event stream sends it.
        try:
            self.store.update(self.job_id, result=copy.deepcopy(self.result))
        except StoreUnavailable as error:  # the next preview, or the result, carries it
            log.warning("job %s: could not record preview %d: %s", self.job_id, frame, error)

    def store_results(self, rendered: RenderedImages, threads: int) -> None:
        """Upload the tiles and the grid side by side, on up to `threads` threads of this job's
        own; return once all are stored, or raise the first failure (StorageUnavailable,
        _LeaseLost) once none is still being uploaded."""
        images = [image_key(self.job_id, i) for i in range(len(rendered.tile_pngs))]
        objects = [*zip(images, rendered.tile_pngs, strict=True)]
        objects.append((grid_key(self.job_id), rendered.grid_png))
        upload_all(lambda item: self.put(*item), objects, threads)
        self.result["images"] = images
        self.result["grid"] = grid_key(self.job_id)


def _checkpoint_tokens(record: JobRecord, params: JobParams) -> list[list[int]] | None:
    """The tokens an earlier attempt saved, if they fit the job; a bad checkpoint is ignored."""
    if record.checkpoint is None:
        return None
    try:
        tokens = decode_tokens(record.checkpoint)
    except ValueError as error:
        log.warning("job %s: ignoring its checkpoint: %s", record.id, error)
        return None
    if len(tokens) != params.grid_size**2 or not 0 < len(tokens[0]) < record.progress_total:
        log.warning("job %s: ignoring a checkpoint that does not fit the job", record.id)
        return None
    return tokens


def _finish(
    store: JobStore,
    job_id: str,
    status: JobStatus,
    record: JobRecord,
    *,
    error: str | None = None,
    started_at: str | None = None,
) -> None:
    finished_at = utc_now()
    changes = {"finished_at": finished_at, "error": error, "checkpoint": None}
    if store.transition(job_id, status, **changes) is None:
        return
    if error is not None:
        log.warning("job %s %s: %s", job_id, status.value, error)
    since = started_at or record.started_at or record.created_at
    store.observe_finished(status, _seconds_between(since, finished_at), 0)


def _seconds_between(start: str, end: str) -> float:
    try:
        delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    except ValueError:
        return 0.0
    return round(max(delta.total_seconds(), 0.0), 3)
