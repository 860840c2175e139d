"""The distributed farm end to end, with real parts: redis-server, moto's S3 server on loopback,
real `dalle-farm worker` subprocesses on small random weights, and the API (Flask's test client
over the real Redis store, S3 storage and Celery queue; a real `dalle-farm api` for the load
test).

The tests share one farm and run in file order: the last ones stop and kill workers.
DALLE_FARM_VISIBILITY_TIMEOUT_S is 10 here, so a vanished worker's job is redelivered fast.
A stand-in announces that it serves Mega, so that the tests may queue Mega jobs that no worker
takes (the API refuses jobs for a model that no live worker serves).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from flask.testing import FlaskClient
from PIL import Image

from cli.main import CommandError
from cli.worker import child_for, parse_gpus
from core.checkpoint import decode_tokens
from core.job import (
    JobRecord,
    JobStatus,
    grid_key,
    image_key,
    job_json_key,
    new_job_id,
    utc_now,
)
from core.services import FarmServices
from core.settings import Settings
from core.storage import S3Storage
from core.store import key_id_from_secret
from model.weights.random_weights import SMALL_CONFIG, write_random_weights
from tests.farm_helpers import (
    REPO_ROOT,
    FarmProcess,
    S3Server,
    http,
    in_process_api,
    loopback_backends,
    subprocess_env,
    wait_for,
    worker_process,
)
from tests.servers import RedisServer, free_port

BUCKET = "farm-results"
VISIBILITY_TIMEOUT_S = 10
# The bound for a job to complete after its worker died.
RECOVERY_S = 120
JOB_TIMEOUT_S = 90
WORKER_START_S = 90
# Serves Mega for the tests that queue Mega jobs without a Mega worker.
MEGA_STAND_IN = "mega-stand-in@tests"
MINI_STAND_IN = "mini-stand-in@tests"
# DALLE_FARM_UNSERVED_JOB_TIMEOUT_S of the worker that sweeps in the unserved-jobs test.
UNSERVED_TIMEOUT_S = 3


@dataclass
class Farm:
    redis_server: RedisServer
    s3: S3Server
    env: dict[str, str]
    settings: Settings
    services: FarmServices
    client: FlaskClient
    secret: str
    log_dir: Path
    workers: dict[str, FarmProcess] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}

    @property
    def storage(self) -> S3Storage:
        assert isinstance(self.services.storage, S3Storage)
        return self.services.storage

    def submit(self, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        response = self.client.post("/v1/jobs", json=body, headers={**self.auth, **(headers or {})})
        assert response.status_code == 202, response.get_data(as_text=True)
        return response.get_json()

    def job(self, job_id: str) -> Any:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.auth)
        assert response.status_code == 200, response.get_data(as_text=True)
        return response.get_json()

    def cancel(self, job_id: str) -> Any:
        response = self.client.delete(f"/v1/jobs/{job_id}", headers=self.auth)
        assert response.status_code in (200, 202), response.get_data(as_text=True)
        return response.get_json()

    def wait_status(self, job_id: str, status: str, timeout_s: float = JOB_TIMEOUT_S) -> Any:
        def reached() -> Any:
            job = self.job(job_id)
            if job["status"] != status and job["status"] in ("succeeded", "failed", "canceled"):
                raise AssertionError(f"job ended {job['status']}, not {status}: {job}")
            return job if job["status"] == status else None

        try:
            return wait_for(reached, timeout_s, f"job {job_id} to be {status}", 0.1)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{self.logs()}") from None

    def wait_running(self, job_id: str, min_step: int = 1) -> Any:
        def running() -> Any:
            job = self.job(job_id)
            assert job["status"] in ("queued", "running"), job
            ok = job["status"] == "running" and job["progress"]["step"] >= min_step
            return job if ok else None

        return wait_for(running, JOB_TIMEOUT_S, f"job {job_id} to run", 0.05)

    def start_worker(self, node: str | None = None) -> FarmProcess:
        node = node or f"w{len(self.workers)}"
        worker = worker_process(self.env, self.log_dir, node).start()
        self.workers[node] = worker
        worker.wait_for_log("worker(s) ready", WORKER_START_S)
        return worker

    def live_workers(self) -> list[FarmProcess]:
        return [
            worker
            for worker in self.workers.values()
            if worker.process is not None and worker.process.poll() is None
        ]

    def ensure_worker(self) -> FarmProcess:
        live = self.live_workers()
        return live[0] if live else self.start_worker()

    def stop_workers(self) -> None:
        for worker in self.live_workers():
            assert worker.terminate() == 0, worker.log()[-3000:]

    def logs(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{worker.log()[-3000:]}" for name, worker in self.workers.items()
        )

    def queue_length(self, model: str = "mini") -> int:
        client = redis.Redis.from_url(self.redis_server.url)
        try:
            return int(client.llen(self.settings.queue_name(model)))
        finally:
            client.close()


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path) -> Iterator[Farm]:
    root = tmp_path_factory.mktemp("farm")
    with loopback_backends(
        root,
        small_models_root,
        BUCKET,
        MODEL="mini",
        VISIBILITY_TIMEOUT_S=str(VISIBILITY_TIMEOUT_S),
    ) as backends:
        services, client, secret = in_process_api(backends.settings)
        services.store.worker_heartbeat(MEGA_STAND_IN, models=["mega"], ttl_s=24 * 3600)
        farm = Farm(
            redis_server=backends.redis_server,
            s3=backends.s3,
            env=subprocess_env(backends.env),
            settings=backends.settings,
            services=services,
            client=client,
            secret=secret,
            log_dir=root / "logs",
        )
        try:
            yield farm
        finally:
            for worker in farm.workers.values():
                worker.kill_group()
            services.close()


def fetch(url: str) -> bytes:
    status, _, body = http("GET", url)
    assert status == 200, (url, status, body[:300])
    return body


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_worker_gpus_pick_one_pinned_process_per_gpu(tmp_path: Path) -> None:
    assert parse_gpus("cpu", lambda: 2) == [None]
    assert parse_gpus("all", lambda: 0) == [None]
    assert parse_gpus("all", lambda: 2) == ["0", "1"]
    assert parse_gpus("all", lambda: 2, visible="4,6") == ["4", "6"]
    assert parse_gpus("1, 3", lambda: 0) == ["1", "3"]
    for bad in ("0,0", "gpu1", "-1", ""):
        with pytest.raises(CommandError):
            parse_gpus(bad, lambda: 2)

    options: dict[str, Any] = dict(
        queues="dalle-farm.mini", concurrency=1, node="n1", loglevel="INFO", ready_dir=tmp_path
    )
    gpu = child_for("3", position=0, **options)
    assert gpu.name == "gpu3@n1"
    assert (gpu.env["CUDA_VISIBLE_DEVICES"], gpu.env["DALLE_FARM_DEVICE"]) == ("3", "cuda")
    assert gpu.argv[gpu.argv.index("--hostname") + 1] == "gpu3@n1"
    assert gpu.argv[gpu.argv.index("--pool") + 1] == "threads"
    assert gpu.argv[gpu.argv.index("--concurrency") + 1] == "1"
    cpu = child_for(None, position=0, **options)
    assert cpu.name == "cpu@n1"
    assert (cpu.env["CUDA_VISIBLE_DEVICES"], cpu.env["DALLE_FARM_DEVICE"]) == ("", "cpu")


def test_submit_poll_and_fetch_the_grid_and_tiles(farm: Farm) -> None:
    farm.ensure_worker()
    job = farm.submit({"text": "a lighthouse at dawn", "seed": 5, "grid_size": 2})
    assert job["status"] == "queued"
    done = farm.wait_status(job["id"], "succeeded")

    assert done["progress"] == {"step": 256, "total": 256}
    assert done["params"]["seed"] == 5
    assert done["worker"].startswith("cpu@")
    assert done["started_at"] and done["finished_at"]
    result = done["result"]
    assert result["grid"]["key"] == grid_key(job["id"])
    assert [image["key"] for image in result["images"]] == [
        image_key(job["id"], i) for i in range(4)
    ]
    grid = pixels(fetch(result["grid"]["url"]))
    assert grid.shape == (512, 512, 3)
    for i, image in enumerate(result["images"]):
        row, col = divmod(i, 2)  # row-major tiles of the grid
        tile = grid[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]
        assert np.array_equal(pixels(fetch(image["url"])), tile)
    job_json = json.loads(farm.storage.get(job_json_key(job["id"])))
    assert job_json["seed"] == 5
    assert job_json["model"] == "mini"
    assert len(job_json["weights"]["sha256"]) == 64
    assert farm.services.store.metrics().workers_alive >= 1


def test_the_same_seed_gives_the_same_bytes(farm: Farm) -> None:
    farm.ensure_worker()
    body = {"text": "a bowl of soup", "seed": 1234}
    first, second = farm.submit(body), farm.submit(body)
    grids = [
        fetch(farm.wait_status(job["id"], "succeeded")["result"]["grid"]["url"])
        for job in (first, second)
    ]
    assert grids[0] == grids[1]
    other = farm.submit({**body, "seed": 1235})
    assert fetch(farm.wait_status(other["id"], "succeeded")["result"]["grid"]["url"]) != grids[0]


def test_cancel_a_running_job_stops_it(farm: Farm) -> None:
    farm.ensure_worker()
    # Decoding 16 images takes a few seconds here: time enough to cancel in the middle.
    job = farm.submit({"text": "a long render", "grid_size": 4})
    farm.wait_running(job["id"])
    canceled = farm.cancel(job["id"])
    assert canceled["status"] in ("running", "canceled")
    done = farm.wait_status(job["id"], "canceled")
    assert done["progress"]["step"] < 256
    assert done["result"] is None
    assert not farm.storage.exists(grid_key(job["id"]))
    assert not farm.storage.exists(job_json_key(job["id"]))


def test_idempotency_keys(farm: Farm) -> None:
    # To the Mega queue, which no worker here takes from: the jobs stay queued.
    body = {"text": "same request twice", "model": "mega"}
    key = {"Idempotency-Key": f"retry-{uuid.uuid4()}"}
    before = farm.queue_length("mega")
    first = farm.submit(body, key)
    again = farm.client.post("/v1/jobs", json=body, headers={**farm.auth, **key})
    assert again.status_code in (200, 202)
    assert again.get_json()["id"] == first["id"]
    assert farm.queue_length("mega") == before + 1  # enqueued once
    other = farm.client.post(
        "/v1/jobs", json={**body, "text": "another body"}, headers={**farm.auth, **key}
    )
    assert other.status_code in (409, 422)
    assert other.headers["Content-Type"].startswith("application/problem+json")
    farm.cancel(first["id"])


def test_100_concurrent_submissions_none_lost(farm: Farm, tmp_path: Path) -> None:
    port = free_port()
    api = FarmProcess(
        ["api", "--port", str(port), "--workers", "2", "--threads", "8"],
        farm.env,
        tmp_path / "api.log",
    ).start()
    ids: list[str] = []
    try:
        api.wait_for_log("Booting worker", 60)
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http("GET", f"{base}/healthz")[0] == 200, 60, "the API to answer")
        before = farm.queue_length("mega")

        def submit(i: int) -> str:
            status, _, content = http(
                "POST",
                f"{base}/v1/jobs",
                {"text": f"concurrent prompt {i}", "model": "mega"},
                headers=farm.auth,
                timeout_s=60,
            )
            assert status == 202, content[:500]
            job_id: str = json.loads(content)["id"]
            return job_id

        with ThreadPoolExecutor(max_workers=16) as pool:
            ids.extend(pool.map(submit, range(100)))
        assert len(set(ids)) == 100
        for job_id in ids:
            record = farm.services.store.get_job(job_id)
            assert record is not None and record.status.value == "queued"
        assert farm.queue_length("mega") == before + 100
        assert api.terminate() == 0
    finally:
        api.kill_group()
        for job_id in ids:
            farm.services.store.request_cancel(job_id)


@pytest.fixture(scope="module")
def mega_models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random model in Mega's file layout."""
    root = tmp_path_factory.mktemp("small-mega")
    write_random_weights(root, SMALL_CONFIG, is_mega=True, seed=2)
    return root


def test_workers_announce_their_models_and_unserved_jobs_fail(
    farm: Farm, mega_models_root: Path, tmp_path: Path
) -> None:
    store = farm.services.store
    farm.stop_workers()
    store.worker_gone(MEGA_STAND_IN)
    assert store.served_models() == frozenset()

    # A Mini worker that fails jobs no worker serves after a short bound, and a Mega worker.
    short = {"DALLE_FARM_UNSERVED_JOB_TIMEOUT_S": str(UNSERVED_TIMEOUT_S)}
    mini = worker_process({**farm.env, **short}, tmp_path, "mini").start()
    mega_env = {
        **farm.env,
        "DALLE_FARM_MODEL": "mega",
        "DALLE_FARM_MODELS_ROOT": str(mega_models_root),
    }
    mega = worker_process(mega_env, tmp_path, "mega").start()
    try:
        for worker in (mini, mega):
            worker.wait_for_log("worker(s) ready", WORKER_START_S)
        # Ready means announced: the API accepts their jobs from then on.
        assert store.served_models() == {"mini", "mega"}
        job = farm.submit({"text": "a big model's job", "model": "mega"})
        assert farm.wait_status(job["id"], "succeeded")["worker"] == "cpu@mega"

        assert mega.terminate() == 0
        assert store.served_models() == {"mini"}  # gone at once, not when its heartbeat expires

        # Queued just as its last worker left (the API now refuses such a job).
        unserved = JobRecord(
            id=new_job_id(),
            owner=str(key_id_from_secret(farm.secret)),
            status=JobStatus.QUEUED,
            params={"text": "nobody renders me", "model": "mega"},
            created_at=utc_now(),
        )
        store.create_job(unserved)
        farm.services.queue.enqueue(unserved.id, "mega")
        served = farm.submit({"text": "a small model's job", "seed": 8})
        assert farm.wait_status(served["id"], "succeeded")["error"] is None

        failed = farm.wait_status(unserved.id, "failed", JOB_TIMEOUT_S + UNSERVED_TIMEOUT_S)
        assert failed["error"].startswith("no worker serves model 'mega'; ")
        assert "the farm serves mini now" in failed["error"]
        assert failed["started_at"] is None and failed["attempts"] == 0
        assert farm.services.queue.depth() == 0
        assert farm.queue_length("mega") >= 1  # its message waits for a Mega worker to drop it

        assert mini.terminate() == 0
        assert store.served_models() == frozenset()
        assert store.metrics().workers_alive == 0
    finally:
        for worker in (mini, mega):
            worker.kill_group()
        store.worker_heartbeat(MEGA_STAND_IN, models=["mega"], ttl_s=24 * 3600)


def test_the_api_process_does_not_import_torch(farm: Farm) -> None:
    script = (
        "import sys\n"
        "from cli.api import create_api_app, load_settings\n"
        "create_api_app(load_settings())\n"
        "loaded = sorted(name for name in sys.modules if name.split('.')[0] == 'torch')\n"
        "assert not loaded, loaded[:5]\n"
    )
    subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=farm.env, check=True, timeout=120
    )


def test_a_worker_that_cannot_load_its_model_exits_non_zero(farm: Farm, tmp_path: Path) -> None:
    env = {
        **farm.env,
        "DALLE_FARM_MODELS_ROOT": str(tmp_path / "no-weights"),
        "DALLE_FARM_WEIGHTS_URL": "http://127.0.0.1:9/",  # nothing listens: fails at once
    }
    # On a queue of its own, so that it could not take the other tests' jobs anyway.
    broken = worker_process(env, tmp_path, "broken", ("--queues", "dalle-farm.broken")).start()
    assert broken.process is not None
    assert broken.process.wait(WORKER_START_S) == 1
    assert "a worker failed to start" in broken.log()


def test_kill_9_of_the_worker_resumes_the_job_from_its_checkpoint_on_another(
    farm: Farm,
) -> None:
    worker = farm.ensure_worker()
    body = {"text": "survives a lost machine", "grid_size": 2, "seed": 4321}
    job = farm.submit(body)
    running = farm.wait_running(job["id"])

    def checkpointed() -> Any:
        record = farm.services.store.get_job(job["id"])
        return record if record is not None and record.checkpoint is not None else None

    # Kill as soon as the first checkpoint (32 tokens) is saved, long before the job is done.
    wait_for(checkpointed, JOB_TIMEOUT_S, "the job's first checkpoint", 0.01)
    worker.kill_group()
    saved = farm.services.store.get_job(job["id"])
    assert saved is not None and saved.status.value == "running"
    resumed_at = len(decode_tokens(saved.checkpoint or "")[0])
    assert 32 <= resumed_at < 256

    replacement = farm.start_worker()
    done = farm.wait_status(job["id"], "succeeded", RECOVERY_S)
    assert done["attempts"] == 2
    assert done["worker"] != running["worker"]
    assert replacement.process is not None and replacement.process.poll() is None
    job_json = json.loads(farm.storage.get(job_json_key(job["id"])))
    assert job_json["resumed_from"] >= resumed_at
    record = farm.services.store.get_job(job["id"])
    assert record is not None and record.checkpoint is None

    # The resumed job's images are those of the same job run without a break.
    twin = farm.wait_status(farm.submit(body)["id"], "succeeded")
    assert fetch(twin["result"]["grid"]["url"]) == fetch(done["result"]["grid"]["url"])


def test_s3_down_during_upload_is_retried_and_never_reported_succeeded(farm: Farm) -> None:
    farm.ensure_worker()
    farm.s3.stop()
    try:
        job = farm.submit({"text": "uploads later", "seed": 77})

        def handed_back() -> Any:
            record = farm.services.store.get_job(job["id"])
            assert record is not None
            assert record.status.value != "succeeded" and record.result is None
            return record if record.error and "storage unavailable" in record.error else None

        wait_for(handed_back, JOB_TIMEOUT_S, "the upload to fail and the job to be handed back")
    finally:
        farm.s3.start()
    done = farm.wait_status(job["id"], "succeeded")
    assert done["error"] is None
    for key in (grid_key(job["id"]), image_key(job["id"], 0), job_json_key(job["id"])):
        assert farm.storage.exists(key)


def test_sigterm_finishes_the_job_then_queued_jobs_survive_a_redis_restart(farm: Farm) -> None:
    worker = farm.ensure_worker()
    current = farm.submit({"text": "finish me first", "grid_size": 2})
    farm.wait_running(current["id"])
    assert worker.terminate() == 0  # a warm shutdown: the job is finished first
    assert farm.job(current["id"])["status"] == "succeeded"

    # No worker now: the jobs wait in Redis, one of them canceled while queued. (Earlier tests
    # may have left duplicate deliveries of finished jobs in the queue: workers drop those.)
    # The API takes jobs only for a model some live worker serves: a stand-in plays the Mini
    # worker that is about to come back.
    farm.services.store.worker_heartbeat(MINI_STAND_IN, models=["mini"], ttl_s=600)
    before = farm.queue_length()
    waiting = farm.submit({"text": "queued across a restart", "seed": 3})
    doomed = farm.submit({"text": "canceled while queued", "seed": 4})
    assert farm.cancel(doomed["id"])["status"] == "canceled"
    assert farm.queue_length() == before + 2

    farm.redis_server.restart()  # kill -9, then start on the same AOF
    assert farm.queue_length() == before + 2
    assert farm.job(waiting["id"])["status"] == "queued"

    farm.start_worker()
    farm.services.store.worker_gone(MINI_STAND_IN)
    done = farm.wait_status(waiting["id"], "succeeded")
    assert done["attempts"] == 1
    wait_for(lambda: farm.queue_length() == 0, 30, "the queue to drain")
    never_ran = farm.job(doomed["id"])
    assert never_ran["status"] == "canceled"
    assert never_ran["started_at"] is None and never_ran["attempts"] == 0
    assert not farm.storage.exists(grid_key(doomed["id"]))
