"""Fused layer norms for the decoder step: a residual add and its layer norms in one kernel.

A decoder layer (model/bart.py DecoderLayer) in eager torch is dozens of small kernels between its
matrix products; with these it is, besides the products and the attention:

    x, h = add_layer_norm(x, self_out, pre_encoder_attn_ln, y_weight=self_attn_layer_norm)
    x, h = add_layer_norm(x, cross_out, glu.ln0, y_weight=encoder_attn_layer_norm)
    h = gelu_mul_layer_norm(h @ [fc0; fc1].T, glu.ln1)
    x, h = add_layer_norm(x, fc2(h), next layer's pre_self_attn_layer_norm (or final_ln))

Numerics follow torch's eager path in low precision: every layer norm reduces in float32 and
rounds its output to the input dtype; F.gelu rounds to the input dtype, and so does the product
gelu(gate) · up and the residual sum x + LN(y). Each of those roundings is reproduced here, so in
bfloat16 the results differ from torch's only by the order of the float32 reductions (torch's
CUDA layer norm uses Welford's algorithm; here the mean, then the centred sum of squares).

Batch invariance: one program per row, reading only that row, with a block and warp count chosen
from the width alone, so a row's reduction tree never depends on the other rows or their count.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


def _warps(block: int) -> int:
    """Warps per row program, from the (power-of-two) block width only: ~8 elements a thread."""
    return max(1, min(16, block // 256))


@triton.jit
def _round(x, dtype: tl.constexpr):
    """x rounded to `dtype` (where torch would store a tensor of the input dtype), back in fp32."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _normalize(x, cols, w_ptr, b_ptr, eps, C: tl.constexpr):
    """LayerNorm of one row block in float32; x must be 0 at masked columns (cols >= C)."""
    mask = cols < C
    mean = tl.sum(x, axis=0) / C
    centred = tl.where(mask, x - mean, 0.0)
    variance = tl.sum(centred * centred, axis=0) / C
    rstd = 1.0 / tl.sqrt(variance + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return centred * rstd * w + b


@triton.jit
def _layer_norm_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, stride_x, stride_o, eps, C: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_x + cols, mask=cols < C, other=0.0).to(tl.float32)
    out = _normalize(x, cols, w_ptr, b_ptr, eps, C)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=cols < C)


@triton.jit
def _add_layer_norm_kernel(
    x_ptr,
    y_ptr,
    yw_ptr,
    yb_ptr,
    w_ptr,
    b_ptr,
    s_ptr,
    out_ptr,
    stride_x,
    stride_y,
    stride_s,
    stride_o,
    eps,
    C: tl.constexpr,
    BLOCK: tl.constexpr,
    NORM_Y: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < C
    dtype = s_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
    if NORM_Y:
        y = _round(_normalize(y, cols, yw_ptr, yb_ptr, eps, C), dtype)
    s = _round(x + y, dtype)
    out = _normalize(s, cols, w_ptr, b_ptr, eps, C)  # s is 0 at masked columns: x and y are
    tl.store(s_ptr + row * stride_s + cols, s.to(dtype), mask=mask)
    tl.store(out_ptr + row * stride_o + cols, out.to(dtype), mask=mask)


@triton.jit
def _gelu_mul_layer_norm_kernel(
    gu_ptr, w_ptr, b_ptr, out_ptr, stride_gu, stride_o, eps, G: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < G
    dtype = out_ptr.dtype.element_ty
    base = gu_ptr + row * stride_gu
    gate = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + G + cols, mask=mask, other=0.0).to(tl.float32)
    # Exact GELU in torch's operation order; gelu(0) · 0 keeps the masked columns at 0.
    gelu = _round(gate * 0.5 * (1.0 + tl.math.erf(gate * 0.7071067811865476)), dtype)
    h = _round(gelu * up, dtype)
    out = _normalize(h, cols, w_ptr, b_ptr, eps, G)
    tl.store(out_ptr + row * stride_o + cols, out.to(dtype), mask=mask)


def _rows(x: Tensor) -> Tensor:
    """x as (rows, C) with unit column stride (a view where possible)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.stride(-1) == 1 else x.contiguous()


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """F.layer_norm(x, (C,), weight, bias, eps) over the last dimension; same shape and dtype."""
    width = x.shape[-1]
    rows = _rows(x)
    out = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(width)
        _layer_norm_kernel[(rows.shape[0],)](
            rows, weight, bias, out, rows.stride(0), out.stride(0), eps,
            C=width, BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
    return out.view(x.shape)


def add_layer_norm(
    x: Tensor,
    y: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    y_weight: Tensor | None = None,
    y_bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The residual add and the next layer norm: s = x + (LN_y(y) if y_weight is given else y),
    returned with LN_out(s). Both are new tensors shaped like x, in x.dtype (y must match it);
    the sum is rounded to that dtype before it is normalized, as torch's `x = x + ...` is."""
    assert x.shape == y.shape and x.dtype == y.dtype, (x.shape, y.shape, x.dtype, y.dtype)
    assert (y_weight is None) == (y_bias is None)
    width = x.shape[-1]
    xs, ys = _rows(x), _rows(y)
    s = torch.empty(xs.shape, dtype=x.dtype, device=x.device)
    out = torch.empty_like(s)
    if xs.shape[0]:
        block = triton.next_power_of_2(width)
        norm_y = y_weight is not None
        _add_layer_norm_kernel[(xs.shape[0],)](
            xs, ys,
            y_weight if norm_y else out_weight, y_bias if norm_y else out_bias,
            out_weight, out_bias, s, out,
            xs.stride(0), ys.stride(0), s.stride(0), out.stride(0), eps,
            C=width, BLOCK=block, NORM_Y=norm_y, num_warps=_warps(block),
        )  # fmt: skip
    return s.view(x.shape), out.view(x.shape)


def gelu_mul_layer_norm(gate_up: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5) -> Tensor:
    """LN(gelu(gate) · up) for gate_up = [gate | up] along the last dimension (fc0 and fc1 as one
    product): (..., 2G) → (..., G) in gate_up.dtype. GELU is the exact erf form (F.gelu's
    default); gelu(gate) and the product are rounded to the dtype, as in torch."""
    width = gate_up.shape[-1] // 2
    assert gate_up.shape[-1] == 2 * width and weight.shape == (width,), (
        gate_up.shape,
        weight.shape,
    )
    rows = _rows(gate_up)
    out = torch.empty((rows.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(width)
        _gelu_mul_layer_norm_kernel[(rows.shape[0],)](
            rows, weight, bias, out, rows.stride(0), out.stride(0), eps,
            G=width, BLOCK=block, num_warps=_warps(block),
        )  # fmt: skip
    return out.view(*gate_up.shape[:-1], width)
