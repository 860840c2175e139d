"""The farm's sampler (model/sampler.py): its draw, its keys, the batched draw in BatchDecoder."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor

from model.batch import BatchDecoder
from model.config import VQGAN_CODE_COUNT
from model.generate import MIN_TEMPERATURE, guided_probs
from model.min_dalle import MinDalle
from model.sampler import draw, image_key, mix, mix_int, step_keys, supercondition, width_for
from tests.test_batch import SPECS, alone, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V = VQGAN_CODE_COUNT


def keys_for(count: int, seed: int = 1) -> Tensor:
    images = torch.tensor([image_key(seed, image) for image in range(count)])
    return step_keys(images, torch.zeros(count, dtype=torch.long))


def draw_rows(
    logits: torch.Tensor, temperature: float, top_k: int, keys: torch.Tensor
) -> torch.Tensor:
    rows = logits.shape[0]
    tokens, is_nan = draw(
        logits,
        torch.full((rows, 1), temperature),
        torch.full((rows,), top_k),
        keys,
        width_for(top_k),
    )
    assert not is_nan.any()
    return tokens


def test_mix_is_a_32_bit_hash_and_the_host_s_equals_the_device_s() -> None:
    values = torch.tensor([0, 1, 2, 255, 2**31, 2**32 - 1])
    mixed = mix(values)
    assert mixed.tolist() == [mix_int(int(v)) for v in values]
    assert int(mixed.min()) >= 0 and int(mixed.max()) < 2**32
    assert len(set(mixed.tolist())) == len(values)


def test_image_keys_use_every_bit_of_the_seed() -> None:
    keys = {image_key(seed, 0) for seed in (1, 2, 2**32 + 1, 2**62 + 1, 2**63 - 1)}
    assert len(keys) == 5
    assert image_key(5, 0) != image_key(5, 1)


def test_draws_follow_the_softmax_of_the_top_k() -> None:
    """Over many keys, each code is drawn about as often as min-dalle's distribution says:
    ∝ exp((logit − max) / temperature) over the top k, never outside them."""
    codes = 64  # of the V: a narrower row samples alike, faster
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0] + [-3.0] * (codes - 5))
    draws = 40_000
    tokens = draw_rows(logits.expand(draws, codes).contiguous(), 0.8, 4, keys_for(draws))
    counts = torch.bincount(tokens, minlength=codes).double()
    assert counts[4:].sum() == 0  # only the top 4
    expected = torch.softmax(logits[:4].double() / 0.8, dim=0) * draws
    chi2 = float(((counts[:4] - expected) ** 2 / expected).sum())
    assert chi2 < 16.3, (counts[:4], expected)  # p = 0.001 with 3 degrees of freedom


def test_top_k_keeps_exactly_k_codes_ties_to_the_lower_code() -> None:
    logits = torch.zeros(2000, V)
    logits[:, [7, 3, 9]] = 5.0  # three tied best codes
    tokens = draw_rows(logits, 1.0, 2, keys_for(2000))
    assert set(tokens.tolist()) == {3, 7}
    greedy = draw_rows(logits[:5], MIN_TEMPERATURE, 1, keys_for(5))
    assert greedy.tolist() == [3] * 5


def test_coldest_temperature_draws_the_best_code() -> None:
    logits = torch.randn(64, V, generator=torch.Generator().manual_seed(0))
    tokens = draw_rows(logits, MIN_TEMPERATURE, V, keys_for(64))
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_a_row_s_draw_depends_on_nothing_else_in_the_call() -> None:
    """Rows with other settings, other widths and NaN logits beside it leave a row's token and
    NaN flag alone; the width (set by the widest row) does not change the kept codes."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(6, V, generator=generator) * 3
    logits[4] = math.nan
    temperature = torch.tensor([[0.5], [3.0], [1.0], [MIN_TEMPERATURE], [1.0], [2.0]])
    top_k = torch.tensor([1, 16384, 256, 2, 256, 16])
    keys = keys_for(6, seed=9)
    together, is_nan = draw(logits, temperature, top_k, keys, V)
    assert is_nan.tolist() == [False, False, False, False, True, False]
    for row in (0, 1, 2, 3, 5):
        for width in {width_for(int(top_k[row])), V}:
            own = slice(row, row + 1)
            token, _ = draw(logits[own], temperature[own], top_k[own], keys[own], width)
            assert int(token) == int(together[row]), (row, width)


def test_supercondition_is_min_dalle_s_mix() -> None:
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2 * 3 * 2, 50, generator=generator)  # two slots of three images
    factor = torch.tensor([4.0, 4.0, 4.0, 16.0, 16.0, 16.0])[:, None]
    guided = supercondition(logits, factor, 3)
    for slot, f in ((0, 4.0), (1, 16.0)):
        uncond, cond = logits[6 * slot : 6 * slot + 3], logits[6 * slot + 3 : 6 * slot + 6]
        assert torch.equal(guided[3 * slot : 3 * slot + 3], uncond * (1 - f) + cond * f)
    # The same arithmetic as the generator-based farm sampler it replaced (model.generate).
    probs, _ = guided_probs(logits[:6], torch.tensor([4.0]), torch.tensor([1.0]), 50)
    expected = torch.exp(guided[:3] - guided[:3].max(dim=-1, keepdim=True).values)
    torch.testing.assert_close(probs, expected)


# -- the batched draw in BatchDecoder (as on CUDA) -----------------------------------------


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


def batched(model: MinDalle) -> BatchDecoder:
    engine = BatchDecoder(model)
    engine.batched_draw = True
    return engine


def test_batched_draw_alone_among_ten_late_and_next_to_a_cancel(model: MinDalle) -> None:
    """One draw over every page's rows gives each job the tokens of the per-job draw, alone:
    among ten others (other settings and grid sizes), joined late, next to a cancel."""
    results = run(batched(model), {0: SPECS[:10], 60: [SPECS[10]]}, cancel={30: ["job4"]})
    assert set(results) == {spec.job_id for spec in SPECS} - {"job4"}
    for spec in SPECS:
        if spec.job_id in results:
            assert torch.equal(results[spec.job_id], alone(model, spec)), spec.job_id


def test_batched_draw_resumes_exactly(model: MinDalle) -> None:
    spec = SPECS[1]
    engine = batched(model)
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings)
    for _ in range(100):
        engine.step()
    checkpoint = engine.tokens(spec.job_id)

    engine = batched(model)
    engine.add(SPECS[6].job_id, SPECS[6].text, SPECS[6].seed, 1, SPECS[6].settings)
    engine.add(spec.job_id, spec.text, spec.seed, spec.grid_size, spec.settings, checkpoint)
    for _ in range(100):
        engine.step()
    assert engine.replay_mismatches(spec.job_id) == 0
    results = run(engine, {})
    assert torch.equal(results[spec.job_id], alone(model, spec))
