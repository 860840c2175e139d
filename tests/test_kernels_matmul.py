"""model/kernels/matmul.py: x @ weight.T against F.linear, and bit-identical rows whatever the
batch. On the CPU the kernels run in Triton's interpreter (float32 only), with small tiles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from model.kernels.matmul import (  # noqa: E402
    CONFIGS,
    GemmConfig,
    candidates,
    config_for,
    default_config,
    matmul,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Small tiles keep the interpreter fast; K splits of 1, 2 and 3 (3 leaves an empty tail block).
PLAIN = GemmConfig(block_m=16, block_n=16, block_k=16, split_k=1, num_warps=4, num_stages=2)
SPLIT = GemmConfig(block_m=16, block_n=32, block_k=16, split_k=3, num_warps=4, num_stages=2)
SPLIT2 = GemmConfig(block_m=32, block_n=16, block_k=32, split_k=2, num_warps=4, num_stages=2)


def randn(*shape: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator).to(DEVICE)


def assert_close_to_linear(x: torch.Tensor, weight: torch.Tensor, config: GemmConfig) -> None:
    out = matmul(x, weight, config)
    assert out.shape == (x.shape[0], weight.shape[0]) and out.dtype == x.dtype
    torch.testing.assert_close(out, F.linear(x, weight), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("config", [PLAIN, SPLIT, SPLIT2], ids=["plain", "split3", "split2"])
@pytest.mark.parametrize(("m", "n", "k"), [(1, 24, 40), (5, 40, 70), (39, 24, 64), (33, 40, 96)])
def test_matches_linear(config: GemmConfig, m: int, n: int, k: int) -> None:
    assert_close_to_linear(randn(m, k, seed=m), randn(n, k, seed=n + k), config)


@pytest.mark.parametrize("config", [PLAIN, SPLIT], ids=["plain", "split3"])
def test_weight_row_slice_view(config: GemmConfig) -> None:
    """A row slice of a bigger weight (lm_head.weight[:codes], one of a fused q/k/v)."""
    fused, x = randn(70, 40, seed=1), randn(7, 40, seed=2)
    for weight in (fused[:33], fused[24:48], fused[48:]):
        assert weight.is_contiguous()
        assert_close_to_linear(x, weight, config)


def test_misaligned_input_is_right() -> None:
    """x starting off a 16-byte boundary (copied to an aligned buffer first)."""
    x, weight = randn(9, 37, seed=3), randn(24, 37, seed=4)
    assert x[1:].data_ptr() % 16 != 0
    assert_close_to_linear(x[1:], weight, PLAIN)


@pytest.mark.parametrize("config", [PLAIN, SPLIT, SPLIT2], ids=["plain", "split3", "split2"])
@pytest.mark.parametrize("k", [64, 70])
def test_rows_do_not_depend_on_the_batch(config: GemmConfig, k: int) -> None:
    """The same rows, bit for bit, alone and inside batches of other sizes (other tile counts,
    a partial last tile or not) next to different rows.

    The rows keep their position within a tile (offsets are multiples of block_m): on the CPU
    the interpreter's tl.dot is numpy's matmul, whose BLAS rounds a row differently by its
    position in the block. On a GPU each output element is its own dot product whatever its
    position; test_half_precision_on_gpu and bench/bench_kernels.py check that there."""
    weight = randn(40, k, seed=5)
    rows = randn(5, k, seed=6)
    alone = matmul(rows, weight, config)
    assert torch.equal(matmul(rows[:1], weight, config), alone[:1])  # M == 1
    tile = config.block_m
    for m, tiles, seed in [(5 + tile, 1, 7), (3 * tile, 2, 8), (2 * tile + 7, 2, 9), (6, 0, 10)]:
        at = tiles * tile
        batch = randn(m, k, seed=seed)
        batch[at : at + 5] = rows
        out = matmul(batch, weight, config)
        assert torch.equal(out[at : at + 5], alone), (m, at)


@pytest.mark.parametrize("k", [96, 70])
def test_splits_in_programs_or_in_registers_agree(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A split-K config gives the same bits whether its splits run in their own programs
    (through the float32 workspace: few rows) or all in one program (many rows)."""
    from model.kernels import matmul as module

    x, weight = randn(37, k, seed=13), randn(40, k, seed=14)
    results = []
    for below in (0, 10**9):  # never / always in their own programs
        monkeypatch.setattr(module, "SPLITS_IN_PROGRAMS_BELOW", below)
        results.append(matmul(x, weight, SPLIT))
    torch.testing.assert_close(results[0], F.linear(x, weight), rtol=1e-5, atol=1e-4)
    assert torch.equal(results[0], results[1])


def test_rejects_bad_inputs() -> None:
    x, weight = randn(3, 16, seed=11), randn(8, 16, seed=12)
    with pytest.raises(ValueError):
        matmul(x, weight[:, :8], PLAIN)
    with pytest.raises(ValueError):
        matmul(x.double(), weight.double(), PLAIN)
    with pytest.raises(ValueError):
        GemmConfig(block_m=48)
    assert matmul(x[:0], weight, PLAIN).shape == (0, 8)


@pytest.mark.parametrize(
    "shape", [*CONFIGS, (4096, 4096), (100, 50), (30000, 512)], ids=lambda s: f"{s[0]}x{s[1]}"
)
def test_configs_are_valid(shape: tuple[int, int]) -> None:
    """Every table entry, default and candidate: a valid schedule whose split leaves each part
    of K real work, and whose tiles fit in shared memory."""
    n, k = shape
    configs = [config_for(n, k, dtype) for dtype in (torch.bfloat16, torch.float32)]
    configs += [default_config(n, k), *candidates(n, k)]
    assert len(candidates(n, k)) <= 6
    for config in configs:
        for block in (config.block_m, config.block_n, config.block_k):
            assert block >= 16 and block & (block - 1) == 0, config
        assert 1 <= config.split_k <= 16 and config.num_warps in (4, 8), config
        k_blocks = triton.cdiv(k, config.block_k)
        assert k_blocks >= config.split_k, config  # no split is all padding
        # The last split runs the same trip count; less than one split's worth is padding.
        per_split = triton.cdiv(k_blocks, config.split_k)
        assert per_split * config.split_k - k_blocks < per_split, config
    for config, itemsize in zip(configs[:2], (2, 4), strict=True):
        assert config.shared_memory(itemsize) <= 227 * 1024, config


def test_known_shapes_have_entries() -> None:
    """The Mega and Mini decoder's weights all have a tuned entry."""
    for embed, glu in ((2048, 4096), (1024, 2730)):
        shapes = [(3 * embed, embed), (embed, embed), (2 * glu, embed), (embed, glu)]
        for shape in [*shapes, (16383, embed)]:
            assert shape in CONFIGS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(6144, 2048), (2048, 4096), (1024, 2730), (16383, 1024)])
def test_half_precision_on_gpu(dtype: torch.dtype, shape: tuple[int, int]) -> None:
    """The table's configs in half precision: close to cuBLAS, rows invariant, graph-capturable."""
    n, k = shape
    weight = torch.randn(n + 1, k, device="cuda", dtype=dtype)[:n] * 0.02
    x = torch.randn(300, k, device="cuda", dtype=dtype)
    out = matmul(x, weight)
    exact = x.float() @ weight.float().T
    cublas_err = (F.linear(x, weight).float() - exact).abs().max()
    assert (out.float() - exact).abs().max() <= 2 * cublas_err + 1e-3 * exact.abs().max()
    for rows in (slice(0, 1), slice(0, 32), slice(5, 44), slice(255, 300)):
        assert torch.equal(matmul(x[rows], weight), out[rows]), rows
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = matmul(x[:39], weight)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, out[:39])
