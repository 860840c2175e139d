"""worker.runner.run_job against a real SQLite store, local files and a small real model."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.checkpoint import decode_tokens
from core.job import (
    JobParams,
    JobRecord,
    JobStatus,
    grid_key,
    image_key,
    job_json_key,
    model_image_for_tile,
    new_job_id,
    preview_key,
    result_prefix,
    utc_now,
)
from core.settings import Settings
from core.storage import LocalStorage, StorageUnavailable
from core.store_sqlite import SqliteJobStore
from model.bart import TextContext
from model.batch import BatchDecoder, JobFailed
from model.errors import WeightsFormatError
from model.generate import SamplingSettings
from model.weights.files import WeightPaths
from model.weights.manifest import weights_identity
from worker.engine import Engine, Rendered, batch_rows_for_memory, png_bytes
from worker.runner import Outcome, lease_owner, run_job

WORKER = "test-worker@host"


@pytest.fixture(scope="module")
def settings(small_models_root: Path) -> Settings:
    return Settings(models_root=small_models_root, model="mini", device="cpu", max_attempts=3)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Engine:
    return Engine.load(settings)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    with SqliteJobStore(tmp_path / "farm.db") as job_store:
        yield job_store


@pytest.fixture
def storage(tmp_path: Path) -> LocalStorage:
    files = LocalStorage(tmp_path / "files")
    files.ensure_bucket()
    return files


def submit(
    store: SqliteJobStore, owner: str = "owner-1", unchecked: bool = False, **params: Any
) -> JobRecord:
    """A queued job; `unchecked` params skip the contract's checks (an older contract's job)."""
    params.setdefault("seed", 7)
    params.setdefault("text", "a red apple")
    record = JobRecord(
        id=new_job_id(),
        owner=owner,
        status=JobStatus.QUEUED,
        params=(JobParams.model_construct if unchecked else JobParams)(**params).to_dict(),
        created_at=utc_now(),
    )
    created, _ = store.create_job(record)
    return created


def run(
    job: JobRecord,
    store: SqliteJobStore,
    storage: LocalStorage,
    engine: Any,
    settings: Settings,
    **kwargs: Any,
) -> Outcome:
    return run_job(
        job.id,
        store=store,
        storage=storage,
        engine=engine,
        worker_name=WORKER,
        settings=settings,
        **kwargs,
    )


def stored_files(storage: LocalStorage, job_id: str) -> dict[str, int]:
    """Relative path → mtime_ns of every file stored for the job."""
    folder = storage.root / result_prefix(job_id)
    if not folder.exists():
        return {}
    return {
        path.relative_to(storage.root).as_posix(): path.stat().st_mtime_ns
        for path in folder.rglob("*")
        if path.is_file()
    }


def pixels(png: bytes) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).copy())


class OnStepEngine:
    """The real engine, with `hook(step)` called before each of the runner's on_step calls."""

    def __init__(self, engine: Engine, hook: Callable[[int], None]) -> None:
        self.engine, self.hook = engine, hook
        self.weights = engine.weights

    def render(
        self, params: JobParams, on_step: Any = None, on_preview: Any = None, **kwargs: Any
    ) -> Rendered:
        def step(step: int, total: int) -> None:
            self.hook(step)
            if on_step is not None:
                on_step(step, total)

        return self.engine.render(params, on_step=step, on_preview=on_preview, **kwargs)


def batch_images(engine: Engine, params: JobParams) -> torch.Tensor:
    """The job's images from the farm's sampler alone: a BatchDecoder with only this job."""
    decoder = BatchDecoder(engine.model)
    settings = SamplingSettings(params.temperature, params.top_k, params.supercondition_factor)
    decoder.add("alone", params.text, params.seed, params.grid_size, settings)
    done: dict[str, torch.Tensor] = {}
    while not done:
        done = decoder.step().finished
    grid = engine.model.detokenize(done["alone"], params.is_seamless)
    # Undo the grid layout, as MinDalle.generate_images does.
    side, count = 256, params.grid_size
    images = grid.view(count, side, count, side, 3).permute(2, 0, 1, 3, 4)
    return images.reshape(count**2, side, side, 3)


class FailingStorage(LocalStorage):
    """Local files whose puts of some keys fail as an unreachable S3 would."""

    def __init__(self, root: Path, fail: Callable[[str], bool]) -> None:
        super().__init__(root)
        self.fail = fail
        self.attempted: list[str] = []

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.attempted.append(key)
        if self.fail(key):
            raise StorageUnavailable(f"could not upload {key}: connection refused")
        super().put(key, data, content_type)


def test_success_stores_tiles_row_major_grid_and_job_json_last(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store, grid_size=2)
    order: list[str] = []
    recording = FailingStorage(storage.root, fail=lambda key: False)
    assert run(job, store, recording, engine, settings) is Outcome.DONE
    order = recording.attempted

    done = store.get_job(job.id)
    assert done is not None
    assert done.status is JobStatus.SUCCEEDED
    assert done.progress_step == 256
    assert done.worker == WORKER
    assert done.attempts == 1
    assert done.started_at is not None and done.finished_at is not None
    tiles = [image_key(job.id, i) for i in range(4)]
    assert done.result == {"grid": grid_key(job.id), "images": tiles}
    assert order[-1] == job_json_key(job.id)
    assert set(order) == {*tiles, grid_key(job.id), job_json_key(job.id)}

    # Tile file i holds the model's image model_image_for_tile(i): row-major on the grid.
    images = batch_images(engine, JobParams(text="a red apple", seed=7, grid_size=2))
    for i, key in enumerate(tiles):
        expected = images[model_image_for_tile(i, 2)]
        assert torch.equal(pixels(storage.get(key)), pixels(png_bytes(expected)))
    grid = Image.open(io.BytesIO(storage.get(grid_key(job.id))))
    assert grid.size == (512, 512)

    job_json = json.loads(storage.get(job_json_key(job.id)))
    assert job_json["seed"] == 7
    assert job_json["params"]["seed"] == 7
    assert job_json["model"] == "mini"
    assert job_json["weights"] == weights_identity(engine.model.paths)
    assert len(job_json["weights"]["sha256"]) == 64
    assert job_json["worker"] == WORKER
    assert {"started_at", "finished_at", "render_s"} <= job_json["timings"].keys()

    metrics = store.metrics()
    assert metrics.images_generated == 4
    assert metrics.jobs_by_status["succeeded"] == 1


def test_a_duplicate_delivery_touches_nothing(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store)
    assert run(job, store, storage, engine, settings) is Outcome.DONE
    before_record = store.get_job(job.id)
    before_files = stored_files(storage, job.id)
    assert len(before_files) == 3

    assert run(job, store, storage, engine, settings) is Outcome.DONE
    assert store.get_job(job.id) == before_record
    assert stored_files(storage, job.id) == before_files
    assert store.metrics().duration_count == 1


def test_an_unknown_job_is_done(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    ghost = JobRecord(
        id=new_job_id(), owner="x", status=JobStatus.QUEUED, params={}, created_at=utc_now()
    )
    assert run(ghost, store, storage, engine, settings) is Outcome.DONE


def test_the_same_seed_gives_the_same_bytes(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    first, second = submit(store, seed=11), submit(store, seed=11)
    for job in (first, second):
        assert run(job, store, storage, engine, settings) is Outcome.DONE
    assert storage.get(grid_key(first.id)) == storage.get(grid_key(second.id))
    assert storage.get(image_key(first.id, 0)) == storage.get(image_key(second.id, 0))


def test_cancel_mid_run_stops_at_the_next_step_and_stores_nothing(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store)
    steps: list[int] = []
    canceled_at: list[int] = []

    def cancel_from_step_20(step: int) -> None:
        steps.append(step)
        if step >= 20 and not canceled_at:
            canceled_at.append(step)
            store.request_cancel(job.id)

    outcome = run(job, store, storage, OnStepEngine(engine, cancel_from_step_20), settings)
    assert outcome is Outcome.DONE
    done = store.get_job(job.id)
    assert done is not None
    assert done.status is JobStatus.CANCELED
    assert done.finished_at is not None
    assert done.result is None
    assert max(steps) == canceled_at[0]  # the check right after the cancel stopped it
    assert stored_files(storage, job.id) == {}
    assert store.lease_holder(job.id) is None


def test_a_job_that_crashed_workers_too_often_fails(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store)
    store.transition(job.id, JobStatus.RUNNING, attempts=settings.max_attempts, worker="dead")
    assert run(job, store, storage, engine, settings) is Outcome.DONE
    failed = store.get_job(job.id)
    assert failed is not None
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert f"crashed workers {settings.max_attempts} times; giving up" in failed.error
    assert stored_files(storage, job.id) == {}


def test_a_redelivery_after_a_crash_runs_the_job_again(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store)
    store.transition(job.id, JobStatus.RUNNING, attempts=1, worker="dead", progress_step=100)
    assert run(job, store, storage, engine, settings) is Outcome.DONE
    done = store.get_job(job.id)
    assert done is not None
    assert (done.status, done.attempts) == (JobStatus.SUCCEEDED, 2)


def test_a_grid_larger_than_the_batch_fails_with_a_clear_error(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    small = Engine(engine.model, engine.weights, max_rows=4)  # two images at most
    try:
        job = submit(store, grid_size=2)
        assert run(job, store, storage, small, settings) is Outcome.DONE
    finally:
        small.close()
    failed = store.get_job(job.id)
    assert failed is not None and failed.status is JobStatus.FAILED
    assert failed.error is not None
    assert "needs 8 decoder rows" in failed.error and "DALLE_FARM_BATCH_ROWS" in failed.error


def test_the_batch_is_sized_to_free_memory(engine: Engine) -> None:
    rows = batch_rows_for_memory(engine.model)
    config = engine.model.config
    row_bytes = config.layer_count * 2 * 256 * config.embed_count * 4  # float32
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 2 <= rows <= 4096
    assert rows == 4096 or abs(rows * row_bytes - free / 2) <= free * 0.05


class Crash(BaseException):
    """A worker dying mid-job: nothing in run_job handles it."""


def test_a_crashed_job_resumes_from_its_checkpoint_with_identical_images(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store, grid_size=2, seed=11, temperature=1.5)

    def crash_after_token_64(step: int) -> None:
        if step > 64:
            raise Crash

    with pytest.raises(Crash):
        run(job, store, storage, OnStepEngine(engine, crash_after_token_64), settings)
    crashed = store.get_job(job.id)
    assert crashed is not None and crashed.checkpoint is not None
    assert crashed.status is JobStatus.RUNNING
    checkpoint = decode_tokens(crashed.checkpoint)
    assert len(checkpoint) == 4 and len(checkpoint[0]) in (64, 96)

    assert run(job, store, storage, engine, settings) is Outcome.DONE
    done = store.get_job(job.id)
    assert done is not None
    assert (done.status, done.attempts, done.checkpoint) == (JobStatus.SUCCEEDED, 2, None)
    job_json = json.loads(storage.get(job_json_key(job.id)))
    assert job_json["resumed_from"] == len(checkpoint[0])
    expected = batch_images(
        engine, JobParams(text="a red apple", seed=11, grid_size=2, temperature=1.5)
    )
    for i in range(4):
        tile = pixels(storage.get(image_key(job.id, i)))
        assert torch.equal(tile, pixels(png_bytes(expected[model_image_for_tile(i, 2)])))


def test_jobs_in_flight_together_give_the_images_each_gives_alone(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    bodies: list[dict[str, Any]] = [
        {"seed": 1},
        {"seed": 2, "grid_size": 2, "top_k": 8},
        {"seed": 3, "temperature": 0.5, "supercondition_factor": 4},
        {"seed": 4, "is_seamless": True},
    ]
    jobs = [submit(store, **body) for body in bodies]
    in_batch: list[int] = []

    def watch(step: int) -> None:
        in_batch.append(len(engine.batch.decoder.active))

    with ThreadPoolExecutor(len(jobs)) as pool:
        outcomes = list(
            pool.map(
                lambda job: run(job, store, storage, OnStepEngine(engine, watch), settings), jobs
            )
        )
    assert outcomes == [Outcome.DONE] * len(jobs)
    assert max(in_batch) >= 2  # they did share steps
    for job, body in zip(jobs, bodies, strict=True):
        expected = batch_images(engine, JobParams(text="a red apple", **body))
        grid_size = body.get("grid_size", 1)
        for i in range(grid_size**2):
            tile = pixels(storage.get(image_key(job.id, i)))
            assert torch.equal(
                tile, pixels(png_bytes(expected[model_image_for_tile(i, grid_size)]))
            )


def test_a_lease_held_by_another_live_worker_defers(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store)
    assert store.renew_lease(job.id, "other@host#1", 60)
    assert run(job, store, storage, engine, settings) is Outcome.DEFERRED
    waiting = store.get_job(job.id)
    assert waiting is not None
    assert (waiting.status, waiting.attempts) == (JobStatus.QUEUED, 0)
    assert store.lease_holder(job.id) == "other@host#1"


def test_a_dead_pool_process_lease_of_the_same_worker_is_taken_over(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                              capture_output=True, text=True)  # fmt: skip
    dead_pid = int(finished.stdout)
    job = submit(store)
    assert store.renew_lease(job.id, lease_owner(WORKER, dead_pid), 60)
    assert run(job, store, storage, engine, settings) is Outcome.DONE
    done = store.get_job(job.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED


def test_storage_failure_hands_the_job_back_and_never_reports_success(
    store: SqliteJobStore, tmp_path: Path, engine: Engine, settings: Settings
) -> None:
    job = submit(store, grid_size=1)
    failing = FailingStorage(tmp_path / "files", fail=lambda key: key.endswith("grid.png"))
    with pytest.raises(StorageUnavailable):
        run(job, store, failing, engine, settings)
    waiting = store.get_job(job.id)
    assert waiting is not None
    assert waiting.status is JobStatus.QUEUED
    assert waiting.result is None
    assert waiting.attempts == 0  # a storage outage is not a crash
    assert waiting.error is not None and "storage unavailable" in waiting.error
    assert grid_key(job.id) in failing.attempted  # tiles and grid upload side by side
    assert not failing.exists(grid_key(job.id))
    assert not failing.exists(job_json_key(job.id))
    assert store.lease_holder(job.id) is None

    # The retry, with the storage back, stores everything and only then succeeds.
    healthy = LocalStorage(tmp_path / "files")
    assert run(job, store, healthy, engine, settings) is Outcome.DONE
    done = store.get_job(job.id)
    assert done is not None
    assert (done.status, done.error, done.attempts) == (JobStatus.SUCCEEDED, None, 1)
    assert all(healthy.exists(key) for key in (grid_key(job.id), job_json_key(job.id)))


def test_a_stopping_worker_hands_the_job_back(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store)
    stop = threading.Event()

    def stop_at_step_10(step: int) -> None:
        if step == 10:
            stop.set()

    outcome = run(
        job, store, storage, OnStepEngine(engine, stop_at_step_10), settings, stop_requested=stop
    )
    assert outcome is Outcome.DEFERRED
    waiting = store.get_job(job.id)
    assert waiting is not None
    assert (waiting.status, waiting.attempts) == (JobStatus.QUEUED, 0)
    assert stored_files(storage, job.id) == {}
    assert store.lease_holder(job.id) is None


def test_invalid_params_fail_the_job(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store, model="mega")  # this worker serves mini
    assert run(job, store, storage, engine, settings) is Outcome.DONE
    failed = store.get_job(job.id)
    assert failed is not None
    assert failed.status is JobStatus.FAILED
    assert failed.error is not None and "serves DALL·E mini" in failed.error


def test_progressive_outputs_store_previews(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    job = submit(store, progressive_outputs=True)
    assert run(job, store, storage, engine, settings) is Outcome.DONE
    done = store.get_job(job.id)
    assert done is not None and done.result is not None
    previews = [preview_key(job.id, frame) for frame in range(1, 8)]
    assert done.result["previews"] == previews
    assert all(storage.exists(key) for key in previews)
    # Each preview was recorded as it was stored, so watchers got a preview event each, in
    # order, before the job was done.
    page = store.job_events(job.id, after="0", limit=1000)
    kinds = [event.type for event in page.events]
    logged = [event.data["key"] for event in page.events if event.type == "preview"]
    assert logged == previews
    assert kinds.index("done") > max(i for i, kind in enumerate(kinds) if kind == "preview")


def test_the_worker_names_its_weights_and_refuses_files_that_no_longer_match_their_manifest(
    small_models_root: Path, engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    assert engine.weights == weights_identity(engine.model.paths, verify=True)
    assert not (small_models_root / "dalle_bart_mini" / "manifest.json").exists()

    damaged = tmp_path / "damaged"
    shutil.copytree(small_models_root, damaged)
    paths = WeightPaths(damaged, is_mega=False)
    recorded = weights_identity(paths, record=True)  # writes the manifests
    assert recorded["sha256"] == engine.weights["sha256"] and recorded["manifests"]
    data = bytearray(paths.decoder.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: it still loads
    paths.decoder.write_bytes(bytes(data))
    with pytest.raises(WeightsFormatError, match=r"decoder\.pt does not match"):
        Engine.load(dataclasses.replace(settings, models_root=damaged))


POISONED = "a prompt whose numbers overflow"


def poison_prompt(engine: Engine, text: str) -> None:
    """Make the engine's encoding of `text` NaN (its conditioned row), as a model whose numbers
    overflow for that prompt would. Call it while no job is in flight."""
    decoder = engine.batch.decoder
    _, conditioned = decoder.model._text_tokens(text)
    context = decoder._row_context(conditioned)
    with torch.inference_mode():
        nan = [torch.full_like(keys, math.nan) for keys in context.keys]
        decoder._text_rows[tuple(conditioned.tolist())] = TextContext(
            nan, context.values, context.attention_mask
        )


def test_render_isolates_a_job_that_fails_from_the_jobs_beside_it(engine: Engine) -> None:
    """Engine.render from many threads: a prompt whose logits become NaN, a checkpoint callback
    that raises and settings the model refuses each fail their own render; the other renders
    give the images they give alone."""
    poison_prompt(engine, POISONED)

    class Unstored(Exception):
        pass

    def unstored(step: int, tokens: list[list[int]]) -> None:
        raise Unstored(f"checkpoint {step} could not be stored")

    good = [
        JobParams(text="a red apple", seed=3, grid_size=2, top_k=8),
        JobParams(text="a green pear", seed=4, temperature=0.5, supercondition_factor=4),
    ]
    with ThreadPoolExecutor(5) as pool:
        nan = pool.submit(engine.render, JobParams(text=POISONED, seed=1), job_id="nan")
        callback = pool.submit(
            engine.render, JobParams(text="a fox", seed=2, grid_size=2), on_checkpoint=unstored
        )
        # Below what the contract accepts: as a job recorded under an older contract may be.
        too_cold = JobParams.model_construct(text="a fox", seed=2, temperature=1e-45)
        cold = pool.submit(engine.render, too_cold)
        renders = [pool.submit(engine.render, params) for params in good]
        with pytest.raises(JobFailed, match=r"job 'nan' could not be decoded: .*NaN"):
            nan.result()
        with pytest.raises(Unstored, match="checkpoint 32"):
            callback.result()
        with pytest.raises(ValueError, match=r"temperature must be .* at least 1\.17"):
            cold.result()
        rendered = [future.result() for future in renders]
    for params, result in zip(good, rendered, strict=True):
        images = batch_images(engine, params)
        for i, tile in enumerate(result.tile_pngs):
            expected = images[model_image_for_tile(i, params.grid_size)]
            assert torch.equal(pixels(tile), pixels(png_bytes(expected))), params
    assert engine.batch.decoder.active == []


def test_a_failing_job_of_one_key_fails_alone_and_the_others_succeed(
    store: SqliteJobStore, storage: LocalStorage, engine: Engine, settings: Settings
) -> None:
    poison_prompt(engine, POISONED)
    bad = [
        submit(store, owner="mallory", text=POISONED, seed=5),
        submit(store, owner="mallory", unchecked=True, seed=6, temperature=1e-45, top_k=16384),
    ]
    bodies: list[dict[str, Any]] = [
        {"seed": 1, "grid_size": 2},
        {"seed": 2, "temperature": 2.0, "supercondition_factor": 128},
    ]
    good = [submit(store, owner=f"owner-{i}", **body) for i, body in enumerate(bodies)]
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(
            pool.map(lambda job: run(job, store, storage, engine, settings), [*bad, *good])
        )
    assert outcomes == [Outcome.DONE] * 4

    poisoned, cold = (store.get_job(job.id) for job in bad)
    assert poisoned is not None and poisoned.status is JobStatus.FAILED
    assert poisoned.error is not None and "could not be decoded" in poisoned.error
    assert "NaN" in poisoned.error and "Traceback" not in poisoned.error
    assert cold is not None and cold.status is JobStatus.FAILED
    assert cold.error is not None and "temperature" in cold.error
    assert stored_files(storage, poisoned.id) == stored_files(storage, cold.id) == {}

    for job, body in zip(good, bodies, strict=True):
        done = store.get_job(job.id)
        assert done is not None and done.status is JobStatus.SUCCEEDED, done
        expected = batch_images(engine, JobParams(text="a red apple", **body))
        grid_size = body.get("grid_size", 1)
        for i in range(grid_size**2):
            tile = pixels(storage.get(image_key(job.id, i)))
            assert torch.equal(
                tile, pixels(png_bytes(expected[model_image_for_tile(i, grid_size)]))
            )
