"""worker.finishing's bounded pools, and run_job's pooled PNG and upload path against a real
SQLite store, real local files and a small real model."""

from __future__ import annotations

import dataclasses
import io
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.job import (
    JobParams,
    JobRecord,
    JobStatus,
    grid_key,
    image_key,
    job_json_key,
    new_job_id,
    result_prefix,
    utc_now,
)
from core.settings import Settings, SettingsError, cpu_count
from core.storage import LocalStorage, StorageUnavailable
from core.store_sqlite import SqliteJobStore
from model.batch import BatchDecoder
from model.generate import SamplingSettings
from tests.farm_helpers import wait_for
from worker.engine import Engine, grid_tiles, png_bytes
from worker.finishing import BoundedPool
from worker.runner import Outcome, run_job

WORKER = "test-finishing@host"
WAIT_S = 60  # only ever reached when something is broken


# -- settings ---------------------------------------------------------------------------------


def test_finishing_settings_default_to_pillows_level_the_cpus_and_eight_uploads() -> None:
    settings = Settings.from_env({})
    assert (settings.png_compression, settings.upload_threads) == (6, 8)
    assert settings.png_threads == cpu_count() >= 1
    assert Settings() == settings
    chosen = Settings.from_env(
        {
            "DALLE_FARM_PNG_COMPRESSION": "1",
            "DALLE_FARM_PNG_THREADS": "3",
            "DALLE_FARM_UPLOAD_THREADS": " 256 ",
        }
    )
    assert (chosen.png_compression, chosen.png_threads, chosen.upload_threads) == (1, 3, 256)
    assert Settings.from_env({"DALLE_FARM_PNG_COMPRESSION": "0"}).png_compression == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("PNG_COMPRESSION", "10", "DALLE_FARM_PNG_COMPRESSION must be from 0 to 9, got 10"),
        ("PNG_COMPRESSION", "-1", "DALLE_FARM_PNG_COMPRESSION must be from 0 to 9, got -1"),
        ("PNG_COMPRESSION", "fast", "DALLE_FARM_PNG_COMPRESSION must be an integer, got 'fast'"),
        ("PNG_THREADS", "0", "DALLE_FARM_PNG_THREADS must be from 1 to 256, got 0"),
        ("UPLOAD_THREADS", "257", "DALLE_FARM_UPLOAD_THREADS must be from 1 to 256, got 257"),
        ("UPLOAD_THREADS", "2.5", "DALLE_FARM_UPLOAD_THREADS must be an integer, got '2.5'"),
    ],
)
def test_bad_finishing_settings_are_refused_by_name(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({f"DALLE_FARM_{name}": value})
    assert str(raised.value) == message


# -- BoundedPool ------------------------------------------------------------------------------


def test_the_submission_past_the_bound_blocks_until_one_finishes() -> None:
    pool = BoundedPool("test-bound", threads=1, bound=2)
    gate = threading.Event()
    ran: list[str] = []

    def item(name: str) -> str:
        gate.wait(WAIT_S)
        ran.append(name)
        return name

    first, second = pool.submit(item, "first"), pool.submit(item, "second")
    submitted = threading.Event()
    third: list[Any] = []

    def submit_third() -> None:
        third.append(pool.submit(item, "third"))
        submitted.set()

    submitter = threading.Thread(target=submit_third)
    submitter.start()
    wait_for(lambda: pool.waiting == 1, WAIT_S, "the third submitter to block at the bound")
    assert not submitted.is_set() and ran == []  # blocked: both slots are still unfinished
    gate.set()
    submitter.join(WAIT_S)
    assert submitted.is_set() and pool.waiting == 0
    assert [first.result(WAIT_S), second.result(WAIT_S), third[0].result(WAIT_S)] == [
        "first",
        "second",
        "third",
    ]
    assert ran == ["first", "second", "third"]


def test_run_all_keeps_a_call_to_its_share_and_the_others_run_beside_it() -> None:
    """A call whose items hang holds `share` threads; another call's items run meanwhile."""
    pool = BoundedPool("test-share", threads=3, bound=6, share=2)
    hung = threading.Event()
    started: list[int] = []

    def hang(number: int) -> int:
        started.append(number)
        hung.wait(WAIT_S)
        return number

    with ThreadPoolExecutor(1) as caller:
        slow = caller.submit(pool.run_all, hang, range(10))
        wait_for(lambda: len(started) == 2, WAIT_S, "the slow call's first two items")
        assert pool.run_all(lambda x: x * x, range(8)) == [x * x for x in range(8)]
        assert sorted(started) == [0, 1] and not slow.done()  # it never got past its share
        hung.set()
        assert slow.result(WAIT_S) == list(range(10))


def test_run_all_stops_at_the_first_error_and_waits_for_the_running_items() -> None:
    pool = BoundedPool("test-error", threads=2, share=2)
    failed = threading.Event()
    running = 0
    lock = threading.Lock()
    seen: list[int] = []

    def item(number: int) -> int:
        nonlocal running
        with lock:
            running += 1
            seen.append(number)
        try:
            if number == 1:
                failed.set()
                raise StorageUnavailable("item 1 could not be stored")
            if number == 0:
                assert failed.wait(WAIT_S)  # finishes only after item 1 failed
            return number
        finally:
            with lock:
                running -= 1

    with pytest.raises(StorageUnavailable, match="item 1"):
        pool.run_all(item, range(50))
    assert running == 0  # nothing of the call still runs once it raised
    assert sorted(seen)[:2] == [0, 1] and len(seen) < 50


# -- run_job through the pools ----------------------------------------------------------------


@pytest.fixture(scope="module")
def settings(small_models_root: Path) -> Settings:
    return Settings(models_root=small_models_root, model="mini", device="cpu", png_threads=2)


@pytest.fixture(scope="module")
def engine(settings: Settings) -> Iterator[Engine]:
    engine = Engine.load(settings)
    yield engine
    engine.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteJobStore]:
    with SqliteJobStore(tmp_path / "farm.db") as job_store:
        yield job_store


def submit(store: SqliteJobStore, **params: Any) -> JobRecord:
    record = JobRecord(
        id=new_job_id(),
        owner="owner",
        status=JobStatus.QUEUED,
        params=JobParams(text="a red apple", **params).to_dict(),
        created_at=utc_now(),
    )
    return store.create_job(record)[0]


def run(
    job: JobRecord, store: SqliteJobStore, storage: Any, engine: Any, settings: Settings
) -> Outcome:
    return run_job(
        job.id, store=store, storage=storage, engine=engine, worker_name=WORKER, settings=settings
    )


def stored(storage: LocalStorage, job_id: str) -> dict[str, bytes]:
    folder = storage.root / result_prefix(job_id)
    return {
        path.relative_to(storage.root).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file()
    }


def sequential_grid(engine: Engine, params: JobParams) -> torch.Tensor:
    """The job's grid from a decoder of its own, as the job thread alone would render it."""
    decoder = BatchDecoder(engine.model)
    sampling = SamplingSettings(params.temperature, params.top_k, params.supercondition_factor)
    decoder.add("alone", params.text, params.seed, params.grid_size, sampling)
    done: dict[str, torch.Tensor] = {}
    while not done:
        done = decoder.step().finished
    return engine.model.detokenize(done["alone"], params.is_seamless)


class GatedStorage(LocalStorage):
    """Real local files; puts of the keys `gated` picks wait for `gate` (a stalled upload), and
    puts of the keys `failing` picks fail as an unreachable S3 would."""

    def __init__(
        self,
        root: Path,
        gated: Callable[[str], bool] = lambda key: False,
        failing: Callable[[str], bool] = lambda key: False,
    ) -> None:
        super().__init__(root)
        self.gated, self.failing = gated, failing
        self.gate, self.blocked = threading.Event(), threading.Event()
        self.active = 0
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with self._lock:
            self.active += 1
        try:
            if self.failing(key):
                raise StorageUnavailable(f"could not upload {key}: connection refused")
            if self.gated(key):
                self.blocked.set()
                assert self.gate.wait(WAIT_S), "the gate was never opened"
            super().put(key, data, content_type)
        finally:
            with self._lock:
                self.active -= 1


def test_the_pooled_path_stores_the_objects_the_sequential_path_would(
    store: SqliteJobStore, tmp_path: Path, engine: Engine, settings: Settings
) -> None:
    storage = LocalStorage(tmp_path / "files")
    params = JobParams(text="a red apple", seed=7, grid_size=2)
    job = submit(store, seed=7, grid_size=2)
    assert run(job, store, storage, engine, settings) is Outcome.DONE

    grid = sequential_grid(engine, params)
    tiles = [image_key(job.id, i) for i in range(4)]
    expected = {key: png_bytes(tile) for key, tile in zip(tiles, grid_tiles(grid, 2), strict=True)}
    expected[grid_key(job.id)] = png_bytes(grid)
    files = stored(storage, job.id)
    job_json = json.loads(files.pop(job_json_key(job.id)))
    assert files == expected  # the same keys, byte for byte

    assert list(job_json) == [
        "id", "params", "seed", "model", "weights", "worker", "attempts", "resumed_from",
        "timings", "result",
    ]  # fmt: skip
    assert list(job_json["timings"]) == [
        "created_at", "started_at", "finished_at", "queued_s", "render_s", "decode_s",
        "vqgan_s", "png_s", "upload_s",
    ]  # fmt: skip
    assert job_json["result"] == {"grid": grid_key(job.id), "images": tiles}
    assert list(job_json["result"]) == ["grid", "images"]
    assert (job_json["id"], job_json["seed"], job_json["worker"]) == (job.id, 7, WORKER)
    assert job_json["params"] == params.to_dict()
    done = store.get_job(job.id)
    assert done is not None and done.status is JobStatus.SUCCEEDED
    assert done.result == job_json["result"]


def test_another_compression_level_stores_the_same_pixels(engine: Engine) -> None:
    fast = Engine(
        engine.model, engine.weights, max_rows=8, png_compression=0, png_pool=engine.png_pool
    )
    try:
        rendered = fast.render(JobParams(text="a red apple", seed=7))
    finally:
        fast.close()
    grid = sequential_grid(engine, JobParams(text="a red apple", seed=7))
    default = png_bytes(grid)
    assert rendered.grid_png != default and len(rendered.grid_png) > len(default)
    decoded = np.asarray(Image.open(io.BytesIO(rendered.grid_png)).convert("RGB"))
    assert np.array_equal(decoded, grid.to(torch.uint8).numpy())


def test_a_stalled_upload_of_one_job_does_not_hold_back_another(
    store: SqliteJobStore, tmp_path: Path, engine: Engine, settings: Settings
) -> None:
    # One upload thread per job: had the jobs shared it, B's uploads would wait behind A's.
    one_each = dataclasses.replace(settings, upload_threads=1)
    slow, quick = submit(store, seed=1, grid_size=2), submit(store, seed=2, grid_size=2)
    prefix = f"{result_prefix(slow.id)}/"
    storage = GatedStorage(tmp_path / "files", gated=lambda key: key.startswith(prefix))
    try:
        with ThreadPoolExecutor(1) as thread:
            stalled = thread.submit(run, slow, store, storage, engine, one_each)
            assert storage.blocked.wait(WAIT_S), "job A never reached its upload"
            assert run(quick, store, storage, engine, one_each) is Outcome.DONE
            done = store.get_job(quick.id)
            assert done is not None and done.status is JobStatus.SUCCEEDED
            assert job_json_key(quick.id) in stored(storage, quick.id)
            # A is still stuck in its upload, and has committed nothing.
            assert not stalled.done()
            waiting = store.get_job(slow.id)
            assert waiting is not None and waiting.status is JobStatus.RUNNING
            assert not storage.exists(job_json_key(slow.id))
            storage.gate.set()
            assert stalled.result(WAIT_S) is Outcome.DONE
    finally:
        storage.gate.set()
    finished = store.get_job(slow.id)
    assert finished is not None and finished.status is JobStatus.SUCCEEDED
    assert len(stored(storage, slow.id)) == 6  # 4 tiles, the grid, job.json


def test_a_failed_tile_upload_hands_the_job_back_with_no_job_json(
    store: SqliteJobStore, tmp_path: Path, engine: Engine, settings: Settings
) -> None:
    job = submit(store, seed=3, grid_size=2)
    storage = GatedStorage(tmp_path / "files", failing=lambda key: key == image_key(job.id, 2))
    with pytest.raises(StorageUnavailable, match="connection refused"):
        run(job, store, storage, engine, settings)
    assert storage.active == 0  # no upload of the job goes on after run_job raised
    assert not storage.exists(job_json_key(job.id))
    assert not storage.exists(image_key(job.id, 2))
    waiting = store.get_job(job.id)
    assert waiting is not None
    assert (waiting.status, waiting.attempts, waiting.result) == (JobStatus.QUEUED, 0, None)
    assert waiting.error is not None and "storage unavailable" in waiting.error
    assert store.lease_holder(job.id) is None
