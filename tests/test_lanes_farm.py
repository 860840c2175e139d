"""Priority lanes on the distributed farm, with real parts: redis-server, moto's S3 server, the
API (Flask's test client over the real Redis store, S3 storage and Celery queue) and a real
`dalle-farm worker` process on the small random model.

200 bulk jobs are queued while no worker runs (a stand-in announces Mini, so that the API
accepts them); then one worker starts, and two interactive jobs submitted once it is busy take
its next free slots, ahead of every bulk job still queued; then the bulk jobs behind them run
(a few of them: the rest are canceled, since a CPU takes seconds per job).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis
from flask.testing import FlaskClient

from core.job import JobStatus
from core.services import FarmServices
from tests.farm_helpers import (
    in_process_api,
    loopback_backends,
    subprocess_env,
    wait_for,
    worker_process,
)

BULK_JOBS = 200
# Bulk jobs queued behind the interactive one that are rendered (the rest are canceled).
BULK_FINISHED = 2
# Interactive jobs submitted behind them, at once.
INTERACTIVE = 2
# The worker's job slots (DALLE_FARM_MAX_JOBS): one batch.
SLOTS = 2
WORKER_START_S = 90
FINISH_S = 240


@dataclass
class Farm:
    services: FarmServices
    client: FlaskClient
    auth: dict[str, str]
    env: dict[str, str]
    log_dir: Path
    redis_url: str

    def submit(self, body: dict[str, Any]) -> str:
        response = self.client.post("/v1/jobs", json=body, headers=self.auth)
        assert response.status_code == 202, response.get_data(as_text=True)
        job_id: str = response.get_json()["id"]
        return job_id

    def queue_lengths(self) -> list[int]:
        """The messages waiting in Mini's interactive and bulk queues."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            return [int(client.llen(name)) for name in ("dalle-farm.mini", "dalle-farm.mini.bulk")]
        finally:
            client.close()

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}", headers=self.auth)
        assert response.status_code == 200, response.get_data(as_text=True)
        body: dict[str, Any] = response.get_json()
        return body


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory, small_models_root: Path) -> Iterator[Farm]:
    root = tmp_path_factory.mktemp("lanes-farm")
    # The order alone is under test here: no bulk job is promoted (BULK_MAX_WAIT_S).
    with loopback_backends(
        root,
        small_models_root,
        "lanes",
        appendonly=False,
        MAX_JOBS=str(SLOTS),
        BULK_MAX_WAIT_S="3600",
    ) as backends:
        services, client, secret = in_process_api(backends.settings)
        # Lets the API accept Mini jobs before the worker is up.
        services.store.worker_heartbeat("mini-stand-in@tests", models=["mini"], ttl_s=3600)
        try:
            yield Farm(
                services=services,
                client=client,
                auth={"Authorization": f"Bearer {secret}"},
                env=subprocess_env(backends.env),
                log_dir=root / "logs",
                redis_url=backends.redis_server.url,
            )
        finally:
            services.close()


def test_interactive_jobs_start_ahead_of_200_queued_bulk_jobs(farm: Farm) -> None:
    store = farm.services.store
    bulk = [farm.submit({"text": f"bulk prompt {i}", "priority": "bulk"}) for i in range(BULK_JOBS)]
    assert farm.job(bulk[-1])["queue_position"] == BULK_JOBS

    worker = worker_process(farm.env, farm.log_dir, "lanes").start()
    try:
        worker.wait_for_log("worker(s) ready", WORKER_START_S)
        # Busy: every slot holds a bulk job, and the rest wait.
        wait_for(
            lambda: farm.queue_lengths()[1] <= BULK_JOBS - SLOTS,
            WORKER_START_S,
            "the worker to take its first bulk jobs",
        )
        interactive = [farm.submit({"text": f"a person waits {i}"}) for i in range(INTERACTIVE)]
        # Bulk messages the worker took before the interactive ones were all queued.
        taken_before = BULK_JOBS - farm.queue_lengths()[1]
        assert [farm.job(job_id)["queue_position"] for job_id in interactive] == [1, 2]
        wait_for(
            lambda: all(farm.job(job_id)["status"] != "queued" for job_id in interactive),
            FINISH_S,
            "the interactive jobs to start",
        )

        # Rendering all 200 on a CPU would take minutes: of the bulk jobs still queued once
        # the interactive ones have started, the next BULK_FINISHED must all finish, and the
        # rest are canceled.
        queued = [job_id for job_id in bulk if farm.job(job_id)["status"] == "queued"]
        assert len(queued) > BULK_FINISHED
        for job_id in queued[BULK_FINISHED:]:
            assert farm.client.delete(f"/v1/jobs/{job_id}", headers=farm.auth).status_code == 202
        done = [
            wait_for(partial(finished, farm, job_id), FINISH_S, "an interactive job")
            for job_id in interactive
        ]
        rendered = [job_id for job_id in bulk if job_id not in queued[BULK_FINISHED:]]
        jobs = [
            wait_for(partial(finished, farm, job_id), FINISH_S, "a bulk job") for job_id in rendered
        ]
        # The canceled jobs' messages are taken and dropped: the lanes drain.
        wait_for(lambda: farm.queue_lengths() == [0, 0], FINISH_S, "the queues to drain")
    except AssertionError as error:
        raise AssertionError(f"{error}\n--- worker log ---\n{worker.log()[-4000:]}") from None
    finally:
        worker.kill_group()
    # Its promoter looked for overdue bulk jobs every few seconds all along, without a failure.
    assert "bulk jobs of mini that waited 3600 s are promoted" in worker.log()
    assert "could not promote" not in worker.log()

    # Each free slot took an interactive job while one waited: no bulk job started between
    # them (round-robin reading of the two queues would have put one between), and none of
    # the bulk jobs still queued went first.
    last_started = max(job["started_at"] for job in done)
    ahead = [job for job in jobs if job["started_at"] < last_started]
    assert len(ahead) <= taken_before, (len(ahead), taken_before)
    assert len(jobs) - len(ahead) >= BULK_FINISHED
    assert all(job["attempts"] == 1 for job in [*jobs, *done])
    canceled = [farm.job(job_id) for job_id in queued[BULK_FINISHED:]]
    assert all(job["status"] == "canceled" and job["attempts"] == 0 for job in canceled)
    assert store.metrics().jobs_by_status[JobStatus.SUCCEEDED.value] == len(jobs) + INTERACTIVE


def finished(farm: Farm, job_id: str) -> dict[str, Any] | None:
    job = farm.job(job_id)
    assert job["status"] in ("queued", "running", "succeeded"), job
    return job if job["status"] == "succeeded" else None
