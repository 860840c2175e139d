"""The VQGAN across jobs (MinDalle.detokenize_many) and its opt-in bfloat16 precision, on the CPU.

Batched grids must be byte-identical to detokenize per grid in float32. That holds only because
model.vqgan.plan_batches keeps batches of small grids below 16 images: at one thread, torch's
1×1 convolutions switch from its own GEMM to oneDNN at 16 images and round differently, which
test_conv_1x1_rounding_changes_at_16_images shows. Every decode costs about a second per
256×256 image, so the module decodes 1×1, 2×2 and 3×3 grids once each way and shares them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import MinDalle
from model.config import VQGAN_CODE_COUNT
from model.vqgan import ONEDNN_MIN_BATCH, exact_on_cpu, plan_batches

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# bfloat16 against float32 uint8 pixels, random VQGAN weights. Measured on 16, 32 and 64 pixel
# squares: 70% of values changed, by 1.6–1.8 levels on average and 10, 14, 20 at most (the most
# grows with the size). Bounds with a margin:
BF16_MAX_LEVELS = 32
BF16_MAX_MEAN_LEVELS = 4.0


def random_grid(side: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VQGAN_CODE_COUNT, (side * side, 256), generator=generator)


def as_uint8(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.to(torch.uint8)  # the truncation PIL images and PNGs get


@pytest.fixture(scope="module")
def model(small_models_root: Path) -> MinDalle:
    return MinDalle(small_models_root, device="cpu", is_mega=False, is_verbose=False)


@pytest.fixture(scope="module")
def grids() -> list[torch.Tensor]:
    return [random_grid(side, seed) for seed, side in enumerate((2, 1, 1))]


@pytest.fixture(scope="module")
def per_job(model: MinDalle, grids: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model.detokenize(grid) for grid in grids]


def decoder_calls(model: MinDalle) -> list[int]:
    """Batch sizes of the VQGAN decoder's calls from now on (a forward hook; nothing mocked)."""
    assert model.detokenizer is not None
    calls: list[int] = []
    model.detokenizer.decoder.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    return calls


def test_many_grids_in_one_batch_equal_per_job(
    model: MinDalle, grids: list[torch.Tensor], per_job: list[torch.Tensor]
) -> None:
    calls = decoder_calls(model)
    batched = model.detokenize_many(grids)
    assert calls == [4 + 1 + 1]  # one batch of all 6 images
    assert [grid.shape for grid in batched] == [(512, 512, 3), (256, 256, 3), (256, 256, 3)]
    for alone, together in zip(per_job, batched, strict=True):
        assert torch.equal(alone, together)


def test_max_images_splits_batches_between_whole_grids(
    model: MinDalle, grids: list[torch.Tensor], per_job: list[torch.Tensor]
) -> None:
    calls = decoder_calls(model)
    batched = model.detokenize_many(grids[:2], max_images=4)
    assert calls == [4, 1]
    assert all(map(torch.equal, batched, per_job[:2]))


def test_padding_fills_a_batch_with_zero_codes_and_drops_them(
    model: MinDalle, grids: list[torch.Tensor], per_job: list[torch.Tensor]
) -> None:
    calls = decoder_calls(model)
    (padded,) = model.detokenize_many(grids[1:2], max_images=2, pad=True)
    assert calls == [2]
    assert torch.equal(padded, per_job[1])


def test_seamless_grids_of_one_size_share_a_batch(model: MinDalle) -> None:
    grids = [random_grid(1, 10), random_grid(1, 12)]
    alone = [model.detokenize(grid, is_seamless=True) for grid in grids]
    calls = decoder_calls(model)
    batched = model.detokenize_many(grids, is_seamless=True)
    assert calls == [2]
    assert all(map(torch.equal, batched, alone))
    # A joined 2×2 map is one map of 4 images' area: it goes alone, 1×1 maps together.
    assert model._vqgan_batches([1, 2, 1], True, 64) == [[0, 2], [1]]


def test_bad_grids_and_limits_raise(model: MinDalle) -> None:
    with pytest.raises(ValueError, match="square grid"):
        model.detokenize_many([torch.zeros(3, 256, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"must be \(N, 256\)"):
        model.detokenize_many([torch.zeros(4, 16, dtype=torch.long)])
    with pytest.raises(ValueError, match="max_images"):
        model.detokenize_many([random_grid(1, 0)], max_images=0)
    assert model.detokenize_many([]) == []


def test_bfloat16_is_close_and_leaves_float32_unchanged(
    model: MinDalle, grids: list[torch.Tensor], per_job: list[torch.Tensor]
) -> None:
    # bfloat16 convolutions are ~200× slower than float32 on a CPU without AVX-512 BF16, so
    # this decodes 1×1-code maps (16×16 pixels), not whole images.
    maps = torch.randint(0, VQGAN_CODE_COUNT, (8, 1, 1), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        float32 = model.vqgan().decode(maps)
        model.set_vqgan_precision("bfloat16")
        try:
            bf16 = model.vqgan().decode(maps)
        finally:
            model.set_vqgan_precision("float32")
    assert bf16.dtype == torch.float32
    levels = (as_uint8(bf16).int() - as_uint8(float32).int()).abs()
    assert 0 < int(levels.max()) <= BF16_MAX_LEVELS  # it does change pixels
    assert float(levels.float().mean()) <= BF16_MAX_MEAN_LEVELS
    assert {p.dtype for p in model.vqgan().parameters()} == {torch.float32}
    assert torch.equal(model.detokenize(grids[1]), per_job[1])


def test_bad_precision_names_raise(small_models_root: Path, model: MinDalle) -> None:
    with pytest.raises(ValueError, match="unknown VQGAN precision 'tf32'; choose one of float32"):
        model.set_vqgan_precision("tf32")
    assert model.vqgan_precision == "float32"
    with pytest.raises(ValueError, match="unknown VQGAN precision 'fp16'"):
        MinDalle(small_models_root, device="cpu", is_mega=False, vqgan_precision="fp16")


def test_channels_last_is_for_cuda_only(small_models_root: Path) -> None:
    model = MinDalle(
        small_models_root, device="cpu", is_mega=False, is_verbose=False, vqgan_channels_last=True
    )
    assert model.detokenizer is not None
    assert model.detokenizer.memory_format == torch.contiguous_format


def test_plan_keeps_small_grids_below_the_onednn_line() -> None:
    # 1×1, 2×2, 3×3 grids are small; 4×4 (16) and 5×5 (25) use oneDNN's 1×1 convolutions alone.
    rows = [1, 4, 9, 16, 4, 25, 1]
    assert plan_batches(rows, 64, exact=True) == [[0, 1, 2], [3, 5], [4, 6]]
    assert plan_batches(rows, 64, exact=False) == [[0, 1, 2, 3, 4, 5, 6]]
    assert plan_batches(rows, 20, exact=False) == [[0, 1, 2], [3, 4], [5], [6]]
    assert plan_batches(rows, 16, exact=False) == [[0, 1, 2], [3], [4], [5], [6]]
    for batch in plan_batches(rows, 64, exact=True):
        sizes = [rows[i] for i in batch]
        large = [size >= ONEDNN_MIN_BATCH for size in sizes]
        assert all(large) or (not any(large) and sum(sizes) < ONEDNN_MIN_BATCH)


def test_power_of_two_thread_counts_are_exact() -> None:
    assert [n for n in range(1, 17) if exact_on_cpu(n)] == [1, 2, 4, 8, 16]


def test_conv_1x1_rounding_changes_at_16_images() -> None:
    """Why plan_batches has a line at 16: at one thread (the module's), torch's 1×1 convolution
    rounds an image differently from 16 images up, and identically below."""
    assert torch.get_num_threads() == 1
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(512, 512, 1, 1, generator=generator) * 0.05
    images = torch.randn(ONEDNN_MIN_BATCH, 512, 16, 16, generator=generator)
    alone = F.conv2d(images[:1], weight)
    assert torch.equal(F.conv2d(images[: ONEDNN_MIN_BATCH - 1], weight)[:1], alone)
    assert not torch.equal(F.conv2d(images, weight)[:1], alone)
