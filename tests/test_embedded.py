"""`dalle-farm serve` end to end: a real subprocess on a free port, small random weights, jobs in
SQLite and images as local files, used the way a user would with curl."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.job import JobRecord, JobStatus, new_job_id, utc_now
from core.queue_sqlite import SqliteJobQueue
from core.store_sqlite import SqliteJobStore
from tests.embedded_serve import JOB_TIMEOUT_S, Serve
from tests.farm_helpers import REPO_ROOT, http, http_json, subprocess_env, wait_for


@pytest.fixture(scope="module")
def serve_env(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path) -> dict[str, str]:
    data_dir = tmp_path_factory.mktemp("serve-data")
    return subprocess_env(
        {"DALLE_FARM_DATA_DIR": str(data_dir), "DALLE_FARM_MODELS_ROOT": str(small_models_root)}
    )


def test_serve_runs_a_job_without_a_key_on_loopback(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    serve = Serve(serve_env, tmp_path / "serve.log").start()
    database = Path(serve_env["DALLE_FARM_DATA_DIR"]) / "farm.db"
    try:
        with SqliteJobStore(database) as store:  # ready means announced
            assert store.served_models() == {"mini"}
        job = serve.submit({"text": "a sailing boat", "seed": 21, "grid_size": 2})
        assert job["status"] == "queued"
        done = serve.wait_status(job["id"], "succeeded")
        assert done["worker"].startswith("embedded@")
        grid = np.asarray(Image.open(io.BytesIO(serve.fetch(done["result"]["grid"]["url"]))))
        assert grid.shape == (512, 512, 3)
        for i, image in enumerate(done["result"]["images"]):
            tile = np.asarray(Image.open(io.BytesIO(serve.fetch(image["url"]))))
            row, col = divmod(i, 2)
            assert np.array_equal(
                tile, grid[row * 256 : (row + 1) * 256, col * 256 : (col + 1) * 256]
            )
        listed = http_json("GET", f"{serve.base}/v1/jobs")
        assert job["id"] in [entry["id"] for entry in listed["jobs"]]

        # A Mega job (the API refuses one; this one is queued behind its back) does not linger.
        mega = JobRecord(
            id=new_job_id(),
            owner="local",
            status=JobStatus.QUEUED,
            params={"text": "a big model's job", "model": "mega"},
            created_at=utc_now(),
        )
        with SqliteJobStore(database) as store, SqliteJobQueue(database) as queue:
            store.create_job(mega)
            queue.enqueue(mega.id, "mega")
        failed = serve.wait_status(mega.id, "failed")
        assert "mega" in failed["error"] and "mini" in failed["error"], failed["error"]

        assert serve.process.terminate() == 0
        with SqliteJobStore(database) as store:
            assert store.served_models() == frozenset()  # it left when it stopped
            assert store.metrics().workers_alive == 0
    finally:
        serve.process.kill_group()


def test_queued_jobs_survive_a_restart_and_keys_guard_a_public_serve(
    serve_env: dict[str, str], tmp_path: Path
) -> None:
    first = Serve(serve_env, tmp_path / "serve-1.log").start()
    try:
        # 25 images take seconds to decode: SIGTERM lands in the middle.
        long_job = first.submit({"text": "a very long render", "grid_size": 5})
        waiting = first.submit({"text": "waits its turn", "seed": 9})
        wait_for(
            lambda: first.job(long_job["id"])["progress"]["step"] > 0, JOB_TIMEOUT_S, "the render"
        )
        # SIGTERM: the worker hands the running job back; the API stops.
        assert first.process.terminate() == 0
    finally:
        first.process.kill_group()

    data_dir = Path(serve_env["DALLE_FARM_DATA_DIR"])
    with SqliteJobStore(data_dir / "farm.db") as store:
        for job_id in (long_job["id"], waiting["id"]):
            record = store.get_job(job_id)
            assert record is not None
            assert (record.status, record.attempts) == (JobStatus.QUEUED, 0)
        # Rendering it in full would only make the test slow.
        store.request_cancel(long_job["id"])

    created = subprocess.run(
        [sys.executable, "-m", "cli", "keys", "create", "restart-test"],
        cwd=REPO_ROOT,
        env=serve_env,
        capture_output=True,
        text=True,
        check=True,
    )
    secret = created.stdout.strip().splitlines()[-1]

    second = Serve(serve_env, tmp_path / "serve-2.log", host="0.0.0.0")
    second.start()
    try:
        with SqliteJobStore(data_dir / "farm.db") as store:

            def waiting_succeeded() -> bool:
                record = store.get_job(waiting["id"])
                assert record is not None
                return record.status is JobStatus.SUCCEEDED

            wait_for(waiting_succeeded, JOB_TIMEOUT_S, "the job queued before the restart")
        # Not bound to loopback: a key is needed.
        assert http("GET", f"{second.base}/v1/jobs")[0] == 401
        second.headers = {"Authorization": f"Bearer {secret}"}
        own = second.submit({"text": "after the restart", "seed": 2})
        assert second.wait_status(own["id"], "succeeded")["result"]["grid"]
        assert second.process.terminate() == 0
    finally:
        second.process.kill_group()
