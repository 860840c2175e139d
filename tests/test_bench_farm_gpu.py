"""bench/bench_farm_gpu.py in its smallest form: a real `dalle-farm serve` on the small random
model (CPU), a few jobs, and the JSON it writes checked for structure and consistency (no
timing thresholds). Also the percentile and log-parsing helpers it reports with."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from bench import bench_farm_gpu
from bench.farm_gpu_measure import captures, percentiles
from tests.farm_helpers import AWS_ENV, AWS_ENV_REMOVED

LATENCIES = (
    "client_submit_to_succeeded_s",
    "created_to_finished_s",
    "queued_s",
    "started_to_finished_s",
)


def ordered(stats: dict) -> bool:
    return stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_percentiles_are_nearest_rank() -> None:
    stats = percentiles([5.0, 1.0, 3.0, 2.0, 4.0] * 20)  # 100 values, 20 of each
    assert stats["count"] == 100
    assert (stats["p50"], stats["p90"], stats["p99"], stats["max"]) == (3.0, 5.0, 5.0, 5.0)
    assert stats["mean"] == 3.0
    assert percentiles([]) == {"count": 0}
    assert percentiles([7.0])["p50"] == 7.0


def test_captures_reads_the_workers_running_totals() -> None:
    log = (
        "x CUDA graph captured: 1 pages, 4 slots, top-k width 256 (1 captures, 0 of them again"
        " after being dropped)\n"
        "y CUDA graph captured: 2 pages, 9 slots, top-k width 256 (7 captures, 2 of them again"
        " after being dropped)\n"
    )
    assert captures(log) == {"lines": 2, "captures": 7, "recaptures": 2}
    assert captures("no graphs here") == {"lines": 0, "captures": 0, "recaptures": 0}


def test_smallest_run_writes_consistent_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # main() sets fake AWS credentials and a SIGTERM handler: put both back afterwards.
    for name in [*AWS_ENV, *AWS_ENV_REMOVED]:
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    monkeypatch.setattr(signal, "signal", lambda *args: None)
    out = tmp_path / "farm.json"
    counts = [1]
    steady = 2
    results = bench_farm_gpu.main(
        ["--small", "--jobs", ",".join(map(str, counts)), "--steady-jobs", str(steady),
         "--max-jobs", "1", "--clients", "2", "--timeout-s", "200", "--out", str(out)]
    )  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(results, default=str))

    cold = results["cold_start"]
    assert 0 < cold["healthz_s"] <= cold["readyz_s"] < cold["start_to_first_job_done_s"]
    assert cold["first_job_s"] > 0 and cold["second_job_s"] > 0
    assert len(cold["worker_batch_rows"]) == 1  # one worker, started once
    assert results["baselines"]["batch_rows"] >= 2

    for name, jobs in [*((f"e2e {n}", n) for n in counts), ("steady", steady)]:
        part = results[name]
        assert part["jobs"] == jobs and part["images"] == jobs  # grid 1 in --small
        assert part["images_per_s"] == pytest.approx(jobs / part["wall_s"], rel=0.01)
        assert part["gpu"] == "n/a"  # no nvidia-smi here
        for key in LATENCIES:
            stats = part["latency"][key]
            assert stats["count"] == jobs and ordered(stats), (name, key, stats)
        # The client sees a job succeed after the store says it finished, never before.
        client = part["latency"]["client_submit_to_succeeded_s"]
        assert client["max"] >= part["latency"]["started_to_finished_s"]["max"]
        worker = part["worker_time"]
        for key in ("queued_s", "render_s", "upload_s"):  # what today's worker records
            assert worker[key]["count"] == jobs and ordered(worker[key])
        assert set(worker["missing"]).isdisjoint(worker)

    checks = results["steady"]["integrity"]
    total = 2 + 1 + sum(counts) + steady  # cold start, warm-up (--max-jobs), parts, steady
    assert checks["submitted"] == checks["submitted_unique"] == total
    assert checks["store_jobs"] == checks["store_unique"] == checks["succeeded"] == total
    assert checks["store_equals_submitted"] is True
    assert checks["attempts_over_1"] == 0
    assert checks["log_attempt_lines_not_1"] == checks["log_succeeded_lines_not_1"] == 0
    assert checks["result_objects"] == 3 * total  # grid, one tile, job.json
    assert checks["result_objects_missing"] == 0
    assert results["steady"]["cuda_graphs"]["captured_during_steady_state"] == 0  # CPU

    baselines = results["baselines"]
    for count in counts:
        for case in ("decode_vqgan", "engine_render"):
            assert baselines[f"{case} {count}"]["wall_s"] > 0
    assert "e2e 1" in bench_farm_gpu.summary(results)
