"""The chaos soak's records and checks: what the load and the faults recorded (`Accepted`,
`Fault`), the report (`SoakReport`), and `check`, which reads the store and S3 directly once the
farm has drained and lists every broken invariant in report.problems:

- every accepted job is in the store once: one job per text (each submit has its own text and
  Idempotency-Key), and no job id answered for two submits;
- each is `succeeded`, with its grid, its tile and job.json in S3 and job.json matching the
  record (id, params, seed, result), or `failed` with a non-empty error; none queued, running
  or canceled (nor any job the client never saw accepted);
- `/metrics`' dalle_farm_jobs counts equal the records' counts per status;
- after each fault some job succeeds, if any job was accepted after it.

The recovery of a fault: seconds from its end until the first job that succeeds after it
finishes (finished_at); the report gives the longest.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from core.job import JobRecord, JobStatus, job_json_key
from tests.farm_helpers import http

if TYPE_CHECKING:
    from tests.soak.harness import SoakFarm

log = logging.getLogger("soak")


@dataclass
class Accepted:
    id: str
    idempotency_key: str
    text: str
    seed: int
    priority: str
    api: int
    at: float


@dataclass
class Fault:
    kind: str
    started_at: float  # time.time()
    ended_at: float
    detail: str
    done: bool = True  # False: the harness could not do it (see the detail)
    recovery_s: float | None = None


@dataclass
class SoakReport:
    duration_s: float
    accepted: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0  # attempts > 1
    resumed: int = 0  # succeeded after a redelivery from a checkpoint
    gave_up_submits: int = 0  # the client's retries ran out: not accepted
    unacknowledged: int = 0  # in the store, but the client never saw a 2xx
    faults: dict[str, int] = field(default_factory=dict)
    longest_recovery_s: float | None = None
    longest_recovery_fault: str | None = None
    fault_log: list[dict[str, Any]] = field(default_factory=list)
    failed_errors: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    # Accepted jobs missing from the store that were accepted while a failover ran.
    metrics: dict[str, Any] = field(default_factory=dict)

    def table(self) -> str:
        rows = [
            ("duration (s)", f"{self.duration_s:.0f}"),
            ("jobs accepted", self.accepted),
            ("succeeded", self.succeeded),
            ("failed", self.failed),
            ("retried (attempts > 1)", self.retried),
            ("resumed from checkpoint", self.resumed),
            ("submits given up", self.gave_up_submits),
            ("faults", ", ".join(f"{k} {v}" for k, v in self.faults.items())),
            (
                "longest recovery (s)",
                "-"
                if self.longest_recovery_s is None
                else f"{self.longest_recovery_s:.1f} ({self.longest_recovery_fault})",
            ),
            ("other problems", len(self.problems)),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)

    def write(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"soak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def drain(farm: SoakFarm, accepted: list[Accepted], bound_s: float) -> None:
    """Wait (at most bound_s) until no accepted job is queued or running."""
    pending = {job.id for job in accepted}
    deadline = time.monotonic() + bound_s
    while pending and time.monotonic() < deadline:
        for job_id in list(pending):
            record = farm.store.get_job(job_id)
            if record is None or record.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                pending.discard(job_id)
        time.sleep(1)
    log.info("drained; %d still queued or running", len(pending))


def all_jobs(farm: SoakFarm) -> list[JobRecord]:
    jobs: list[JobRecord] = []
    cursor = None
    while True:
        page, cursor = farm.store.list_jobs(farm.owner, cursor=cursor, limit=200)
        jobs.extend(page)
        if cursor is None:
            return jobs


def metrics_job_counts(farm: SoakFarm) -> dict[str, int]:
    status, _, body = http("GET", f"{farm.api_url(0)}/metrics", timeout_s=30)
    assert status == 200, body[:300]
    found = re.findall(rb'^dalle_farm_jobs\{status="(\w+)"\} ([0-9.e+]+)$', body, re.M)
    return {name.decode(): int(float(value)) for name, value in found}


def check(
    farm: SoakFarm,
    accepted: list[Accepted],
    gave_up: list[str],
    faults: list[Fault],
    fault_errors: list[str],
    duration_s: float,
) -> SoakReport:
    """The invariants; each broken one is a line in report.problems."""
    report = SoakReport(duration_s=duration_s, accepted=len(accepted))
    problems = report.problems
    problems.extend(f"fault schedule: {error}" for error in fault_errors)
    report.gave_up_submits = len(gave_up)
    stored = all_jobs(farm)
    by_text: dict[str, list[JobRecord]] = {}
    for record in stored:
        by_text.setdefault(str(record.params.get("text")), []).append(record)
    accepted_texts = {job.text for job in accepted}
    for text, records in by_text.items():
        if len(records) > 1:
            problems.append(
                f"duplicate: {len(records)} jobs for {text!r}: {[r.id for r in records]}"
            )
        if text not in accepted_texts:
            report.unacknowledged += 1
    if len({job.id for job in accepted}) != len(accepted):
        problems.append("one job id was answered for two different submits")
    for job in accepted:
        record = farm.store.get_job(job.id)
        if record is None:
            window = next((f for f in faults if f.started_at <= job.at <= f.ended_at + 1), None)
            during = f"; accepted during the {window.kind}" if window is not None else ""
            lost = f"lost: job {job.id} ({job.idempotency_key}) is not in the store"
            problems.append(lost + during)
            continue
        problems.extend(check_record(farm, job, record, report))
    # Jobs the client never saw accepted must not be stuck either.
    for record in stored:
        if record.status in (JobStatus.QUEUED, JobStatus.RUNNING) and record.id not in {
            job.id for job in accepted
        }:
            problems.append(f"stuck (unacknowledged): job {record.id} is {record.status.value}")
    # Read side by side (a job still moving between two reads is no mismatch).
    for _ in range(5):
        exposed = metrics_job_counts(farm)
        counts = Counter(record.status.value for record in all_jobs(farm))
        if all(exposed.get(s.value, 0) == counts.get(s.value, 0) for s in JobStatus):
            break
        time.sleep(2)
    report.metrics = {"store_records": dict(counts), "metrics": exposed}
    for status in JobStatus:
        if exposed.get(status.value, 0) != counts.get(status.value, 0):
            problems.append(
                f"metrics: dalle_farm_jobs{{status={status.value!r}}} is "
                f"{exposed.get(status.value)}; the store has {counts.get(status.value, 0)}"
            )
    # Faults done; one that could not be done is a problem (fault_errors), not a fault.
    report.faults = dict(Counter(fault.kind for fault in faults if fault.done))
    successes = sorted(
        parse_time(r.finished_at)
        for r in stored
        if r.status is JobStatus.SUCCEEDED and r.finished_at
    )
    for fault in faults:
        after = [t for t in successes if t >= fault.ended_at]
        fault.recovery_s = round(after[0] - fault.ended_at, 2) if after else None
        if fault.recovery_s is not None and (
            report.longest_recovery_s is None or fault.recovery_s > report.longest_recovery_s
        ):
            report.longest_recovery_s = fault.recovery_s
            report.longest_recovery_fault = fault.kind
        # Not recovered: a job was accepted after the fault, yet none succeeded after it.
        if not after and any(job.at >= fault.ended_at for job in accepted):
            problems.append(f"no job succeeded after the {fault.kind} fault ended")
    report.fault_log = [asdict(fault) for fault in faults]
    return report


def check_record(farm: SoakFarm, job: Accepted, record: JobRecord, report: SoakReport) -> list[str]:
    """One accepted job's record and objects."""
    problems: list[str] = []
    where = f"job {job.id} ({job.idempotency_key})"
    submitted = {"text": job.text, "seed": job.seed, "grid_size": 1, "priority": job.priority}
    differs = {k: record.params.get(k) for k, v in submitted.items() if record.params.get(k) != v}
    if record.owner != farm.owner or differs:
        problems.append(f"{where}: the record is not what was submitted: {differs}")
    if record.attempts > 1:
        report.retried += 1
    if record.status is JobStatus.FAILED:
        report.failed += 1
        report.failed_errors[job.id] = record.error or ""
        if not (record.error or "").strip():
            problems.append(f"{where}: failed without an error")
        return problems
    if record.status is not JobStatus.SUCCEEDED:
        return [*problems, f"{where}: {record.status.value} at the end (stuck or canceled)"]
    report.succeeded += 1
    assert farm.services is not None
    storage = farm.services.storage
    result = record.result or {}
    keys = [result.get("grid"), *(result.get("images") or [])]
    if result.get("grid") is None or len(keys) != 2:
        problems.append(f"{where}: succeeded with result {result}")
    missing = [key for key in [*keys, job_json_key(job.id)] if key and not storage.exists(key)]
    if missing:
        return [*problems, f"{where}: succeeded, but S3 lacks {missing}"]
    stored = json.loads(storage.get(job_json_key(job.id)))
    if stored.get("resumed_from"):
        report.resumed += 1
    if (
        stored.get("id") != job.id
        or stored.get("seed") != record.params.get("seed")
        or stored.get("params") != record.params
        or stored.get("result") != record.result
    ):
        problems.append(f"{where}: job.json does not match the record: {stored} vs {record}")
    return problems


def parse_time(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
