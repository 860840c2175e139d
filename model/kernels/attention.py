"""Decode self-attention over each row's own filled cache positions (flash-decoding, fixed split).

A decoder step has one new query per row; row r attends to its cached positions [0, lengths[r]).
The torch path (model/pages.py) multiplies every row's query by the cache up to the page's
furthest position and masks the rest, so with jobs at staggered positions most of the keys and
values it streams are thrown away. Here a row reads only its own filled positions.

Batch invariance: the positions are cut into splits of a FIXED size (SPLIT, never chosen from the
row count or the lengths). Phase 1 runs one program per (row, head, split) and writes that split's
running max, sum of exponentials and unnormalized weighted value sum in float32; programs whose
split starts at or past the row's length do nothing. Phase 2 runs one program per (row, head) and
combines the row's non-empty splits, always with the same reduction tree (empty splits contribute
exact zeros). So a row's output depends only on its own query, cache and length, whatever the
other rows hold and however many there are. The grids depend on shapes only (R, H, T), never on
the lengths' values, so both launches can be captured in a CUDA graph. Phase 1's grid is
(split, head, row) with the split fastest, so the idle programs of short rows are interleaved
with busy ones rather than left as a tail of empty waves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Positions per phase-1 program. 64 positions × 64 dims is an 8 KiB bf16 tile of keys and one of
# values per program: large enough to stream at full bandwidth, small enough that a row at an
# early position reads little more than it needs.
SPLIT = 64
# Warps per phase-1 program: a fixed launch setting (it may change a row's bits, but it is the same
# for every batch). On the H200 at R=2048, Mega sizes, bf16, 2 warps beat 4 (staggered lengths:
# 0.57 ms against 0.69 ms; all at 64: 0.31 against 0.33); SPLIT=128 was no faster overall.
SPLIT_WARPS = 2
# Rows are the grid's third axis, which CUDA limits to 65535 programs.
MAX_ROWS = 65535


@triton.jit
def _split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lengths_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    scale,
    stride_qr,
    stride_qh,
    stride_kr,
    stride_kh,
    stride_kt,
    stride_vr,
    stride_vh,
    stride_vt,
    H: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Phase 1: one (row, head, split). Writes m = max score, l = Σ exp(score − m) and
    acc = Σ exp(score − m)·v over the split's positions below the row's length."""
    split = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.program_id(2)
    length = tl.load(lengths_ptr + row).to(tl.int32)
    start = split * BLOCK_T
    if start < length:
        row64 = row.to(tl.int64)  # a whole Mega cache is ~2^30 elements per layer
        dims = tl.arange(0, D)
        positions = start + tl.arange(0, BLOCK_T)
        valid = positions < length
        q = tl.load(q_ptr + row64 * stride_qr + head * stride_qh + dims).to(tl.float32)
        k_base = k_ptr + row64 * stride_kr + head * stride_kh
        v_base = v_ptr + row64 * stride_vr + head * stride_vh
        # Masked loads: positions at or past the length are never read (they may hold anything).
        # Both tiles are requested before any arithmetic, so their loads are in flight together.
        k = tl.load(
            k_base + positions[:, None] * stride_kt + dims[None, :], mask=valid[:, None], other=0.0
        )
        v = tl.load(
            v_base + positions[:, None] * stride_vt + dims[None, :], mask=valid[:, None], other=0.0
        )
        scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * scale
        scores = tl.where(valid, scores, float("-inf"))
        m = tl.max(scores, axis=0)
        p = tl.exp(scores - m)  # 0 where masked; m is finite (the split has a valid position)
        acc = tl.sum(p[:, None] * v.to(tl.float32), axis=0)
        at = (row * H + head) * SPLITS + split
        tl.store(m_ptr + at, m)
        tl.store(l_ptr + at, tl.sum(p, axis=0))
        tl.store(acc_ptr + at.to(tl.int64) * D + dims, acc)


@triton.jit
def _combine_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    lengths_ptr,
    out_ptr,
    stride_or,
    stride_oh,
    H: tl.constexpr,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
    SPLITS_BLOCK: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """Phase 2: one (row, head). Rescales each non-empty split to the row's max and sums them
    with one fixed reduction tree; splits the row never reached are masked to exact zeros (their
    phase-1 outputs were not written and are not read)."""
    row_head = tl.program_id(0)
    row = row_head // H
    head = row_head % H
    length = tl.load(lengths_ptr + row).to(tl.int32)
    splits = tl.arange(0, SPLITS_BLOCK)
    filled = (splits < SPLITS) & (splits * BLOCK_T < length)
    at = row_head * SPLITS + splits
    m = tl.load(m_ptr + at, mask=filled, other=float("-inf"))
    sums = tl.load(l_ptr + at, mask=filled, other=0.0)
    dims = tl.arange(0, D)
    acc = tl.load(
        acc_ptr + at.to(tl.int64)[:, None] * D + dims[None, :], mask=filled[:, None], other=0.0
    )
    top = tl.max(m, axis=0)
    weight = tl.where(filled, tl.exp(m - top), 0.0)
    total = tl.sum(weight * sums, axis=0)
    out = tl.sum(weight[:, None] * acc, axis=0) / total
    row64 = row.to(tl.int64)
    tl.store(
        out_ptr + row64 * stride_or + head * stride_oh + dims, out.to(out_ptr.dtype.element_ty)
    )


def decode_attention(
    q: Tensor, keys: Tensor, values: Tensor, lengths: Tensor, split: int = SPLIT
) -> Tensor:
    """Softmax attention of each row's one query over its first lengths[r] cached positions.

    q: (R, H, D); keys, values: (R, H, T, D) with unit stride along D (a row prefix of the page's
    cache is fine); lengths: (R,) integers in 1..T. Returns (R, H, D) in q.dtype. Scores are
    q·k accumulated in float32, scaled by D**-0.5, softmaxed in float32, and the weights applied
    to the values with float32 accumulation (no rounding of scores or weights to q.dtype, unlike
    the torch path). `split` (a power of two) is the fixed number of positions per phase-1
    program; keep the default outside tests, since a row's bits depend on it.
    """
    rows, heads, head_dim = q.shape
    length = keys.shape[2]
    assert keys.shape == values.shape == (rows, heads, length, head_dim), (keys.shape, q.shape)
    assert lengths.shape == (rows,), lengths.shape
    assert rows <= MAX_ROWS, rows
    assert q.stride(2) == keys.stride(3) == values.stride(3) == 1
    assert split & (split - 1) == 0 and head_dim & (head_dim - 1) == 0
    splits = triton.cdiv(length, split)
    out = torch.empty_like(q)
    if rows == 0:
        return out
    m = torch.empty((rows, heads, splits), dtype=torch.float32, device=q.device)
    sums = torch.empty_like(m)
    acc = torch.empty((rows, heads, splits, head_dim), dtype=torch.float32, device=q.device)
    # Splits vary fastest, so the empty programs of short rows interleave with busy ones.
    _split_kernel[(splits, heads, rows)](
        q,
        keys,
        values,
        lengths,
        m,
        sums,
        acc,
        head_dim**-0.5,
        q.stride(0),
        q.stride(1),
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        H=heads,
        D=head_dim,
        SPLITS=splits,
        BLOCK_T=split,
        num_warps=SPLIT_WARPS,
    )
    _combine_kernel[(rows * heads,)](
        m,
        sums,
        acc,
        lengths,
        out,
        out.stride(0),
        out.stride(1),
        H=heads,
        D=head_dim,
        SPLITS=splits,
        SPLITS_BLOCK=triton.next_power_of_2(splits),
        BLOCK_T=split,
        num_warps=2,
    )
    return out
