"""Farm benchmark (issue 4): small-model jobs through the whole farm on CPU, and the model alone.

Starts a farm of its own on loopback, with nothing shared with the machine: redis-server and
moto's S3 server on free ports, `dalle-farm api` and `dalle-farm worker --gpus cpu
--concurrency N` subprocesses, small random weights (`model.weights.random_weights`, the real VQGAN)
unless --models-root names others. Once the worker has rendered a few untimed warm-up jobs, it
submits --jobs jobs (distinct prompts and seeds, grid_size 1, min-dalle's default sampling)
concurrently over HTTP and polls the job list until all have succeeded. Then it stops the farm
and renders the same jobs in this process with the worker's own code (worker.engine.Engine, one
job at a time; with --batch-baseline also all at once through model.batch.BatchDecoder), so
that the model-only time is measured on the same machine in the same run. What each reported
number means is printed with it.

Everything it starts is stopped, and its temporary folder removed, when it ends, also on Ctrl-C
or SIGTERM.

    python -m bench.bench_farm --jobs 40 --worker-concurrency 4
    python -m bench.bench_farm --jobs 40 --worker-concurrency 1 --threads 2 --batch-baseline
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from bench.bench_batch import Job, make_jobs, run_concurrent
from bench.farm_bench import prepare_process, run_main
from core.job import JobParams, job_json_key
from core.services import build_storage
from core.settings import Settings
from model.batch import BatchDecoder
from model.weights.random_weights import SMALL_CONFIG, write_random_weights
from tests.farm_helpers import (
    REPO_ROOT,
    FarmProcess,
    S3Server,
    http,
    http_json,
    subprocess_env,
    wait_for,
    worker_process,
)
from tests.servers import RedisServer, free_port
from worker.engine import Engine

BUCKET = "bench-farm"
POLL_S = 0.5
API_START_S = 60


@dataclass
class FarmResult:
    """What the farm run saw, per job id."""

    submitted_at: float  # time.time() when the first POST was sent
    jobs: dict[str, dict[str, Any]]  # the job as GET /v1/jobs shows it, once succeeded
    job_json: dict[str, dict[str, Any]] = field(default_factory=dict)  # jobs/{id}/job.json
    grids: dict[str, bytes] = field(default_factory=dict)  # the grid PNG from S3

    @property
    def finished_at(self) -> float:
        return max(timestamp(job["finished_at"]) for job in self.jobs.values())

    @property
    def wall_s(self) -> float:
        return self.finished_at - self.submitted_at


def timestamp(iso: str) -> float:
    """A JobRecord time (ISO-8601 with a UTC offset) as seconds since the epoch."""
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def job_body(job: Job) -> dict[str, Any]:
    return {"text": job.text, "seed": job.seed, "grid_size": 1}


# -- the farm ----------------------------------------------------------------------------------


@dataclass
class Farm:
    base_url: str
    secret: str
    api: FarmProcess
    worker: FarmProcess

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    def logs(self) -> str:
        return "\n".join(
            f"--- {process.log_path.name} ---\n{process.log()[-3000:]}"
            for process in (self.api, self.worker)
        )

    def submit(self, jobs: list[Job], threads: int) -> list[str]:
        """POST every job at once from `threads` threads; their ids, in the order of `jobs`."""

        def post(job: Job) -> str:
            status, _, content = http(
                "POST", f"{self.base_url}/v1/jobs", job_body(job), self.auth, timeout_s=120
            )
            if status != 202:
                raise RuntimeError(f"POST /v1/jobs answered {status}: {content[:500]!r}")
            job_id: str = json.loads(content)["id"]
            return job_id

        with ThreadPoolExecutor(max_workers=max(1, min(threads, len(jobs)))) as pool:
            return list(pool.map(post, jobs))

    def listed_jobs(self) -> Iterator[dict[str, Any]]:
        """Every job of our key, from GET /v1/jobs page by page (one request per 100 jobs)."""
        cursor = None
        while True:
            query = "?limit=100" + (f"&cursor={cursor}" if cursor else "")
            page = http_json("GET", f"{self.base_url}/v1/jobs{query}", headers=self.auth)
            yield from page["jobs"]
            cursor = page.get("next_cursor")
            if not cursor:
                return

    def wait_succeeded(self, ids: list[str], timeout_s: float) -> dict[str, dict[str, Any]]:
        """Poll the job list until every job in `ids` has succeeded; fail on any other end."""
        wanted = set(ids)
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            jobs = {job["id"]: job for job in self.listed_jobs() if job["id"] in wanted}
            ended = [job for job in jobs.values() if job["status"] in ("failed", "canceled")]
            if ended:
                raise RuntimeError(f"{len(ended)} job(s) did not succeed, e.g. {ended[0]}")
            done = {job_id: job for job_id, job in jobs.items() if job["status"] == "succeeded"}
            if len(done) == len(wanted):
                return done
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{len(done)} of {len(wanted)} jobs succeeded within {timeout_s:.0f} s"
                )
            time.sleep(POLL_S)

    def check_alive(self) -> None:
        for process in (self.api, self.worker):
            assert process.process is not None
            if process.process.poll() is not None:
                raise RuntimeError(
                    f"`dalle-farm {process.args[0]}` exited with {process.process.returncode}"
                )

    def workers_alive(self) -> int:
        """dalle_farm_workers_alive from /metrics (0 when the API cannot say yet)."""
        try:
            status, _, content = http("GET", f"{self.base_url}/metrics", timeout_s=10)
        except OSError:
            return 0
        if status != 200:
            return 0
        for line in content.decode().splitlines():
            if line.startswith("dalle_farm_workers_alive"):
                return int(float(line.split()[-1]))
        return 0

    def wait_api(self, timeout_s: float) -> None:
        def answers() -> bool:
            self.check_alive()
            try:
                return http("GET", f"{self.base_url}/healthz", timeout_s=5)[0] == 200
            except OSError:  # not listening yet
                return False

        wait_for(answers, timeout_s, "the API to answer", 0.2)

    def wait_worker_ready(self, timeout_s: float) -> None:
        """Until the worker says it is ready in its log, or has a heartbeat on /metrics."""

        def ready() -> bool:
            self.check_alive()
            return "worker(s) ready" in self.worker.log() or self.workers_alive() >= 1

        wait_for(ready, timeout_s, "the worker to be ready", 0.5)


def create_key(env: dict[str, str]) -> str:
    """`dalle-farm keys create bench`: the secret is the last line it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "bench"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"dalle-farm keys create failed: {done.stderr[-2000:]}")
    return done.stdout.strip().splitlines()[-1]


def start_farm(
    stack: contextlib.ExitStack, farm_env: dict[str, str], log_dir: Path, args: argparse.Namespace
) -> Farm:
    """The API and the worker, started (and registered in `stack` to be killed); not yet ready."""
    env = subprocess_env(farm_env)
    if args.threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    secret = create_key(env)
    port = free_port()
    api = FarmProcess(
        ["api", "--port", str(port), "--workers", str(args.api_workers)], env, log_dir / "api.log"
    )
    stack.callback(api.kill_group)
    api.start()
    worker = worker_process(env, log_dir, "bench", ("--concurrency", str(args.worker_concurrency)))
    stack.callback(worker.kill_group)
    worker.start()
    return Farm(f"http://127.0.0.1:{port}", secret, api, worker)


def run_farm(farm: Farm, jobs: list[Job], args: argparse.Namespace) -> FarmResult:
    farm.wait_api(API_START_S)
    farm.wait_worker_ready(args.timeout_s)
    # As many warm-up jobs as the worker runs at once, so that every pool process (or the batch
    # engine at full width) has run before the clock starts.
    warm_up = make_jobs(args.worker_concurrency, first_seed=1_000_000)
    print(f"worker ready; {len(warm_up)} warm-up job(s)")
    farm.wait_succeeded(farm.submit(warm_up, args.submit_threads), args.timeout_s)

    print(f"submitting {len(jobs)} jobs")
    submitted_at = time.time()
    ids = farm.submit(jobs, args.submit_threads)
    print(f"submitted in {time.time() - submitted_at:.2f} s; waiting for them to succeed")
    done = farm.wait_succeeded(ids, args.timeout_s)
    result = FarmResult(
        submitted_at, {job.id: done[job_id] for job, job_id in zip(jobs, ids, strict=True)}
    )
    print(f"all {len(jobs)} succeeded after {time.time() - submitted_at:.2f} s")
    return result


def collect_outputs(result: FarmResult, settings: Settings) -> None:
    """Each job's job.json (timings) and grid PNG, from S3."""
    storage = build_storage(settings)
    for job_id, job in result.jobs.items():
        with contextlib.suppress(Exception):  # job.json's layout may change; timings are extra
            result.job_json[job_id] = json.loads(storage.get(job_json_key(job["id"])))
        result.grids[job_id] = storage.get(job["result"]["grid"]["key"])


# -- the model alone ---------------------------------------------------------------------------


@dataclass
class ModelResult:
    render_s: dict[str, float]  # Engine.render, per job
    grids: dict[str, bytes]  # the grid PNG per job
    batch_s: float | None = None  # all jobs at once through BatchDecoder (+ VQGAN), in total


def run_model_only(
    settings: Settings, jobs: list[Job], batch_baseline: bool, warm_up: int
) -> ModelResult:
    engine = Engine.load(settings)
    try:
        for job in make_jobs(warm_up, first_seed=1_000_000):
            engine.render(JobParams(**job_body(job)))
        render_s, grids = {}, {}
        for job in jobs:
            start = time.perf_counter()
            rendered = engine.render(JobParams(**job_body(job)))
            render_s[job.id] = time.perf_counter() - start
            grids[job.id] = rendered.grid_png
        result = ModelResult(render_s, grids)
        if batch_baseline:
            model = engine.model
            result.batch_s = run_concurrent(BatchDecoder(model), model, jobs, 1).seconds
        return result
    finally:
        # An Engine that runs a batching thread has close(); an older one has nothing to stop.
        close = getattr(engine, "close", None)
        if callable(close):
            close()


# -- the report --------------------------------------------------------------------------------


def mean_of(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def report(farm: FarmResult, model: ModelResult, jobs: list[Job], args: argparse.Namespace) -> None:
    n = len(jobs)
    wall_s = farm.wall_s
    per_job_s = wall_s / n
    model_s = mean_of(list(model.render_s.values()))
    latencies = [
        timestamp(job["finished_at"]) - timestamp(job["created_at"]) for job in farm.jobs.values()
    ]
    timings = [json_["timings"] for json_ in farm.job_json.values() if "timings" in json_]

    def timing(name: str) -> float:
        return mean_of([float(t[name]) for t in timings if name in t])

    same = sum(farm.grids.get(job.id) == model.grids[job.id] for job in jobs)

    print()
    print(
        f"{n} jobs (grid 1×1), worker --concurrency {args.worker_concurrency}, "
        f"API --workers {args.api_workers}, {args.submit_threads} submitting threads"
    )
    print(f"  wall time            {wall_s:8.2f} s    first POST sent → last job finished_at")
    print(f"  throughput           {n / wall_s:8.3f} jobs/s")
    print(
        f"  latency, mean        {statistics.fmean(latencies):8.2f} s    per job, created_at → "
        "finished_at (the store's clock)"
    )
    print(f"  latency, median      {statistics.median(latencies):8.2f} s")
    print(f"  farm time per job    {per_job_s:8.2f} s    wall time / jobs")
    print(
        f"  model-only per job   {model_s:8.2f} s    mean worker.engine.Engine.render (encode, "
        "decode, VQGAN, PNGs) in this process, one job at a time, farm stopped"
    )
    print(
        f"  overhead per job     {per_job_s - model_s:8.2f} s    farm time per job − model-only "
        "per job (below 0: the worker overlaps jobs better than one at a time)"
    )
    if model.batch_s is not None:
        print(
            f"  batched per job      {model.batch_s / n:8.2f} s    all {n} jobs at once through "
            "BatchDecoder + VQGAN (no PNGs), in this process, / jobs"
        )
        print(
            f"  overhead vs batched  {per_job_s - model.batch_s / n:8.2f} s    farm time per job "
            "− batched per job"
        )
    if timings:
        queued, render, upload = timing("queued_s"), timing("render_s"), timing("upload_s")
        bookkeeping = statistics.fmean(latencies) - queued - render - upload
        print(f"  from job.json ({len(timings)} jobs), means per job:")
        print(f"    queued_s           {queued:8.2f} s    created_at → started_at")
        print(f"    render_s           {render:8.2f} s    Engine.render inside the worker")
        print(
            f"    render_s − model   {render - model_s:8.2f} s    slowdown of rendering in the "
            "worker (jobs sharing the CPU or the batch, progress writes)"
        )
        print(f"    upload_s           {upload:8.2f} s    PNGs to S3 (moto, in this process)")
        print(
            f"    rest               {bookkeeping:8.2f} s    latency − queued − render − upload "
            "(job.json, store updates)"
        )
    else:
        print("  (no timings in job.json: no breakdown)")
    print(f"  farm grids identical to the in-process render: {same}/{n}")

    print()
    print(
        "| jobs | worker concurrency | jobs/s | mean latency s | median latency s "
        "| farm s/job | model-only s/job | overhead s/job |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {n} | {args.worker_concurrency} | {n / wall_s:.3f} | {statistics.fmean(latencies):.2f} "
        f"| {statistics.median(latencies):.2f} | {per_job_s:.2f} | {model_s:.2f} "
        f"| {per_job_s - model_s:.2f} |"
    )


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--worker-concurrency", type=int, default=4)
    parser.add_argument(
        "--models-root", type=Path, default=None, help="weights (default: small random ones)"
    )
    parser.add_argument("--seed", type=int, default=7, help="the first job's seed (then +1 …)")
    parser.add_argument("--api-workers", type=int, default=2)
    parser.add_argument("--submit-threads", type=int, default=16)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads, in the worker and here"
    )
    parser.add_argument("--batch-baseline", action="store_true")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--log-dir", type=Path, default=None, help="keep the logs here")
    args = parser.parse_args()
    if min(args.jobs, args.worker_concurrency, args.api_workers, args.submit_threads) < 1:
        parser.error("--jobs, --worker-concurrency, --api-workers, --submit-threads must be ≥ 1")

    prepare_process()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads here, "
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    )
    jobs = make_jobs(args.jobs, args.seed)

    with (
        tempfile.TemporaryDirectory(prefix="bench-farm-") as temporary,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(temporary)
        log_dir = args.log_dir or tmp / "logs"
        models_root = args.models_root or tmp / "models"
        if not (models_root / "vqgan" / "detoker.pt").exists():
            print(f"writing small random weights to {models_root}")
            write_random_weights(models_root, SMALL_CONFIG, is_mega=False, seed=0)

        redis_server = RedisServer(tmp / "redis", appendonly=False)
        stack.callback(redis_server.kill)
        redis_server.start()
        s3 = S3Server()
        stack.callback(s3.stop)
        s3.start()
        farm_env = {
            "DALLE_FARM_REDIS_URL": redis_server.url,
            "DALLE_FARM_S3_ENDPOINT_URL": s3.url,
            "DALLE_FARM_S3_BUCKET": BUCKET,
            "DALLE_FARM_MODELS_ROOT": str(models_root),
            "DALLE_FARM_MODEL": "mini",
            "DALLE_FARM_DEVICE": "cpu",
        }
        settings = Settings.from_env(farm_env)

        farm = start_farm(stack, farm_env, log_dir, args)
        try:
            farm_result = run_farm(farm, jobs, args)
        except Exception:
            print(farm.logs(), file=sys.stderr)
            raise
        collect_outputs(farm_result, settings)
        # The model-only run needs a quiet machine: the farm's processes go first.
        farm.worker.kill_group()
        farm.api.kill_group()
        print("farm stopped; rendering the same jobs in this process")
        model_result = run_model_only(
            settings, jobs, args.batch_baseline, warm_up=min(2, args.jobs)
        )
        report(farm_result, model_result, jobs, args)
        if args.log_dir:
            print(f"logs kept in {args.log_dir}")


if __name__ == "__main__":
    run_main(main)
