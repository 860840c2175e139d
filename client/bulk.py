"""`run_bulk`: render a plan of jobs (client.rows) into a dataset (client.dataset), resumably.

`concurrency` threads each take one job at a time through its life: submit, wait, download
its images and stage them. The calling thread writes the dataset (shards or files) and the
manifest, so no two threads ever write the same file.

A job's Idempotency-Key is ``dalle-farm-bulk:{dataset id}:{job key}:{attempt}``: the same on
every run of the same input and settings, so a re-run re-attaches to the jobs an earlier run
submitted instead of creating new ones. A job that fails on the server is tried again, under
the next attempt's key, until `max_attempts` attempts failed, counting earlier runs'. Errors
that are not the job's (the server unreachable after the client's retries, say) are reported
and left for the next run, which re-attaches.

Jobs are submitted with `priority: "bulk"` (BulkOptions.priority): the farm's workers take
interactive jobs first (README: Priority lanes). It is not part of the plan nor of the jobs'
fingerprints, so a run may change it and still resume.

Setting `stop` (Ctrl-C, in the CLI) stops the run between steps: the jobs already submitted
keep running on the farm, images already downloaded stay staged, and the next run takes both
up. The dataset's last, partial shard is written only when a run ends without being stopped.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from client.dataset import FORMATS, DatasetWriter, OutputDir, utc_now
from client.errors import FarmError
from client.http import FarmClient, Job
from client.rows import PlannedJob
from core.contract import PRIORITIES

BULK = "bulk"


@dataclass(frozen=True)
class BulkOptions:
    """Where and how a run writes: `shard_size` is in images (webdataset); `max_attempts`
    counts a job's failed attempts on the server over all runs; `priority` is the jobs' lane
    on the farm ("bulk", or "interactive")."""

    out_dir: Path
    format: str = "webdataset"
    concurrency: int = 4
    max_attempts: int = 3
    shard_size: int = 1000
    priority: str = BULK

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.priority not in PRIORITIES:
            raise ValueError(
                f"priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}"
            )
        if self.concurrency < 1 or self.max_attempts < 1 or self.shard_size < 1:
            raise ValueError("concurrency, max_attempts and shard_size must be at least 1")


@dataclass(frozen=True)
class Failure:
    """A job that is not in the dataset at the end of a run, and why."""

    job: PlannedJob
    error: str
    failed_attempts: int


@dataclass
class BulkResult:
    planned: int
    finished: int
    resumed: int
    failures: list[Failure] = field(default_factory=list)
    stopped: bool = False
    manifest: Path | None = None


class Progress(Protocol):
    """What run_bulk needs of a progress bar (tqdm has it)."""

    def update(self, n: int = 1) -> object: ...

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> object: ...

    def close(self) -> object: ...


ProgressFactory = Callable[[int, int], Progress]  # (total jobs, jobs already done) → a bar


def idempotency_key(dataset: str, job: PlannedJob, attempt: int) -> str:
    """The Idempotency-Key of a job's attempt in a dataset: stable across runs."""
    return f"dalle-farm-bulk:{dataset[:32]}:{job.key}:{attempt}"


def run_bulk(
    client: FarmClient,
    jobs: list[PlannedJob],
    dataset: str,
    options: BulkOptions,
    *,
    progress: ProgressFactory | None = None,
    stop: threading.Event | None = None,
) -> BulkResult:
    """Render `jobs` (planned from input whose rows hash to `dataset`) into options.out_dir,
    taking up what earlier runs of the same plan did. Raises OutputError if the folder holds
    another dataset or another run is writing to it."""
    stop = stop if stop is not None else threading.Event()
    output = OutputDir(options.out_dir)
    output.open(dataset, options.format)
    try:
        writer = DatasetWriter(output, options.format, options.shard_size)
        done = output.done_records()
        writer.resume(done)
        failed_attempts = output.failures()
        result = BulkResult(planned=len(jobs), finished=len(done), resumed=len(done))
        todo: list[tuple[PlannedJob, int]] = []
        for job in jobs:
            if job.key in done:
                continue
            failed = failed_attempts.get(job.key, [])
            if len(failed) >= options.max_attempts:
                last = f"job {failed[-1].get('job_id')} {failed[-1].get('status')}: "
                last += str(failed[-1].get("error") or "no error given")
                reason = f"failed {len(failed)} times (--max-attempts); the last: {last}"
                result.failures.append(Failure(job, reason, len(failed)))
            else:
                todo.append((job, len(failed)))
        bar = progress(len(jobs), len(done)) if progress is not None else None
        renderer = _Renderer(
            client, output, dataset, options.max_attempts, stop, priority=options.priority
        )
        pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="bulk")
        try:
            pending: set[Future[dict[str, Any] | Failure | None]] = {
                pool.submit(renderer.render, job, attempts) for job, attempts in todo
            }
            while pending and not stop.is_set():
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for future in finished:
                    outcome = future.result()
                    if outcome is None:
                        continue
                    if isinstance(outcome, Failure):
                        result.failures.append(outcome)
                        if bar is not None:
                            bar.set_postfix_str(f"{len(result.failures)} failed")
                    else:
                        writer.add(outcome)
                        result.finished += 1
                        if bar is not None:
                            bar.update(1)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()
        result.stopped = bool(pending)
        if not result.stopped:
            writer.finish()
        result.manifest = writer.write_manifest()
        return result
    finally:
        output.close()


class _Stopped(Exception):
    """The run was stopped while this job was in flight."""


class _Renderer:
    """One job at a time per calling thread: submit, wait, download, stage."""

    def __init__(
        self,
        client: FarmClient,
        output: OutputDir,
        dataset: str,
        max_attempts: int,
        stop: threading.Event,
        *,
        priority: str = BULK,
    ) -> None:
        self.client = client
        self.output = output
        self.dataset = dataset
        self.max_attempts = max_attempts
        self.stop = stop
        self.priority = priority

    def render(self, job: PlannedJob, attempt: int) -> dict[str, Any] | Failure | None:
        """The job's staged record, why it is not done, or None if the run was stopped."""
        while True:
            key = idempotency_key(self.dataset, job, attempt)
            try:
                body = {**job.params, "priority": self.priority}
                submitted = self.client.submit(idempotency_key=key, **body)
                finished = self.client.wait(submitted.id, raise_on_failure=False, stop=self.stop)
                if not finished.is_finished:
                    raise _Stopped
                if finished.status == "succeeded":
                    return self._stage(job, finished, key, attempt)
            except _Stopped:
                return None
            except FarmError as error:
                return Failure(job, str(error), attempt)
            self.output.record_failure(
                job.key,
                attempt,
                {"job_id": finished.id, "status": finished.status, "error": finished.error},
            )
            attempt += 1
            if attempt >= self.max_attempts or self.stop.is_set():
                reason = f"{finished.status}: {finished.error or 'no error given'}"
                return Failure(job, f"job {finished.id} {reason}", attempt)

    def _stage(self, job: PlannedJob, finished: Job, key: str, attempt: int) -> dict[str, Any]:
        expected = job.params["grid_size"] ** 2
        if len(finished.images) != expected:
            raise FarmError(
                f"job {finished.id} has {len(finished.images)} images, expected {expected}"
            )
        images: list[bytes] = []
        for image in finished.images:
            if self.stop.is_set():
                raise _Stopped
            images.append(self.client.download(image))
        record = {
            "key": job.key,
            "row": job.row,
            "line": job.line,
            "sample": job.sample,
            "params": job.params,
            "job_id": finished.id,
            "idempotency_key": key,
            "attempt": attempt,
            "created_at": finished.created_at,
            "started_at": finished.started_at,
            "finished_at": finished.finished_at,
            "downloaded_at": utc_now(),
            "images": [
                {
                    "key": f"{job.key}_{tile:02d}",
                    "tile": tile,
                    "storage_key": image.key,
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                for tile, (image, data) in enumerate(zip(finished.images, images, strict=True))
            ],
        }
        self.output.stage(record, images)
        return record
