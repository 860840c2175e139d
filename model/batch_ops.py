"""The operations of the batch decoder's step, in two sets that PagedForward runs alike.

`TorchOps` is the safe path, on every device: fixed row blocks for the matrix products, the
layer norms and GELU of torch, attention over each page's cache. `TritonOps` is the fast one on
CUDA (model/kernels/): unblocked batch-invariant matrix products, layer norms fused with the
residual add and with GELU·mul, and attention that reads each row's own positions only.

Both are batch-invariant, each in its own way (model/batch_forward.py's docstring says why
every part of TorchOps is; model/kernels/ says it for its kernels), and they give close but not
identical numbers: a farm's tokens depend on which set its workers run. `BatchDecoder.self_check`
verifies on the worker's device that the set in use keeps a row's tokens independent of the
batch, and falls back to TorchOps if not.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.bart import linear
from model.pages import Page

# A step's pages, each with its rows in the step's batch (model.pages.spans).
Spans = list[tuple[Page, slice]]

# Rows per block of every batched matrix product (see batch_forward's docstring, point 1).
DEFAULT_BLOCK_ROWS = 16
# On a GPU one weight read serves many more rows before the step stops being bound by it. On an
# H200, cuBLAS gave Mega's fc2 rows that differ below 128 rows and agree from 128 up
# (bench/bench_gpu.py, kernels_case).
CUDA_BLOCK_ROWS = 128


class StepOps(Protocol):
    """What a step's forward computes with. x, y: (rows, C) activations."""

    name: str
    # Rows per block of every product (the step's rows are padded to a multiple), or 0.
    block_rows: int

    @property
    def uses_length(self) -> bool:
        """Whether self-attention reads a page's positions up to a common length (a CUDA graph
        is then captured per length)."""
        ...

    def linear(self, x: Tensor, weight: Tensor) -> Tensor: ...

    def norm(self, x: Tensor, norm: nn.LayerNorm) -> Tensor: ...

    def add_norm(
        self, x: Tensor, y: Tensor, norm: nn.LayerNorm, y_norm: nn.LayerNorm | None
    ) -> tuple[Tensor, Tensor]:
        """(s, norm(s)) for s = x + y_norm(y), or x + y without y_norm."""
        ...

    def glu_norm(
        self, gate_up: Tensor, norm: nn.LayerNorm, spans: list[tuple[Page, slice]]
    ) -> Tensor:
        """norm(gelu(gate) · up) for gate_up = (gate | up), as fc0 and fc1 in one product."""
        ...

    def self_attention(
        self, page: Page, layer: int, q: Tensor, k: Tensor, v: Tensor, length: int
    ) -> Tensor:
        """Write a page's rows' keys and values at their positions, and attend over them."""
        ...


class TorchOps:
    """torch's kernels, made batch-invariant by blocks and per-job work (see batch_forward)."""

    name = "torch"

    def __init__(self, block_rows: int, page_attention: bool, per_job_gelu: bool):
        if block_rows < 0:
            raise ValueError(f"block_rows must be positive (or 0: no blocks), got {block_rows}")
        self.block_rows = block_rows
        # Self-attention once per page (CUDA), or per job over its exact positions (CPU).
        self.page_attention = page_attention
        self.per_job_gelu = per_job_gelu

    @property
    def uses_length(self) -> bool:
        return self.page_attention

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        """x @ weight.T over fixed blocks of block_rows rows (x's rows are a multiple of it), or
        in one product with block_rows=0."""
        if not self.block_rows or x.shape[0] == self.block_rows:
            return linear(x, weight)
        return torch.cat([linear(block, weight) for block in x.split(self.block_rows)])

    def norm(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return norm(x)

    def add_norm(
        self, x: Tensor, y: Tensor, norm: nn.LayerNorm, y_norm: nn.LayerNorm | None
    ) -> tuple[Tensor, Tensor]:
        s = x + (y if y_norm is None else y_norm(y))
        return s, norm(s)

    def glu_norm(
        self, gate_up: Tensor, norm: nn.LayerNorm, spans: list[tuple[Page, slice]]
    ) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return norm(self._gelu(gate, spans) * up)

    def _gelu(self, x: Tensor, spans: Spans) -> Tensor:
        """GELU, per job on the CPU (see batch_forward's docstring, point 2)."""
        if not self.per_job_gelu:
            return F.gelu(x)
        out = torch.empty_like(x)
        for page, rows in spans:
            for job in page.jobs:
                if job is not None:
                    first = rows.start + page.rows_of(job.slot).start
                    out[first : first + job.rows] = F.gelu(x[first : first + job.rows])
        return out

    def self_attention(
        self, page: Page, layer: int, q: Tensor, k: Tensor, v: Tensor, length: int
    ) -> Tensor:
        mask = page.self_mask(q.shape[0], length) if self.page_attention else None
        return page.self_attention(layer, q, k, v, mask)


class TritonOps:
    """The kernels of model/kernels/ (CUDA; on the CPU only under TRITON_INTERPRET=1)."""

    name = "triton"
    block_rows = 0
    uses_length = False

    def __init__(self) -> None:
        # Imported here: Triton is needed only when these kernels run.
        from model.kernels import attention, matmul, norm

        self._matmul = matmul.matmul
        self._layer_norm = norm.layer_norm
        self._add_layer_norm = norm.add_layer_norm
        self._gelu_mul_layer_norm = norm.gelu_mul_layer_norm
        self._decode_attention = attention.decode_attention

    def linear(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._matmul(x, weight)

    def norm(self, x: Tensor, norm: nn.LayerNorm) -> Tensor:
        return self._layer_norm(x, norm.weight, norm.bias, norm.eps)

    def add_norm(
        self, x: Tensor, y: Tensor, norm: nn.LayerNorm, y_norm: nn.LayerNorm | None
    ) -> tuple[Tensor, Tensor]:
        if y_norm is None:
            return self._add_layer_norm(x, y, norm.weight, norm.bias, eps=norm.eps)
        return self._add_layer_norm(
            x, y, norm.weight, norm.bias, y_norm.weight, y_norm.bias, eps=norm.eps
        )

    def glu_norm(
        self, gate_up: Tensor, norm: nn.LayerNorm, spans: list[tuple[Page, slice]]
    ) -> Tensor:
        return self._gelu_mul_layer_norm(gate_up, norm.weight, norm.bias, norm.eps)

    def self_attention(
        self, page: Page, layer: int, q: Tensor, k: Tensor, v: Tensor, length: int
    ) -> Tensor:
        rows, heads, head_dim = q.shape[0], page.heads, page.head_dim
        keys, values, positions = page.keys[layer], page.values[layer], page.positions[:rows]
        every_row = torch.arange(rows, device=q.device)
        keys[every_row, :, positions] = k.view(rows, heads, head_dim)
        values[every_row, :, positions] = v.view(rows, heads, head_dim)
        out = self._decode_attention(
            q.view(rows, heads, head_dim), keys[:rows], values[:rows], positions + 1
        )
        return out.reshape(rows, -1)


def step_ops(kernels: str, device: torch.device, block_rows: int | None) -> StepOps:
    """The operations named `kernels` ("torch" or "triton") for a device."""
    if kernels == "triton":
        return TritonOps()
    if kernels != "torch":
        raise ValueError(f"kernels must be 'torch' or 'triton', got {kernels!r}")
    is_cuda = device.type == "cuda"
    if block_rows is None:
        block_rows = CUDA_BLOCK_ROWS if is_cuda else DEFAULT_BLOCK_ROWS
    return TorchOps(block_rows, page_attention=is_cuda, per_job_gelu=not is_cuda)
