"""worker/batching.py: the engine thread that decodes the jobs of many threads as one batch."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import Tensor

from model.batch import BatchDecoder
from model.generate import SamplingSettings
from model.min_dalle import MinDalle
from worker.batching import CHECKPOINT_EVERY, BatchEngine

SETTINGS = SamplingSettings()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


def alone(model: MinDalle, text: str, seed: int, grid_size: int = 1) -> Tensor:
    decoder = BatchDecoder(model)
    decoder.add("alone", text, seed, grid_size, SETTINGS)
    while True:
        for _, tokens in decoder.step():
            return tokens


def test_jobs_wait_for_room_in_arrival_order_and_all_finish(model: MinDalle) -> None:
    engine = BatchEngine(model, max_rows=4)  # two one-image jobs at a time
    in_batch: list[int] = []
    try:

        def decode(seed: int) -> Tensor:
            return engine.decode(
                f"job{seed}",
                "a fox",
                seed,
                1,
                SETTINGS,
                on_step=lambda step, total: in_batch.append(engine.decoder.rows),
            )

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(decode, [1, 2, 3, 4]))
    finally:
        engine.close()
    assert max(in_batch) <= 4
    for seed, tokens in zip([1, 2, 3, 4], results, strict=True):
        assert torch.equal(tokens, alone(model, "a fox", seed))


def test_an_exception_in_on_step_drops_the_job_and_the_others_go_on(model: MinDalle) -> None:
    engine = BatchEngine(model, max_rows=64)

    class Stop(Exception):
        pass

    def stop_at_10(step: int, total: int) -> None:
        if step >= 10:
            raise Stop

    try:
        with ThreadPoolExecutor(2) as pool:
            doomed = pool.submit(
                engine.decode, "doomed", "a cat", 5, 1, SETTINGS, on_step=stop_at_10
            )
            other = pool.submit(engine.decode, "other", "a dog", 6, 2, SETTINGS)
            with pytest.raises(Stop):
                doomed.result()
            tokens = other.result()
        assert torch.equal(tokens, alone(model, "a dog", 6, grid_size=2))
        # The dropped job left no rows behind.
        assert engine.decoder.active == [] and engine.decoder.rows == 0
    finally:
        engine.close()


def test_snapshots_come_every_32_tokens_and_a_resume_continues_from_one(model: MinDalle) -> None:
    engine = BatchEngine(model, max_rows=64)
    snapshots: list[tuple[int, Tensor]] = []
    try:
        full = engine.decode(
            "first", "a boat", 9, 2, SETTINGS, on_snapshot=lambda s, t: snapshots.append((s, t))
        )
        assert [step for step, _ in snapshots] == list(range(CHECKPOINT_EVERY, 256, 32))
        step, tokens = snapshots[2]
        assert torch.equal(tokens, full[:, :step])

        resumed_snapshots: list[int] = []
        resumed = engine.decode(
            "again",
            "a boat",
            9,
            2,
            SETTINGS,
            resume=tokens.tolist(),
            on_snapshot=lambda s, t: resumed_snapshots.append(s),
        )
        assert torch.equal(resumed, full)
        assert resumed_snapshots == list(range(step + CHECKPOINT_EVERY, 256, 32))
    finally:
        engine.close()


def test_a_grid_too_big_for_the_batch_and_a_closed_engine_fail_clearly(model: MinDalle) -> None:
    engine = BatchEngine(model, max_rows=4)
    with pytest.raises(ValueError, match="needs 8 decoder rows"):
        engine.decode("big", "a fox", 1, 2, SETTINGS)

    started = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(
            engine.decode, "slow", "a fox", 1, 1, SETTINGS, on_step=lambda s, t: started.set()
        )
        assert started.wait(60)
        engine.close()
        with pytest.raises(RuntimeError, match="closed"):
            waiting.result()
    with pytest.raises(RuntimeError, match="closed"):
        engine.decode("late", "a fox", 1, 1, SETTINGS)
