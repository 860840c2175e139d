"""What bench/bench_farm_gpu.py measures around a farm run: the clients' load (submit, then
poll each job to its end), GPU samples, latency percentiles, where the worker's time went
(job.json timings), whether every job ran exactly once, and the printed summary.

Kept apart from the driver, which starts and stops farms; this module only loads one through
its REST API and reads what the run left behind.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from bench.bench_batch import Job
from bench.bench_farm import timestamp
from core.job import job_json_key
from core.storage import Storage

# job.json "timings" keys the bench reads when present. Today's worker writes queued_s,
# render_s and upload_s; the rest are the split it asks the worker for (see BENCHMARKS.md).
TIMING_KEYS = (
    "queued_s",  # created_at → started_at
    "render_s",  # Engine.render: waiting for rows, encode, decode, VQGAN, PNGs
    "batch_wait_s",  # asked for: in the BatchEngine's queue until the job's rows fit
    "decode_s",  # asked for: encode + 256 decoder steps, as the job saw them
    "vqgan_s",  # asked for: detokenize, including the copy to the host
    "png_s",  # asked for: the grid's and the tiles' PNG encodes
    "upload_s",  # the tiles and the grid stored
    "store_s",  # asked for: the job's store writes while it ran (progress, checkpoints)
)
# job.json "engine" keys (asked for): the worker process's state when the job finished.
ENGINE_KEYS = ("graph_captures", "cuda_memory_allocated", "cuda_max_memory_allocated", "batch_rows")
# The worker's log line per CUDA graph capture (model/batch_forward.py PagedForward._replay):
# its running totals of captures, and of those, of layouts captured before and dropped since.
CAPTURE_LOG = re.compile(r"CUDA graph captured: .*?\((\d+) captures, (\d+) of them again")
ATTEMPT_LOG = re.compile(r"job (\S+): attempt (\d+) on")
SUCCEEDED_LOG = re.compile(r"job (\S+) succeeded in")
POLL_S = 0.2  # between two rounds of a client's GETs
NVIDIA_SMI_QUERY = [
    "nvidia-smi",
    "--query-gpu=utilization.gpu,memory.used",
    "--format=csv,noheader,nounits",
    "-lms",
    "500",
]


def percentiles(values: Iterable[float]) -> dict[str, float | int]:
    """count, mean, p50, p90, p99 and max (nearest-rank), of seconds."""
    ordered = sorted(values)
    if not ordered:
        return {"count": 0}

    def rank(fraction: float) -> float:
        return ordered[max(0, -(-int(fraction * 1000) * len(ordered) // 1000) - 1)]

    return {
        "count": len(ordered),
        "mean": round(statistics.fmean(ordered), 4),
        "p50": round(rank(0.50), 4),
        "p90": round(rank(0.90), 4),
        "p99": round(rank(0.99), 4),
        "max": round(ordered[-1], 4),
    }


@dataclass
class GpuSampler:
    """`nvidia-smi -lms 500` in a subprocess: (time.time(), utilization %, MiB used) samples.

    Without nvidia-smi (the CPU) it samples nothing and every summary says "n/a".
    """

    samples: list[tuple[float, float, float]] = field(default_factory=list)
    process: subprocess.Popen[str] | None = None
    _thread: threading.Thread | None = None

    @property
    def available(self) -> bool:
        return self.process is not None

    def start(self) -> GpuSampler:
        if shutil.which("nvidia-smi") is None:
            return self
        self.process = subprocess.Popen(
            NVIDIA_SMI_QUERY, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self._thread = threading.Thread(target=self._read, name="nvidia-smi", daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            parts = [part.strip() for part in line.split(",")]
            try:  # one line per GPU; the benchmark's GPU is the first one listed
                self.samples.append((time.time(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def summary(self, start: float, end: float) -> dict[str, Any] | str:
        """Utilization and memory between two time.time() instants."""
        if not self.available:
            return "n/a"
        window = [sample for sample in self.samples if start <= sample[0] <= end]
        if not window:
            return "no samples"
        utilization = [sample[1] for sample in window]
        return {
            "samples": len(window),
            "utilization_mean_pct": round(statistics.fmean(utilization), 1),
            "utilization_p50_pct": statistics.median(utilization),
            "memory_peak_mib": max(sample[2] for sample in window),
            "memory_end_mib": window[-1][2],
        }


@dataclass
class ClientJob:
    """One job as a client saw it: when it was sent, accepted and first seen succeeded."""

    id: str
    sent_at: float
    accepted_at: float
    seen_done_at: float = 0.0
    status: str = "queued"
    record: dict[str, Any] = field(default_factory=dict)  # the last GET /v1/jobs/{id} answer


def latency_report(jobs: list[ClientJob]) -> dict[str, Any]:
    """Per-job latency percentiles: as the client saw them, and from the job's own times."""

    def between(job: ClientJob, start: str, end: str) -> float:
        return timestamp(job.record[end]) - timestamp(job.record[start])

    done = [job for job in jobs if job.status == "succeeded"]
    return {
        "client_submit_to_succeeded_s": percentiles(j.seen_done_at - j.sent_at for j in done),
        "client_submit_answer_s": percentiles(j.accepted_at - j.sent_at for j in jobs),
        "created_to_finished_s": percentiles(between(j, "created_at", "finished_at") for j in done),
        "queued_s": percentiles(between(j, "created_at", "started_at") for j in done),
        "started_to_finished_s": percentiles(between(j, "started_at", "finished_at") for j in done),
    }


def read_job_jsons(storage: Storage, ids: list[str], threads: int = 16) -> dict[str, dict]:
    """jobs/{id}/job.json for each id that has one."""

    def read(job_id: str) -> tuple[str, dict | None]:
        try:
            return job_id, json.loads(storage.get(job_json_key(job_id)))
        except Exception:  # a missing one is counted by the integrity check
            return job_id, None

    with ThreadPoolExecutor(threads) as pool:
        return {job_id: data for job_id, data in pool.map(read, ids) if data is not None}


def time_split(job_jsons: dict[str, dict], jobs: list[ClientJob]) -> dict[str, Any]:
    """Where the worker's time went, per job: each job.json timing present, and the rest."""
    timings = [data.get("timings", {}) for data in job_jsons.values()]
    split: dict[str, Any] = {
        key: percentiles(float(t[key]) for t in timings if key in t)
        for key in TIMING_KEYS
        if any(key in t for t in timings)
    }
    split["missing"] = [key for key in TIMING_KEYS if key not in split]
    # started → finished beyond render and upload: lease, progress, store writes, job.json prep.
    rest = []
    for job in jobs:
        t = job_jsons.get(job.id, {}).get("timings", {})
        if job.record.get("finished_at") and "render_s" in t and "upload_s" in t:
            run_s = timestamp(job.record["finished_at"]) - timestamp(job.record["started_at"])
            rest.append(run_s - float(t["render_s"]) - float(t["upload_s"]))
    split["started_to_finished_minus_render_upload_s"] = percentiles(rest)
    # finished_at → the client saw succeeded: job.json put, the transition, the poll interval.
    split["finished_to_client_seen_s"] = percentiles(
        job.seen_done_at - timestamp(job.record["finished_at"])
        for job in jobs
        if job.status == "succeeded" and job.record.get("finished_at")
    )
    engines = [
        data["engine"] for data in job_jsons.values() if isinstance(data.get("engine"), dict)
    ]
    if engines:
        split["engine"] = {
            key: {"first": engines[0].get(key), "last": engines[-1].get(key)}
            for key in ENGINE_KEYS
            if key in engines[0]
        }
    return split


def integrity(
    submitted: list[str],
    listed: list[dict[str, Any]],
    storage: Storage,
    log_text: str,
    threads: int = 16,
) -> dict[str, Any]:
    """Every submitted id reached succeeded exactly once, the store has exactly these jobs, and
    every result object (grid, tiles, job.json) is stored."""
    listed_ids = [job["id"] for job in listed]
    wanted = set(submitted)
    by_id = {job["id"]: job for job in listed}
    succeeded = [
        job_id for job_id in submitted if by_id.get(job_id, {}).get("status") == "succeeded"
    ]
    attempts = Counter(match.group(1) for match in ATTEMPT_LOG.finditer(log_text))
    successes = Counter(match.group(1) for match in SUCCEEDED_LOG.finditer(log_text))

    def keys(job: dict[str, Any]) -> list[str]:
        result = job.get("result") or {}
        return [
            (result.get("grid") or {}).get("key", ""),
            *(image.get("key", "") for image in result.get("images", [])),
            job_json_key(job["id"]),
        ]

    objects = [key for job_id in succeeded for key in keys(by_id[job_id])]
    with ThreadPoolExecutor(threads) as pool:
        present = list(pool.map(lambda key: bool(key) and storage.exists(key), objects))
    return {
        "submitted": len(submitted),
        "submitted_unique": len(wanted),
        "store_jobs": len(listed_ids),
        "store_unique": len(set(listed_ids)),
        "store_equals_submitted": set(listed_ids) == wanted and len(listed_ids) == len(wanted),
        "succeeded": len(succeeded),
        "attempts_over_1": sum(1 for i in succeeded if by_id[i].get("attempts", 0) != 1),
        "log_attempt_lines_not_1": sum(1 for i in submitted if attempts.get(i, 0) != 1),
        "log_succeeded_lines_not_1": sum(1 for i in submitted if successes.get(i, 0) != 1),
        "result_objects": len(objects),
        "result_objects_missing": present.count(False),
    }


def captures(log_text: str) -> dict[str, int]:
    """CUDA graph captures the worker logged: lines, and the last running totals (all 0 on the
    CPU, which captures none)."""
    found = CAPTURE_LOG.findall(log_text)
    total, again = (int(found[-1][0]), int(found[-1][1])) if found else (0, 0)
    return {"lines": len(found), "captures": total, "recaptures": again}


def job_body(job: Job, args: argparse.Namespace) -> dict[str, Any]:
    return {"seed": job.seed, "grid_size": args.grid_size, "model": args.model}


def run_load(farm: Any, jobs: list[Job], args: argparse.Namespace) -> list[ClientJob]:
    """Each of --clients threads submits its share of `jobs` (round robin), then polls its own
    jobs until every one has ended; fails if any did not succeed within --timeout-s."""
    shares = [jobs[i :: args.clients] for i in range(min(args.clients, len(jobs)))]
    deadline = time.monotonic() + args.timeout_s

    def client_thread(share: list[Job]) -> list[ClientJob]:
        seen: list[ClientJob] = []
        with farm.client() as client:
            for job in share:
                sent = time.time()
                answer = client.submit(job.text, **job_body(job, args))
                seen.append(ClientJob(answer.id, sent, time.time(), record=answer.raw))
            pending = list(seen)
            while pending:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(pending)} job(s) not finished in {args.timeout_s} s")
                for entry in list(pending):
                    answer = client.get(entry.id)
                    entry.record, entry.status = answer.raw, answer.status
                    if answer.status in ("succeeded", "failed", "canceled"):
                        entry.seen_done_at = time.time()
                        pending.remove(entry)
                if pending:
                    time.sleep(POLL_S)
        return seen

    with ThreadPoolExecutor(len(shares)) as pool:
        results = [entry for share in pool.map(client_thread, shares) for entry in share]
    failed = [entry for entry in results if entry.status != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) did not succeed, e.g. {failed[0].record}")
    return results


def summary(results: dict[str, Any]) -> str:
    lines = ["", "| part | jobs | images/s | client p50 s | p90 s | p99 s | max s | GPU util % |"]
    lines.append("|---|---|---|---|---|---|---|---|")
    for name, part in results.items():
        if not isinstance(part, dict) or "latency" not in part:
            continue
        client = part["latency"]["client_submit_to_succeeded_s"]
        gpu = part["gpu"]
        util = gpu.get("utilization_mean_pct", "n/a") if isinstance(gpu, dict) else gpu
        lines.append(
            f"| {name} | {part['jobs']} | {part['images_per_s']} | {client['p50']} "
            f"| {client['p90']} | {client['p99']} | {client['max']} | {util} |"
        )
    cold = results.get("cold_start", {})
    lines.append(f"cold start: {json.dumps({k: v for k, v in cold.items() if k != 'gpu'})}")
    if "steady" in results:
        lines.append(f"steady integrity: {json.dumps(results['steady']['integrity'])}")
    if "baselines" in results:
        lines.append(f"baselines: {json.dumps(results['baselines'])}")
    return "\n".join(lines)
