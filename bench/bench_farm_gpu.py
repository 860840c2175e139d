"""Farm end to end on a GPU (issue 14): jobs over HTTP, cold start, steady state, integrity.

Starts `dalle-farm serve` (embedded: SQLite and local files; `--mode distributed`: redis-server,
moto's S3, `dalle-farm api` and `dalle-farm worker`) on loopback with the weights under
--models-root, and measures, writing --out after every part:

1. cold start: process start → /healthz, → /readyz 200 (a live worker announced its model, which
   it does once the model is loaded and, on CUDA, self-checked; no CUDA graph is captured yet),
   then one job (the first one captures graphs) and a second one;
2. for each of --jobs: that many jobs submitted by --clients threads with the project's client
   (client.FarmClient), each thread polling its own jobs until all have succeeded: images/s end
   to end, per-job latency percentiles (client-side and from the jobs' times), GPU utilization
   and memory (nvidia-smi, "n/a" without one), and where the worker's time went (job.json);
3. steady state: --steady-jobs jobs the same way, then: GPU memory at its peak and at the end,
   CUDA graph captures after warm-up, and every job succeeded exactly once, the store holding
   exactly the jobs submitted and every result object stored;
4. baselines, after the farm has stopped, in this process: the worker's own Engine
   (worker.engine.Engine.load with the worker's settings) on the same jobs from --max-jobs
   threads, once through BatchEngine.decode + VQGAN (the decoder's throughput as
   bench/bench_gpu.py counts it) and once through Engine.render (+ PNGs).

    python -m bench.bench_farm_gpu --models-root /tmp/mega --model mega --out farm.json
    python -m bench.bench_farm_gpu --small --jobs 4,8 --steady-jobs 12 --out small.json   # CPU

Everything it starts is stopped when it ends, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.bench_batch import Job, make_jobs
from bench.bench_farm import create_key, timestamp
from bench.farm_bench import prepare_process, run_main
from bench.farm_gpu_measure import (
    ClientJob,
    GpuSampler,
    captures,
    integrity,
    job_body,
    latency_report,
    read_job_jsons,
    run_load,
    summary,
    time_split,
)
from client import FarmClient
from core.services import build_storage
from core.settings import Settings
from tests.farm_helpers import FarmProcess, S3Server, http, subprocess_env
from tests.farm_helpers import wait_for as _wait_for

READY_POLL_S = 0.1
BATCH_ROWS_LOG = re.compile(r"batch: up to (\d+) decoder rows")  # Engine.load's log line


class FarmRun:
    """The farm under test: its processes, its client, its storage and its log."""

    def __init__(self, args: argparse.Namespace, tmp: Path, stack: contextlib.ExitStack) -> None:
        self.args, self.tmp, self.stack = args, tmp, stack
        self.port = _free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = self._farm_env()
        self.settings = Settings.from_env(self.env)
        self.secret: str | None = None
        self.processes: list[FarmProcess] = []
        self.started_at = 0.0

    def _farm_env(self) -> dict[str, str]:
        args = self.args
        env = {
            "DALLE_FARM_MODELS_ROOT": str(args.models_root),
            "DALLE_FARM_MODEL": args.model,
            "DALLE_FARM_DEVICE": args.device,
            "DALLE_FARM_DTYPE": args.dtype,
            "DALLE_FARM_MAX_JOBS": str(args.max_jobs),
            "DALLE_FARM_BATCH_ROWS": str(args.batch_rows),
            "DALLE_FARM_DATA_DIR": str(self.tmp / "data"),
            "DALLE_FARM_MAX_GRID_SIZE": str(max(8, args.grid_size)),
        }
        if args.mode == "distributed":
            from tests.servers import RedisServer

            redis_server = RedisServer(self.tmp / "redis", appendonly=False)
            self.stack.callback(redis_server.kill)
            redis_server.start()
            s3 = S3Server()
            self.stack.callback(s3.stop)
            s3.start()
            env["DALLE_FARM_REDIS_URL"] = redis_server.url
            env["DALLE_FARM_S3_ENDPOINT_URL"] = s3.url
            env["DALLE_FARM_S3_BUCKET"] = "bench-farm-gpu"
        return env

    def start(self) -> None:
        env = subprocess_env(self.env)
        logs = self.tmp / "logs"
        self.started_at = time.time()
        if self.args.mode == "embedded":
            serve = FarmProcess(["serve", "--port", str(self.port)], env, logs / "serve.log")
            self.processes = [serve]
        else:
            self.secret = create_key(env)
            self.started_at = time.time()  # the key's process is not part of the cold start
            api = FarmProcess(["api", "--port", str(self.port)], env, logs / "api.log")
            gpus = "cpu" if self.args.device == "cpu" else "0"
            worker = FarmProcess(
                ["worker", "--gpus", gpus, "--node-name", "bench", "--loglevel", "INFO"],
                env,
                logs / "worker.log",
            )
            self.processes = [api, worker]
        for process in self.processes:
            self.stack.callback(process.kill_group)
            process.start()

    def client(self) -> FarmClient:
        return FarmClient(self.base_url, api_key=self.secret, timeout_s=120)

    def log(self) -> str:
        return "\n".join(process.log() for process in self.processes)

    def check_alive(self) -> None:
        for process in self.processes:
            assert process.process is not None
            if process.process.poll() is not None:
                raise RuntimeError(
                    f"`dalle-farm {process.args[0]}` exited with {process.process.returncode}:"
                    f"\n{process.log()[-3000:]}"
                )

    def answers(self, path: str) -> bool:
        self.check_alive()
        try:
            return http("GET", self.base_url + path, timeout_s=5)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        """SIGTERM (the worker hands back nothing: all jobs are done), then kill what is left."""
        for process in reversed(self.processes):
            with contextlib.suppress(Exception):
                process.terminate(timeout_s=60)
            process.kill_group()


def _free_port() -> int:
    from tests.servers import free_port

    return free_port()


# -- load from clients -------------------------------------------------------------------------


def load_part(
    farm: FarmRun, jobs: list[Job], args: argparse.Namespace, gpu: GpuSampler
) -> tuple[dict[str, Any], list[ClientJob]]:
    start = time.time()
    seen = run_load(farm, jobs, args)
    end = time.time()
    images = len(jobs) * args.grid_size**2
    first_created = min(timestamp(job.record["created_at"]) for job in seen)
    last_finished = max(timestamp(job.record["finished_at"]) for job in seen)
    storage = build_storage(farm.settings)
    part = {
        "jobs": len(jobs),
        "images": images,
        "wall_s": round(end - start, 3),
        "images_per_s": round(images / (end - start), 3),
        "images_per_s_server": round(images / (last_finished - first_created), 3),
        "latency": latency_report(seen),
        "gpu": gpu.summary(start, end),
        "worker_time": time_split(read_job_jsons(storage, [job.id for job in seen]), seen),
    }
    return part, seen


# -- the parts ---------------------------------------------------------------------------------


def cold_start(farm: FarmRun, args: argparse.Namespace, gpu: GpuSampler) -> dict[str, Any]:
    farm.start()
    _wait_for(lambda: farm.answers("/healthz"), args.timeout_s, "/healthz", READY_POLL_S)
    healthz_s = time.time() - farm.started_at
    _wait_for(lambda: farm.answers("/readyz"), args.timeout_s, "/readyz", READY_POLL_S)
    readyz_s = time.time() - farm.started_at
    first, second = make_jobs(2, first_seed=2_000_000)
    first_job = run_load(farm, [first], args)[0]
    second_job = run_load(farm, [second], args)[0]
    return {
        "ready_signal": "/readyz 200: a live worker announced its model (loaded, self-checked "
        "on CUDA); CUDA graphs are captured by the first jobs",
        "healthz_s": round(healthz_s, 3),
        "readyz_s": round(readyz_s, 3),
        "first_job_s": round(first_job.seen_done_at - first_job.sent_at, 3),
        "start_to_first_job_done_s": round(first_job.seen_done_at - farm.started_at, 3),
        "second_job_s": round(second_job.seen_done_at - second_job.sent_at, 3),
        "gpu": gpu.summary(farm.started_at, time.time()),
        "worker_batch_rows": [int(rows) for rows in BATCH_ROWS_LOG.findall(farm.log())],
        "ids": [first_job.id, second_job.id],
    }


def baselines(
    settings: Settings,
    args: argparse.Namespace,
    gpu: GpuSampler,
    results: dict[str, Any],
    save: Callable[[], None],
) -> None:
    """The worker's Engine in this process on the same jobs: decode + VQGAN, and + PNGs."""
    import torch

    from core.job import JobParams
    from model.generate import SamplingSettings
    from worker.engine import Engine

    start = time.time()
    engine = Engine.load(settings)
    results["engine_load_s"] = round(time.time() - start, 3)
    results["batch_rows"] = engine.batch.max_rows

    def sync() -> None:
        if engine.model.device.type == "cuda":
            torch.cuda.synchronize()

    def decode(job: Job) -> None:
        tokens = engine.batch.decode(job.id, job.text, job.seed, args.grid_size, SamplingSettings())
        engine.model.detokenize(tokens)

    def render(job: Job) -> None:
        params = JobParams(text=job.text, **job_body(job, args))
        engine.render(params, job_id=job.id)

    def timed(work: Callable[[Job], None], jobs: list[Job]) -> dict[str, Any]:
        sync()
        begin = time.time()
        with ThreadPoolExecutor(args.max_jobs) as pool:
            list(pool.map(work, jobs))
        sync()
        end = time.time()
        images = len(jobs) * args.grid_size**2
        return {
            "wall_s": round(end - begin, 3),
            "images_per_s": round(images / (end - begin), 3),
            "gpu": gpu.summary(begin, end),
        }

    try:
        timed(render, make_jobs(args.max_jobs, first_seed=3_000_000))  # warm-up: captures
        for count in args.baseline_counts:
            jobs = make_jobs(count, args.seed)
            results[f"decode_vqgan {count}"] = timed(decode, jobs)
            results[f"engine_render {count}"] = timed(render, jobs)
            print(f"baseline {count}: {results[f'decode_vqgan {count}']['images_per_s']} "
                  f"images/s decode + VQGAN, {results[f'engine_render {count}']['images_per_s']} "
                  "with PNGs", flush=True)  # fmt: skip
            save()
    finally:
        engine.close()


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", type=Path, default=None)
    parser.add_argument("--model", choices=("mini", "mega"), default="mega")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--jobs", default="64,256", help="comma-separated job counts")
    parser.add_argument("--clients", type=int, default=16, help="client threads")
    parser.add_argument("--grid-size", type=int, default=4)
    parser.add_argument("--max-jobs", type=int, default=64, help="DALLE_FARM_MAX_JOBS")
    parser.add_argument("--batch-rows", type=int, default=0, help="DALLE_FARM_BATCH_ROWS")
    parser.add_argument("--mode", choices=("embedded", "distributed"), default="embedded")
    parser.add_argument("--steady-jobs", type=int, default=1000, help="0: skip")
    parser.add_argument(
        "--baseline-jobs", default=None, help="job counts for the baselines (default: --jobs)"
    )
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=Path("farm-gpu.json"))
    parser.add_argument("--log-dir", type=Path, default=None, help="copy the farm's logs here")
    parser.add_argument(
        "--small", action="store_true",
        help="CPU smoke: small random weights, Mini, float32, grid 1, 4 jobs in flight",
    )  # fmt: skip
    args = parser.parse_args(argv)
    args.job_counts = [int(count) for count in args.jobs.split(",") if count.strip()]
    baseline = args.baseline_jobs or args.jobs
    args.baseline_counts = [int(count) for count in baseline.split(",") if count.strip()]
    if args.small:
        args.model, args.dtype, args.device, args.grid_size = "mini", "float32", "cpu", 1
        args.max_jobs, args.clients = min(args.max_jobs, 4), min(args.clients, 4)
    if min([args.clients, args.grid_size, args.max_jobs, *args.job_counts]) < 1:
        parser.error("--jobs, --clients, --grid-size and --max-jobs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    prepare_process()
    results: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "settings": {k: str(v) for k, v in vars(args).items() if not k.endswith("_counts")},
    }

    def save() -> None:
        args.out.write_text(json.dumps(results, indent=1, default=str))

    with (
        tempfile.TemporaryDirectory(prefix="bench-farm-gpu-") as temporary,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(temporary)
        if args.models_root is None:
            args.models_root = tmp / "models"
        if not (args.models_root / "vqgan" / "detoker.pt").exists():
            write_weights(args)
        gpu = GpuSampler().start()
        stack.callback(gpu.stop)
        farm = FarmRun(args, tmp, stack)
        submitted: list[str] = []
        try:
            results["cold_start"] = part = cold_start(farm, args, gpu)
            submitted += part.pop("ids")
            save()
            warm = make_jobs(args.max_jobs, first_seed=1_000_000)
            submitted += [job.id for job in run_load(farm, warm, args)]
            for count in args.job_counts:
                part, seen = load_part(farm, make_jobs(count, args.seed), args, gpu)
                results[f"e2e {count}"] = part
                submitted += [job.id for job in seen]
                print(f"e2e {count}: {part['images_per_s']} images/s", flush=True)
                save()
            if args.steady_jobs:
                results["steady"] = steady_state(farm, args, gpu, submitted)
                save()
        except BaseException:
            print(farm.log()[-6000:], file=sys.stderr)
            raise
        finally:
            if args.log_dir is not None:
                args.log_dir.mkdir(parents=True, exist_ok=True)
                (args.log_dir / "farm.log").write_text(farm.log())
        farm.stop()
        if not args.skip_baselines:
            results["baselines"] = {}
            baselines(farm.settings, args, gpu, results["baselines"], save)
    print(summary(results), flush=True)
    return results


def steady_state(
    farm: FarmRun, args: argparse.Namespace, gpu: GpuSampler, submitted: list[str]
) -> dict[str, Any]:
    before = captures(farm.log())
    part, seen = load_part(farm, make_jobs(args.steady_jobs, 5_000_000), args, gpu)
    submitted += [job.id for job in seen]
    with farm.client() as client:
        listed = [job.raw for job in client.list()]
    storage = build_storage(farm.settings)
    part["integrity"] = integrity(submitted, listed, storage, farm.log())
    after = captures(farm.log())
    # Logged by the worker per capture; none on the CPU. A restarted worker counts from 0 again.
    part["cuda_graphs"] = {
        "before": before,
        "after": after,
        "captured_during_steady_state": after["lines"] - before["lines"],
        "recaptured_during_steady_state": after["recaptures"] - before["recaptures"],
    }
    return part


def write_weights(args: argparse.Namespace) -> None:
    from model import ModelConfig
    from model.weights.random_weights import SMALL_CONFIG, write_random_weights

    config = SMALL_CONFIG if args.small else getattr(ModelConfig, args.model)()
    start = time.perf_counter()
    write_random_weights(args.models_root, config, is_mega=args.model == "mega", seed=0)
    print(f"wrote random weights to {args.models_root} in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
