"""BatchDecoder: continuous batching whose tokens do not depend on the batch."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from model.batch import NAN_CHECK_EVERY, BatchDecoder, BatchFull, JobFailed
from model.batch_ops import TorchOps
from model.config import IMAGE_TOKEN_COUNT
from model.generate import MIN_TEMPERATURE, SamplingSettings
from model.min_dalle import MinDalle


@dataclass(frozen=True)
class Spec:
    job_id: str
    text: str
    seed: int
    grid_size: int
    settings: SamplingSettings


TEXTS = [
    "a painting of a fox in the snow",
    "an astronaut riding a horse on the moon",
    "a bowl of soup that looks like a monster",
    "an armchair in the shape of an avocado",
    "sunset over the mountains with a lake",
    "the face of a smiling cat with a red hat",
]

# Different texts, seeds, grid sizes, temperatures, top_k and supercondition factors.
SPECS = [
    Spec(
        f"job{i}",
        TEXTS[i % len(TEXTS)],
        seed=100 + i,
        grid_size=1 + i % 2,
        settings=SamplingSettings(
            temperature=(0.5, 1.0, 2.0)[i % 3],
            top_k=(1, 16, 64, 256, 2048)[i % 5],
            supercondition_factor=(1.0, 4.0, 16.0, 32.0)[i % 4],
        ),
    )
    for i in range(11)
]


# (Invariance across row counts is a kernel-shape question, not a thread-count one:
# test_blocked_linear_is_invariant_to_rows_and_slot runs with the default threads too.)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


def run(
    engine: BatchDecoder,
    schedule: dict[int, list[Spec]],
    cancel: dict[int, list[str]] | None = None,
    failed: dict[str, JobFailed] | None = None,
    before: dict[int, Callable[[], None]] | None = None,
) -> dict[str, Tensor]:
    """Step the engine until it is empty, adding (and canceling) jobs before the given steps.

    Jobs that fail go into `failed` (none may fail without it); `before[step]()` runs before
    that step, after its jobs joined."""
    results: dict[str, Tensor] = {}
    failures: dict[str, JobFailed] = {} if failed is None else failed
    step = 0
    while engine.active or any(at >= step for at in schedule):
        for spec in schedule.get(step, []):
            engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
        for job_id in (cancel or {}).get(step, []):
            engine.cancel(job_id)
        if before and step in before:
            before[step]()
        result = engine.step()
        assert not result.finished.keys() & result.failed.keys()
        for job_id, tokens in result.finished.items():
            assert job_id not in results
            results[job_id] = tokens
        failures.update(result.failed)
        step += 1
    assert engine.active == []
    assert failed is not None or not failures, failures
    return results


def with_page_attention(engine: BatchDecoder, page_attention: bool) -> None:
    """The GPU's self-attention (one masked attention per page) on the CPU."""
    assert isinstance(engine.paged.ops, TorchOps)
    engine.paged.ops.page_attention = page_attention


_alone_cache: dict[Spec, Tensor] = {}


def alone(model: MinDalle, spec: Spec) -> Tensor:
    if spec not in _alone_cache:
        _alone_cache[spec] = run(BatchDecoder(model), {0: [spec]})[spec.job_id]
    return _alone_cache[spec]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("in_out", [(64, 16384), (1024, 2730), (2730, 1024)])
def test_blocked_linear_is_invariant_to_rows_and_slot(
    model: MinDalle, threads: int, in_out: tuple[int, int]
) -> None:
    """A row's product is the same whatever the row count and its slot in the block (Mini's
    shapes too), while a plain product's row depends on the row count on MKL."""
    engine = BatchDecoder(model)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(in_out[1], in_out[0], generator=generator) / in_out[0] ** 0.5
    row = torch.randn(in_out[0], generator=generator)

    def with_row(total: int, slot: int) -> Tensor:
        x = torch.randn(total, in_out[0], generator=generator)
        x[slot] = row
        return x

    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            blocked = [
                engine.paged.ops.linear(with_row(total, slot), weight)[slot]
                for total, slot in [(16, 0), (16, 15), (32, 7), (48, 40), (64, 17)]
            ]
            plain = [F.linear(with_row(m, 0), weight)[0] for m in (1, 2, 8, 48)]
    finally:
        torch.set_num_threads(1)
    assert all(torch.equal(result, blocked[0]) for result in blocked)
    varies = not all(torch.equal(result, plain[0]) for result in plain)
    print(f"plain F.linear {in_out}: row varies with row count: {varies}")


def test_alone_equals_among_ten(model: MinDalle) -> None:
    batched = run(BatchDecoder(model), {0: SPECS})
    assert set(batched) == {spec.job_id for spec in SPECS}
    for spec in SPECS:
        expected = alone(model, spec)
        assert batched[spec.job_id].shape == (spec.grid_size**2, IMAGE_TOKEN_COUNT)
        assert torch.equal(batched[spec.job_id], expected), spec
    spec = SPECS[1]  # a 2×2 grid
    assert torch.equal(model.detokenize(batched[spec.job_id]), model.detokenize(alone(model, spec)))


def test_join_mid_flight(model: MinDalle) -> None:
    first, late = SPECS[3], SPECS[4]
    batched = run(BatchDecoder(model), {0: [first], 100: [late]})
    assert torch.equal(batched[first.job_id], alone(model, first))
    assert torch.equal(batched[late.job_id], alone(model, late))


def test_page_attention_equals_per_job_attention(model: MinDalle) -> None:
    """The GPU's self-attention (one masked attention per page over the positions up to its
    furthest row, keys and values written by index) gives the CPU path's tokens, with jobs of
    two grid sizes joining at different steps and one canceled."""
    engine = BatchDecoder(model)
    with_page_attention(engine, True)
    schedule = {0: SPECS[:4], 40: SPECS[4:8], 100: SPECS[8:]}
    batched = run(engine, schedule, cancel={60: [SPECS[5].job_id]})
    assert set(batched) == {spec.job_id for spec in SPECS} - {SPECS[5].job_id}
    for spec in SPECS:
        if spec.job_id in batched:
            assert torch.equal(batched[spec.job_id], alone(model, spec)), spec.job_id


def test_jobs_spread_over_pages(model: MinDalle, monkeypatch: pytest.MonkeyPatch) -> None:
    """With pages of 4 rows (two 1×1 jobs, or one 2×2), jobs fill several pages, freed slots
    are reused, and an emptied page is freed when a new page is needed."""
    monkeypatch.setattr("model.batch.PAGE_ROWS", 4)
    engine = BatchDecoder(model)
    cancel = {20: [SPECS[0].job_id, SPECS[2].job_id]}  # empties the first 1×1 page
    batched = run(engine, {0: SPECS[:5], 30: SPECS[5:8]}, cancel=cancel)
    assert set(batched) == {spec.job_id for spec in SPECS[:8]} - set(cancel[20])
    for spec in SPECS[:8]:
        if spec.job_id in batched:
            assert torch.equal(batched[spec.job_id], alone(model, spec)), spec.job_id
    assert len(engine._pages[1]) == 1  # the emptied one was freed when a 2×2 job needed a page
    assert len(engine._pages[4]) == 4  # one per 2×2 job


def test_cancel_mid_batch(model: MinDalle) -> None:
    specs = SPECS[:4]
    engine = BatchDecoder(model)
    batched = run(engine, {0: specs}, cancel={50: [specs[2].job_id]})
    assert set(batched) == {specs[0].job_id, specs[1].job_id, specs[3].job_id}
    for spec in (specs[0], specs[1], specs[3]):
        assert torch.equal(batched[spec.job_id], alone(model, spec))
    with pytest.raises(KeyError):
        engine.progress(specs[2].job_id)


@pytest.mark.parametrize("checkpoint_at", [96, 128])
def test_resume_from_checkpoint(model: MinDalle, checkpoint_at: int) -> None:
    spec, other = SPECS[1], SPECS[2]
    engine = BatchDecoder(model)
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
    engine.add(other.job_id, other.text, other.seed, other.grid_size, other.settings)
    for _ in range(checkpoint_at):
        assert engine.step().finished == {}
    assert engine.progress(spec.job_id) == checkpoint_at
    checkpoint = engine.tokens(spec.job_id)
    assert checkpoint.shape == (spec.grid_size**2, checkpoint_at)
    del engine  # the worker died

    # Resumed on another engine, alongside a job that is just starting.
    engine = BatchDecoder(model)
    engine.add(SPECS[5].job_id, SPECS[5].text, SPECS[5].seed, SPECS[5].grid_size, SPECS[5].settings)
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings, checkpoint)
    assert engine.progress(spec.job_id) == checkpoint_at
    assert torch.equal(engine.tokens(spec.job_id), checkpoint)
    for _ in range(checkpoint_at):
        engine.step()
    assert engine.replay_mismatches(spec.job_id) == 0
    results = run(engine, {})
    assert torch.equal(results[spec.job_id], alone(model, spec))
    assert torch.equal(results[SPECS[5].job_id], alone(model, SPECS[5]))


def test_resume_keeps_a_checkpoint_it_does_not_reproduce(
    model: MinDalle, caplog: pytest.LogCaptureFixture
) -> None:
    spec = SPECS[1]
    engine = BatchDecoder(model)
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
    for _ in range(32):
        engine.step()
    checkpoint = engine.tokens(spec.job_id)
    checkpoint[0, 10] = (checkpoint[0, 10] + 1) % 16384  # as if other weights had written it

    engine = BatchDecoder(model)
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings, checkpoint)
    for _ in range(31):
        engine.step()
    assert engine.replay_mismatches(spec.job_id) == 0  # counted when the replay ends
    with caplog.at_level("WARNING", logger="model.batch"):
        engine.step()
    assert engine.replay_mismatches(spec.job_id) >= 1
    assert "checkpoint tokens were not reproduced" in caplog.text
    assert torch.equal(engine.tokens(spec.job_id)[:, :32], checkpoint)


@pytest.mark.parametrize("batched_draw", [False, True])
def test_no_settings_leak(model: MinDalle, batched_draw: bool) -> None:
    """Same text and seed, different settings (top_k 1 and 16384, temperature 0.5 and 3,
    supercondition 1 and 32): only the settings tell the jobs apart, drawn per job (the CPU)
    or in one draw over all rows (as on CUDA)."""
    text, seed = TEXTS[0], 7
    specs = [
        Spec("greedy", text, seed, 1, SamplingSettings(1.0, 1, 16.0)),
        Spec("wide", text, seed, 1, SamplingSettings(1.0, 16384, 16.0)),
        Spec("cold", text, seed, 1, SamplingSettings(0.5, 256, 16.0)),
        Spec("hot", text, seed, 2, SamplingSettings(3.0, 256, 16.0)),
        Spec("unguided", text, seed, 1, SamplingSettings(1.0, 256, 1.0)),
        Spec("loud", text, seed, 1, SamplingSettings(1.0, 256, 32.0)),
    ]
    engine = BatchDecoder(model)
    engine.batched_draw = batched_draw
    batched = run(engine, {0: specs})
    for spec in specs:
        assert torch.equal(batched[spec.job_id], alone(model, spec)), spec.job_id
    assert len({tuple(t.flatten().tolist()) for t in batched.values()}) == len(specs)


def test_jobs_leave_when_done(model: MinDalle) -> None:
    engine = BatchDecoder(model)
    spec = SPECS[0]
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
    for step in range(1, IMAGE_TOKEN_COUNT):
        assert engine.step().finished == {}
        assert engine.progress(spec.job_id) == step
    result = engine.step()
    assert list(result.finished) == [spec.job_id] and result.failed == {}
    assert engine.active == []
    assert engine.step().finished == {}


def test_each_text_row_is_encoded_once(model: MinDalle) -> None:
    engine = BatchDecoder(model)
    encoded: list[list[int]] = []
    hook = engine.encoder.register_forward_hook(
        lambda module, args, output: encoded.extend(args[0].tolist())
    )
    try:
        cat, dog = SPECS[0], SPECS[1]
        twin = Spec("twin", cat.text, cat.seed + 1, cat.grid_size, cat.settings)
        results = run(engine, {0: [cat, dog], 3: [twin]})
    finally:
        hook.remove()
    # The unconditioned row `<s></s>` once, then each prompt's conditioned row once.
    assert len(encoded) == 3
    assert len({tuple(row) for row in encoded}) == 3
    for spec in (cat, dog, twin):
        assert torch.equal(results[spec.job_id], alone(model, spec)), spec.job_id


def test_max_rows_and_bad_input(model: MinDalle) -> None:
    engine = BatchDecoder(model, max_rows=10)
    settings = SamplingSettings()
    engine.add("a", "a fox", 1, 2, settings)  # 8 rows
    with pytest.raises(BatchFull, match="max_rows"):
        engine.add("b", "a fox", 1, 2, settings)
    engine.add("c", "a fox", 1, 1, settings)  # 2 more rows fit
    with pytest.raises(ValueError, match="already"):
        engine.add("c", "a fox", 1, 1, settings)
    engine.cancel("a")
    engine.add("b", "a fox", 1, 2, settings)  # room again
    with pytest.raises(ValueError, match="checkpoint"):
        BatchDecoder(model).add("d", "a fox", 1, 2, settings, torch.zeros(1, 5, dtype=torch.long))


def test_greedy_against_min_dalle_stream(model: MinDalle) -> None:
    """Report only: the stream's products take other kernels than the blocked ones."""
    spec = Spec("g", TEXTS[1], 3, 1, SamplingSettings(1.0, 1, 16.0))
    (stream,) = model.generate_image_tokens_stream(spec.text, spec.seed, 1, top_k=1)
    same = int((stream == alone(model, spec)).sum())
    print(f"greedy: {same}/{IMAGE_TOKEN_COUNT} tokens equal MinDalle's stream")


# -- one job's failure is its own -----------------------------------------------------------


def forged(settings: SamplingSettings, **values: float) -> SamplingSettings:
    """Settings with values SamplingSettings would refuse (as a caller's own object may hold)."""
    for name, value in values.items():
        object.__setattr__(settings, name, value)
    return settings


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("temperature", 5e-324),
        ("temperature", 1e-45),
        ("temperature", MIN_TEMPERATURE / 2),
        ("temperature", 0.0),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("supercondition_factor", 128.5),
        ("supercondition_factor", -1.0),
        ("supercondition_factor", math.nan),
        ("top_k", 0),
        ("top_k", 16385),
    ],
)
def test_settings_the_sampler_cannot_compute_are_refused_at_add(
    model: MinDalle, setting: str, value: float
) -> None:
    engine = BatchDecoder(model)
    engine.add("good", TEXTS[0], 1, 1, SamplingSettings())
    settings = forged(SamplingSettings(), **{setting: value})
    with pytest.raises(ValueError, match=rf"{setting} must be") as refused:
        engine.add("bad", TEXTS[1], 2, 1, settings)
    assert "got" in str(refused.value)
    assert engine.active == ["good"] and engine.rows == 2
    if setting != "supercondition_factor":  # MinDalle takes any finite factor, as min-dalle
        kwargs: dict[str, Any] = {setting: value}
        with pytest.raises(ValueError, match=setting):
            SamplingSettings(**kwargs)


def test_settings_at_the_edges_of_their_ranges_decode_beside_other_jobs(model: MinDalle) -> None:
    """The ranges' ends, and prompts that are nothing but <s></s> or overflow the 64 tokens,
    decode next to ordinary jobs, each with its own tokens alone."""
    edges = [
        Spec("coldest", TEXTS[0], 1, 1, SamplingSettings(MIN_TEMPERATURE, 16384, 128.0)),
        Spec("hottest", TEXTS[1], 2, 2, SamplingSettings(100.0, 16384, 0.0)),
        Spec("greedy", TEXTS[2], 2**31 - 1, 1, SamplingSettings(MIN_TEMPERATURE, 1, 0.0)),
        Spec("loudest", TEXTS[3], 4, 1, SamplingSettings(100.0, 1, 128.0)),
        Spec("empty", "", 5, 1, SamplingSettings()),
        Spec("no tokens", "日本語 ✓", 6, 1, SamplingSettings(0.5, 2, 1.0)),
        Spec("long", "fox " * 250, 7, 1, SamplingSettings()),
    ]
    batched = run(BatchDecoder(model), {0: [*edges, *SPECS[:3]]})
    for spec in [*edges, *SPECS[:3]]:
        assert torch.equal(batched[spec.job_id], alone(model, spec)), spec.job_id


def poison(engine: BatchDecoder, job_id: str) -> None:
    """Make a job's conditioned text row NaN, as a model whose numbers overflow for its prompt
    would: every one of its logits becomes NaN at the next step."""
    job = engine._jobs[job_id]
    with torch.inference_mode():  # the decoder's tensors are inference tensors
        for keys in job.page.text_keys:
            keys[2 * job.slot + 1] = math.nan


@pytest.mark.parametrize("page_attention", [False, True])
@pytest.mark.parametrize("poisoned_at", [5, IMAGE_TOKEN_COUNT - 1])
def test_a_job_with_nan_logits_fails_alone_and_the_others_keep_their_tokens(
    model: MinDalle, page_attention: bool, poisoned_at: int
) -> None:
    """The failed job leaves at the next NaN check (or instead of finishing), and a job that
    takes its slot afterwards decodes as it would alone (no NaN left in the slot's caches)."""
    engine = BatchDecoder(model)
    with_page_attention(engine, page_attention)
    bad = Spec("bad", TEXTS[4], 50, 2, SamplingSettings(1.0, 64, 16.0))
    others = [SPECS[0], SPECS[1], SPECS[2]]  # 1×1 and 2×2 grids, other settings
    late = SPECS[3]  # 2×2: it takes the slot the bad job left
    failed: dict[str, JobFailed] = {}
    joins_at = poisoned_at + NAN_CHECK_EVERY
    slots: dict[str, tuple[int, int]] = {}

    def remember_slot(job_id: str) -> Callable[[], None]:
        def remember() -> None:
            job = engine._jobs[job_id]
            slots[job_id] = (job.page.id, job.slot)

        return remember

    results = run(
        engine,
        {0: [bad, *others], joins_at: [late]},
        failed=failed,
        before={
            0: remember_slot("bad"),
            poisoned_at: lambda: poison(engine, "bad"),
            joins_at: remember_slot(late.job_id),
        },
    )
    assert set(failed) == {"bad"} and "bad" not in results
    assert "could not be decoded" in str(failed["bad"]) and "NaN" in str(failed["bad"])
    assert slots[late.job_id] == slots["bad"]
    for spec in [*others, late]:
        assert torch.equal(results[spec.job_id], alone(model, spec)), spec.job_id


def test_settings_are_the_job_s_own_from_add(model: MinDalle) -> None:
    """The sampler reads the settings copied in at `add`: changing the caller's object later
    (here to a top_k torch.topk would refuse) changes nothing."""
    engine = BatchDecoder(model)
    spec = Spec("job", TEXTS[5], 9, 1, SamplingSettings())
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
    forged(spec.settings, top_k=20000, temperature=math.nan)
    results = run(engine, {})
    assert torch.equal(
        results["job"], alone(model, Spec("job", TEXTS[5], 9, 1, SamplingSettings()))
    )
