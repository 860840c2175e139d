"""A batch-invariant matrix product, x @ weight.T, for the batch decoder's step on CUDA.

cuBLAS picks its kernel, tile and split-K by the row count M, so one row's result can change
with the batch it is in (model/batch_forward.py, point 1). Here the whole schedule is a
`GemmConfig` chosen from the weight's shape (N, K) and dtype only, never from M:

- every output tile is one program that sums over K in the same blocks, in the same order,
  accumulating in float32 with `tl.dot`; a row's result does not depend on where in its tile the
  row sits or on what the tile's other rows hold (each output element is its own dot product);
- with split_k > 1 the K loop is cut into split_k fixed ranges (from K and the config only),
  each summed from zero in float32, then the split sums are added in split order. Where that
  happens may depend on M, the arithmetic does not: with few output tiles (the step's few rows)
  each split runs in its own program and writes float32 partials to a workspace that
  `_sum_splits_kernel` adds up; with enough tiles to fill the GPU (many rows) one program
  computes all the splits of its tile and adds them in registers, with the same float32
  operations in the same order. No atomics: their order would depend on timing;
- M is marked `do_not_specialize`, so M == 1 or M % 16 == 0 compiles no other kernel. N and K
  are specialized, but they are the weight's, fixed per call site. Pointers are specialized on
  16-byte alignment (vector loads), so a misaligned input is copied first (`_aligned`): one
  call site always runs one compiled kernel.

The cost of never changing the tiles with M: a config is a compromise between the decoder
step's few rows (16-64: bandwidth bound, wants many programs streaming the weight once: a
narrow BLOCK_N, a small BLOCK_M (rows past M still cost tensor-core time) or a split of K) and
many rows (2048: compute bound, wants 128x128 tiles). Split-K's workspace would cost M·N·split·4
bytes written and read again: at M=2048, N=6144, split_k=4 that is 2 × 201 MB, ~95 µs at
~4.3 TB/s, next to ~96 µs for the product itself (measured on an H200: 204 µs against 96), so
many rows keep the splits in registers instead; at M=32 it is 2 × 3 MB, small next to the
weight. Even in registers a split costs at many rows (a second float32 tile: 245 µs for
128x128 split 4, 123 against 111 for 128x64 split 2), and at few rows BLOCK_M=128 pays for its
padding rows on the tensor cores, so the sweep mostly picks 128x64 tiles without a split.
bench/bench_kernels.py sweeps `candidates` and reports which config to put in `CONFIGS`.

No host synchronisation and only torch.empty allocations: CUDA-graph capturable.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Multiprocessors on an H200 (and H100 SXM): how many programs a step's product wants in flight.
TARGET_PROGRAMS = 132
# Shared memory a config may ask for (Hopper allows 227 KiB per block; leave Triton headroom).
SHARED_MEMORY_BYTES = 200 * 1024
# With fewer output tiles than this, a split-K config runs each split in its own program.
SPLITS_IN_PROGRAMS_BELOW = TARGET_PROGRAMS
# Elements per program of the split-K sum.
SUM_BLOCK = 1024


@dataclass(frozen=True)
class GemmConfig:
    """One fixed schedule of the product: tile sizes, K split, and launch parameters."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    split_k: int = 1
    num_warps: int = 8
    num_stages: int = 3
    # Tiles of GROUP_M row blocks run next to each other, sharing weight columns in L2.
    group_m: int = 8

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be a power of two up to 16, got {self.num_warps}")
        if self.split_k < 1 or self.num_stages < 1 or self.group_m < 1:
            raise ValueError(f"split_k, num_stages and group_m must be positive: {self}")

    def shared_memory(self, itemsize: int) -> int:
        """Bytes of shared memory the pipelined x and weight tiles take."""
        return self.num_stages * (self.block_m + self.block_n) * self.block_k * itemsize


def _config(bm: int, bn: int, bk: int, split: int, warps: int, stages: int) -> GemmConfig:
    return GemmConfig(bm, bn, bk, split, warps, stages)


# Keyed by the weight's (N, K): Mega (E=2048, G=4096) and Mini (E=1024, G=2730). Chosen by
# bench/bench_kernels.py's sweep on an H200 (bf16, 2026-11-30; min of t/t_cuBLAS at 32 + at 2048
# rows); the us at 32 / 2048 rows, and cuBLAS's, are in the comments.
CONFIGS: dict[tuple[int, int], GemmConfig] = {
    # Mega
    (6144, 2048): _config(128, 64, 64, 1, 4, 4),  # 13.9 / 111 (cuBLAS 9.3 / 70)
    (2048, 2048): _config(128, 64, 64, 1, 4, 4),  # 13.1 / 38 (6.4 / 24)
    (8192, 2048): _config(64, 128, 64, 2, 4, 4),  # 13.7 / 171 (10.9 / 92)
    (2048, 4096): _config(64, 64, 128, 4, 4, 4),  # 9.0 / 130 (9.6 / 48)
    (16383, 2048): _config(64, 128, 64, 1, 4, 4),  # 20.6 / 355 (90 / 1434: N odd)
    # Mini
    (3072, 1024): _config(128, 64, 64, 1, 4, 4),  # 7.9 / 32 (5.8 / 23)
    (1024, 1024): _config(128, 64, 64, 1, 4, 4),  # 7.8 / 12 (4.7 / 8.8)
    (5460, 1024): _config(128, 64, 64, 1, 4, 4),  # 9.4 / 65 (12.7 / 102)
    (1024, 2730): _config(64, 64, 128, 4, 4, 4),  # 17.8 / 119 (12.1 / 64: K*2 bytes not 16-aligned)
    (16383, 1024): _config(128, 128, 64, 1, 8, 3),  # 14.4 / 135 (44 / 738)
}


def _split_for(n: int, k: int, block_n: int, block_k: int) -> int:
    """The split of K (1, 2 or 4: it divides K's blocks for K = 1024, 2048, 4096) that brings
    N's tiles up to about TARGET_PROGRAMS programs, keeping 4+ blocks of K per split."""
    tiles, k_blocks = triton.cdiv(n, block_n), triton.cdiv(k, block_k)
    split = 1
    while split < 4 and tiles * split < TARGET_PROGRAMS * 7 // 8 and k_blocks >= 8 * split:
        split *= 2
    return split


def default_config(n: int, k: int) -> GemmConfig:
    """The config for a weight shape outside `CONFIGS`, from (n, k) alone: what the sweep chose
    for similar shapes (128x64 tiles; a K split for a long K and few columns)."""
    if k > n:
        return _config(64, 64, 128, _split_for(n, k, 64, 128), 4, 4)
    return _config(128, 64, 64, 1, 4, 4)


def config_for(n: int, k: int, dtype: torch.dtype) -> GemmConfig:
    """The one config for a weight of shape (n, k) in `dtype`; never depends on the row count.

    For 4-byte dtypes the pipeline is made shallower until its tiles fit in shared memory (the
    depth changes the schedule, not the arithmetic)."""
    config = CONFIGS.get((n, k)) or default_config(n, k)
    itemsize = torch.empty((), dtype=dtype).element_size()
    while config.num_stages > 2 and config.shared_memory(itemsize) > SHARED_MEMORY_BYTES:
        config = dataclasses.replace(config, num_stages=config.num_stages - 1)
    return config


def candidates(n: int, k: int) -> list[GemmConfig]:
    """A handful of configs worth timing for a weight of shape (n, k): the compute-bound tile,
    narrower tiles, and the same with K split to fill the GPU at a few rows."""
    found = [
        _config(128, 128, 64, 1, 8, 3),
        _config(128, 128, 64, _split_for(n, k, 128, 64), 8, 3),
        _config(128, 64, 64, 1, 4, 4),
        _config(128, 64, 64, _split_for(n, k, 64, 64), 4, 4),
        _config(64, 64, 128, _split_for(n, k, 64, 128), 4, 4),
        _config(64, 128, 64, _split_for(n, k, 128, 64), 4, 4),
    ]
    return list(dict.fromkeys(found))  # in order, without repeats


@triton.jit(do_not_specialize=["M"])
def _matmul_kernel(
    x_ptr,
    w_ptr,
    out_ptr,
    M,
    N,
    K,
    K_PER_SPLIT: tl.constexpr,
    SPLITS_HERE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One (BLOCK_M, BLOCK_N) tile of x @ w.T over SPLITS_HERE of the K splits, starting at
    split program_id(1) * SPLITS_HERE: either one split, written as float32 partials to
    out[split], or all of them, summed here in split order and written in out's dtype.

    The grouped tile order only decides which tile a program computes, not how."""
    pid = tl.program_id(0)
    first_split = tl.program_id(1) * SPLITS_HERE
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_M * tiles_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLITS_HERE):
        k_start = (first_split + s) * K_PER_SPLIT
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * K + (k_start + offs_k)[None, :]
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * K + (k_start + offs_k)[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # The same trip count for every split; blocks past K (the last split's tail) load
        # zeros. (A constexpr bound: the interpreter cannot loop to a run-time one, numpy 2.4.)
        for k in range(0, K_PER_SPLIT, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
                b = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                in_k = (k_start + k + offs_k) < K
                a = tl.load(x_ptrs, mask=mask_m[:, None] & in_k[None, :], other=0.0)
                b = tl.load(w_ptrs, mask=in_k[:, None] & mask_n[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        # The same float32 sums, in the same order, as _sum_splits_kernel's.
        if s == 0:  # noqa: SIM108 (a static branch: s is a constexpr)
            total = acc
        else:
            total = total + acc

    out_ptrs = out_ptr + first_split.to(tl.int64) * M * N + offs_m[:, None].to(tl.int64) * N
    out_ptrs += offs_n[None, :]
    tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _sum_splits_kernel(partials_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """out = partials[0] + partials[1] + ... in that order, in float32, then cast: every
    element's sum has the same order whatever the row count (elementwise, so specializing numel
    changes only the vector width of the loads)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.load(partials_ptr + offs, mask=mask, other=0.0)
    for s in tl.static_range(1, SPLIT_K):
        acc += tl.load(partials_ptr + s * numel + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _aligned(t: Tensor) -> Tensor:
    """`t`, contiguous and on a 16-byte boundary (copied if not): Triton specializes pointers
    on that alignment, and one call site should always run the same compiled kernel."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def matmul(x: Tensor, weight: Tensor, config: GemmConfig | None = None) -> Tensor:
    """x @ weight.T as (M, N) in x's dtype, the same bits for a row whatever else is in x.

    x: (M, K); weight: (N, K), as nn.Linear stores it (a row slice of a bigger weight is fine).
    Both float16, bfloat16 or float32, the same dtype; float32 multiplies in full precision
    (no TF32). `config` None: `config_for(N, K, dtype)`.
    """
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"need x (M, K) and weight (N, K), got {tuple(x.shape)}, {weight.shape}")
    if x.dtype != weight.dtype or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"need two float16, bfloat16 or float32 tensors: {x.dtype}, {weight.dtype}"
        )
    (m, k), n = x.shape, weight.shape[0]
    config = config or config_for(n, k, x.dtype)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    x, weight = _aligned(x), _aligned(weight)
    split = config.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, config.block_k), split) * config.block_k
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    # Where the splits run (the arithmetic is the same; see the module docstring): in their own
    # programs, through a float32 workspace, while the tiles alone are too few to fill the GPU,
    # else all in each tile's program. A split of one block of K always takes the workspace:
    # Triton may fold a lone `partial + dot(a, b, 0)` into `dot(a, b, partial)`.
    in_programs = split > 1 and (tiles < SPLITS_IN_PROGRAMS_BELOW or k_per_split == config.block_k)
    splits_here = 1 if in_programs else split
    target = out
    if in_programs:
        target = torch.empty((split, m, n), device=x.device, dtype=torch.float32)
    grid = (tiles, split // splits_here)
    with torch.cuda.device_of(x):  # Triton launches on the current device
        _matmul_kernel[grid](
            x,
            weight,
            target,
            m,
            n,
            k,
            K_PER_SPLIT=k_per_split,
            SPLITS_HERE=splits_here,
            BLOCK_M=config.block_m,
            BLOCK_N=config.block_n,
            BLOCK_K=config.block_k,
            GROUP_M=config.group_m,
            EVEN_K=k == k_per_split * split,
            PRECISION="ieee",
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
        if in_programs:
            _sum_splits_kernel[(triton.cdiv(m * n, SUM_BLOCK),)](
                target, out, m * n, SPLIT_K=split, BLOCK=SUM_BLOCK, num_warps=4
            )
    return out
