"""worker/batching.py: the engine thread that decodes the jobs of many threads as one batch."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import Tensor

from model.bart import TextContext
from model.batch import BatchDecoder, JobFailed
from model.generate import SamplingSettings
from model.min_dalle import MinDalle
from worker.batching import CHECKPOINT_EVERY, BatchEngine

SETTINGS = SamplingSettings()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


def alone(
    model: MinDalle, text: str, seed: int, grid_size: int = 1, settings: SamplingSettings = SETTINGS
) -> Tensor:
    decoder = BatchDecoder(model)
    decoder.add("alone", text, seed, grid_size, settings)
    while True:
        for tokens in decoder.step().finished.values():
            return tokens


def poison_prompt(engine: BatchEngine, text: str) -> None:
    """Make the engine's encoding of `text` NaN (its conditioned row), as a model whose numbers
    overflow for that prompt would. Call it while no job is in flight."""
    decoder = engine.decoder
    _, conditioned = model_rows = decoder.model._text_tokens(text)
    assert not torch.equal(*model_rows)
    context = decoder._row_context(conditioned)
    with torch.inference_mode():
        nan = [torch.full_like(keys, math.nan) for keys in context.keys]
        decoder._text_rows[tuple(conditioned.tolist())] = TextContext(
            nan, context.values, context.attention_mask
        )


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


def test_a_job_that_fails_in_the_decoder_or_its_callbacks_fails_alone(model: MinDalle) -> None:
    """Among jobs of other prompts, grids and settings decoding on their own threads: one whose
    logits become NaN, one whose snapshot callback raises, and one refused for its settings each
    fail with their own error; every other job gets the tokens it gets alone."""
    engine = BatchEngine(model, max_rows=64)
    poison_prompt(engine, "a poisoned prompt")

    class Broken(Exception):
        pass

    def broken_snapshot(step: int, tokens: Tensor) -> None:
        raise Broken(f"could not store the checkpoint at {step}")

    bad_factor = SamplingSettings(1.0, 256, 16.0)
    object.__setattr__(bad_factor, "supercondition_factor", 1000.0)
    good = [
        ("a dog", 6, 2, SamplingSettings(0.5, 16, 4.0)),
        ("a cat", 7, 1, SamplingSettings(2.0, 2048, 32.0)),
        ("a boat", 8, 1, SETTINGS),
    ]
    try:
        with ThreadPoolExecutor(6) as pool:
            nan = pool.submit(engine.decode, "nan", "a poisoned prompt", 5, 1, SETTINGS)
            snapshot = pool.submit(
                engine.decode, "snap", "a fox", 5, 2, SETTINGS, on_snapshot=broken_snapshot
            )
            refused = pool.submit(engine.decode, "refused", "a fox", 5, 1, bad_factor)
            others = [
                pool.submit(engine.decode, f"good{i}", text, seed, grid, settings)
                for i, (text, seed, grid, settings) in enumerate(good)
            ]
            with pytest.raises(JobFailed, match="NaN"):
                nan.result()
            with pytest.raises(Broken, match="checkpoint at 32"):
                snapshot.result()
            with pytest.raises(ValueError, match="supercondition_factor must be between 0 and"):
                refused.result()
            tokens = [future.result() for future in others]
        for (text, seed, grid, settings), result in zip(good, tokens, strict=True):
            assert torch.equal(result, alone(model, text, seed, grid, settings)), text
        assert engine.decoder.active == [] and engine.decoder.rows == 0
    finally:
        engine.close()


def test_a_failing_shared_step_fails_its_jobs_and_the_engine_goes_on(
    model: MinDalle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step whose shared work raises (as out of memory would) fails every job in it, at
    once, and the next jobs decode as usual."""
    engine = BatchEngine(model, max_rows=64)
    started = threading.Event()
    steps = 0
    real_step = engine.decoder.step

    def step_failing_at_10() -> object:
        nonlocal steps
        steps += 1
        if steps == 10:
            raise MemoryError("out of memory in the decoder step")
        return real_step()

    monkeypatch.setattr(engine.decoder, "step", step_failing_at_10)
    try:
        with ThreadPoolExecutor(2) as pool:
            jobs = [
                pool.submit(
                    engine.decode,
                    f"job{seed}",
                    "a fox",
                    seed,
                    1,
                    SETTINGS,
                    on_step=lambda step, total: started.set(),
                )
                for seed in (1, 2)
            ]
            for job in jobs:
                with pytest.raises(MemoryError, match="out of memory"):
                    job.result(timeout=600)
        assert started.is_set()
        assert torch.equal(
            engine.decode("after", "a fox", 3, 1, SETTINGS), alone(model, "a fox", 3)
        )
    finally:
        engine.close()
